"""Does multipoint gain from AWQ's activation-aware column scaling? (issue 15's open question.)

On all-MiniLM-L6-v2 (W4A16, 4.5 bits, the compare_methods data: 32 calibration sentences, cosine
to the FP32 embedding on 32 others), every Linear layer is replaced by the same layer on scaled
columns, W diag(s) applied to x / s, with AWQ's s = m^alpha (m: the input channel's RMS on the
calibration sentences, normalized by sqrt(max m * min m), rounded to float16), and multipoint
(mpq's defaults) quantizes the scaled layers. alpha = 0 is plain multipoint. The float16 s (16 bits
per input channel) is not counted in avg bits here; it would add 16 / C_out bits per weight.

    python benchmarks/awq_multipoint.py --alphas 0 0.25 0.5 --threads 1
"""

import argparse
import copy
import json
from pathlib import Path

import torch
from provenance import git_commit, provenance  # benchmarks/ (this script's folder) is on sys.path
from torch import nn

import mpq
from mpq.examples import assets, text

ROOT = Path(__file__).resolve().parent.parent


class ScaledInputLinear(nn.Module):
    """``lin`` on scaled columns: lin.weight diag(s), fed x / s (the same function in float)."""

    def __init__(self, lin: nn.Linear, s: torch.Tensor):
        super().__init__()
        self.register_buffer("inv", (1 / s).float())
        self.lin = copy.deepcopy(lin)
        with torch.no_grad():
            self.lin.weight.mul_(s[None, :].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * self.inv)


def input_rms(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Per Linear layer: the RMS of each input channel over the batches, float64."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(mod, inputs, out):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return {n: (sums[n] / counts[n]).sqrt() for n in sums}


def scaled_model(model: nn.Module, rms: dict[str, torch.Tensor], alpha: float) -> nn.Module:
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, nn.Linear):
            s = rms[name].clamp_min(1e-8) ** alpha
            s = (s / (s.max() * s.min()).sqrt()).clamp(1e-4, 1e4).half().double()
            parent, leaf = name.rsplit(".", 1)
            setattr(out.get_submodule(parent), leaf, ScaledInputLinear(m, s))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "awq_multipoint_minilm.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = assets.load_minilm()
    calib = text.calibration_batches(tokenizer, text.calibration_sentences())
    ev = text.tokenize(tokenizer, text.evaluation_sentences())
    with torch.no_grad():
        ref = model(ev)
    rms = input_rms(model, calib)
    rows = []
    for alpha in args.alphas:
        cfg = mpq.QuantConfig(w_bits=4, a_bits=None, seed=args.seed)
        qmodel = mpq.quantize(scaled_model(model, rms, alpha), calib, cfg)
        with torch.no_grad():
            quality = text.embedding_fidelity(qmodel(ev), ref)
        rows.append({"alpha": alpha, "avg_bits": mpq.last_report(qmodel).avg_bits, **quality})
        print(rows[-1], flush=True)
    command = "python benchmarks/awq_multipoint.py --alphas " + " ".join(f"{a:g}" for a in args.alphas)
    command += f" --threads {args.threads} --seed {args.seed}"
    result = {
        "benchmark": "awq_multipoint",
        "model": "all-MiniLM-L6-v2, W4A16 multipoint at 4.5 bits on AWQ-scaled columns",
        "command": command,
        "commit": git_commit(),
        "provenance": provenance(),
        "seed": args.seed,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
