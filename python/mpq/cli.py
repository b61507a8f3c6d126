"""``python -m mpq``: quantize, evaluate and compare models from the shell.

    python -m mpq quantize --model torchvision:resnet18 --calib ~/imagenet/train --config W4A8 --out r18.mpq.safetensors
    python -m mpq eval     --model torchvision:resnet18 --data ~/imagenet/val --quantized r18.mpq.safetensors
    python -m mpq sweep    --model efficientnet_lite0 --calib CAL --data VAL --avg-bits 4,4.25,4.5,5 --methods rtn,multipoint
    python -m mpq demo     # EfficientNet-Lite0: FP32 vs RTN W4A8 vs multipoint W4A8 on bundled photos (offline)
    python -m mpq info     # build facts: versions, CUDA kernels and architectures

The pieces (``load_model``, ``image_files``, ``labelled_images``, ``calibration_batches``,
``evaluate``, ``quantize_and_evaluate``) are also what ``examples/imagenet/eval.py`` uses.
A user's mistake (missing folder, unknown model, bad config, unreadable file) ends the command
with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("mpq")

__all__ = [
    "UserError",
    "LoadedModel",
    "load_model",
    "make_config",
    "image_files",
    "labelled_images",
    "calibration_batches",
    "EvalData",
    "evaluate",
    "quantize_and_evaluate",
    "main",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MODEL_HELP = (
    "the model: 'torchvision:<name>' (ImageNet-pretrained weights through torchvision's weights API, "
    "downloaded once into $TORCH_HOME; 'torchvision:<name>:random' for random weights, "
    "'torchvision:<name>:<WEIGHTS>' e.g. IMAGENET1K_V2 for other weights), 'efficientnet_lite0' (bundled "
    "offline, ImageNet-pretrained), or the path of a saved quantized model (mpq.save) or a TorchScript file"
)
CLASS_MAP_HELP = (
    "how class folders map to the model's class indices: 'sorted' (default: the k-th folder in sorted order is "
    "class k, right for the standard ImageNet validation folder with its 1000 wnid folders n01440764 ...), "
    "'index' (each folder name ends with its class index, e.g. 243 or n00000243: for a subset of classes), "
    "or a JSON file {\"folder name\": class index}"
)


class UserError(Exception):
    """A mistake in the command's arguments or inputs: reported as one line, exit status 2."""


# ---- models --------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    module: Any  # torch.nn.Module or TorchScript module, eval mode
    transform: Callable  # PIL image -> float tensor [3, H, W]
    label: str  # for messages and tables
    architecture: Optional[str] = None  # what mpq.save records, to rebuild the float model
    kind: str = "float"  # "float", "mpq" (a saved quantized model) or "torchscript"


def imagenet_transform(resize: int = 256, crop: int = 224):
    """Standard ImageNet evaluation preprocessing: resize 256, center crop 224, ImageNet mean/std."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )


def _preprocess(name: str, default: Callable) -> Callable:
    from mpq.examples import assets

    if name == "auto":
        return default
    if name == "imagenet":
        return imagenet_transform()
    if name == "tflite":
        return assets.efficientnet_lite_transform()
    raise UserError(f"unknown --preprocess {name!r}: expected auto, imagenet or tflite")


def _torchvision_model(spec: str, need_weights: bool) -> LoadedModel:
    import torchvision
    from torchvision.models import get_model, get_model_weights

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise UserError(f"bad model {spec!r}: expected torchvision:<name>, torchvision:<name>:random or torchvision:<name>:<WEIGHTS>")
    name = parts[1]
    choice = parts[2] if len(parts) == 3 else "DEFAULT"
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = [k for k in known if name.lower().replace("-", "_") in k][:5]
        raise UserError(
            f"unknown torchvision model {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
            + "; see torchvision.models.list_models()"
        )
    enum = get_model_weights(name)
    if choice == "random":
        weights = None
    else:
        try:
            weights = enum[choice]
        except KeyError:
            raise UserError(
                f"torchvision model {name!r} has no weights {choice!r}; expected random or one of "
                f"{', '.join(['DEFAULT'] + [w.name for w in enum])}"
            ) from None
    transform = (weights or enum.DEFAULT).transforms()
    label = f"torchvision:{name}" + (":random" if choice == "random" else "")
    if weights is None or not need_weights:
        return LoadedModel(get_model(name, weights=None).eval(), transform, label, f"torchvision:{name}")
    try:
        model = get_model(name, weights=weights)
    except Exception as e:  # noqa: BLE001 - the download's many failure types all mean the same here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot get the pretrained weights {weights} for torchvision:{name} ({reason}); torchvision downloads "
            f"them once into $TORCH_HOME (default ~/.cache/torch); without network use torchvision:{name}:random"
        ) from None
    return LoadedModel(model.eval(), transform, label, f"torchvision:{name}")


def load_model(spec: str, need_weights: bool = True, preprocess: str = "auto") -> LoadedModel:
    """Resolve a ``--model`` argument (see ``MODEL_HELP``). ``need_weights=False`` builds the
    architecture without fetching pretrained weights (for loading a quantized file into it)."""
    import torch

    import mpq
    from mpq.examples import assets

    if spec.startswith("torchvision:"):
        m = _torchvision_model(spec, need_weights)
    elif spec == "efficientnet_lite0":
        try:
            model = assets.load_efficientnet_lite0() if need_weights else mpq.io.build_architecture(spec)
        except (assets.AssetMissing, ValueError) as e:
            raise UserError(str(e)) from None
        m = LoadedModel(model, assets.efficientnet_lite_transform(), spec, spec)
    elif Path(spec).exists():
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--model {spec}: a folder, expected a model file")
        if mpq.io._is_torchscript(path):
            module = mpq.load(path)  # TorchScript: code and tensors, no architecture needed
            m = LoadedModel(module, imagenet_transform(), f"{path.name} (TorchScript)", None, "torchscript")
        else:
            meta = mpq.io.read_metadata(path)
            arch = meta.get("architecture")
            if not arch:
                raise UserError(
                    f"{path} was saved without an architecture; the CLI can only rebuild torchvision models and "
                    f"efficientnet_lite0 (load it in Python with mpq.load(path, model))"
                )
            base = load_model(arch, need_weights=False)
            m = LoadedModel(mpq.load(path, base.module), base.transform, f"{path.name} ({arch})", arch, "mpq")
    else:
        raise UserError(
            f"unknown model {spec!r}: expected torchvision:<name>[:random], efficientnet_lite0, or the path of a "
            f"saved model (no such file)"
        )
    if preprocess != "auto":
        m.transform = _preprocess(preprocess, m.transform)
    if not isinstance(m.module, (torch.nn.Module, torch.jit.ScriptModule)):  # pragma: no cover - defensive
        raise UserError(f"--model {spec}: not a model")
    return m


def make_config(config: str, *, avg_bits: Optional[float] = None, method: Optional[str] = None,
                seed: Optional[int] = None, **overrides: Any):
    """A ``QuantConfig`` from a preset name ("W4A8", ...) or a JSON file of QuantConfig fields,
    with overrides. Raises ``UserError`` with the problem."""
    from mpq.config import PRESETS, QuantConfig

    try:
        if config.upper() in PRESETS:
            cfg = QuantConfig.preset(config)
        elif config.endswith(".json") or Path(config).is_file():
            try:
                data = json.loads(Path(config).read_text())
            except OSError as e:
                raise UserError(f"cannot read config file {config}: {e.strerror or e}") from None
            except json.JSONDecodeError as e:
                raise UserError(f"config file {config} is not valid JSON ({e})") from None
            if not isinstance(data, dict):
                raise UserError(f"config file {config}: expected a JSON object of QuantConfig fields")
            cfg = QuantConfig.from_dict(data)
        else:
            raise UserError(
                f"unknown config {config!r}: expected a preset ({', '.join(PRESETS)}) or a JSON file of QuantConfig fields"
            )
        changes: Dict[str, Any] = dict(overrides)
        if avg_bits is not None:
            changes["avg_bits"] = avg_bits
        if method is not None:
            changes["method"] = method
        if seed is not None:
            changes["seed"] = seed
        return cfg.replace(**changes) if changes else cfg
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


# ---- data ----------------------------------------------------------------------------------------


def _folder(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} folder {path} does not exist")
    if not p.is_dir():
        raise UserError(f"{what} {path} is not a folder")
    return p


def image_files(folder: str, what: str = "calibration") -> List[Path]:
    """Every image file under ``folder`` (recursively: flat folders and ImageFolder layouts), sorted."""
    root = _folder(folder, what)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _class_index(folder_name: str, class_map: str, mapping: Optional[Dict[str, int]], k: int) -> int:
    if class_map == "sorted":
        return k
    if class_map == "index":
        m = re.search(r"(\d+)$", folder_name)
        if not m:
            raise UserError(f"--class-map index: class folder {folder_name!r} does not end with a class index")
        return int(m.group(1))
    assert mapping is not None
    if folder_name not in mapping:
        raise UserError(f"--class-map {class_map}: no class index for folder {folder_name!r}")
    return mapping[folder_name]


def labelled_images(folder: str, class_map: str = "sorted") -> Tuple[List[Tuple[Path, int]], int]:
    """(image, class index) for an ImageFolder layout (one sub-folder per class) and the number
    of class folders; ``class_map`` as in ``CLASS_MAP_HELP``."""
    root = _folder(folder, "data")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"data folder {folder} has no class folders: expected the ImageFolder layout DIR/<class>/<image>")
    mapping = None
    if class_map not in ("sorted", "index"):
        try:
            mapping = json.loads(Path(class_map).read_text())
        except OSError as e:
            raise UserError(f"--class-map: cannot read {class_map} ({e.strerror or e}); expected sorted, index or a JSON file") from None
        except json.JSONDecodeError as e:
            raise UserError(f"--class-map: {class_map} is not valid JSON ({e})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, int) and v >= 0 for v in mapping.values()):
            raise UserError(f"--class-map: {class_map} must hold a JSON object {{\"folder\": class index}}")
    samples = []
    for k, name in enumerate(classes):
        label = _class_index(name, class_map, mapping, k)
        samples += [(p, label) for p in sorted((root / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not samples:
        raise UserError(f"data folder {folder} holds no images in its class folders")
    return samples, len(classes)


class _Images:
    """Dataset of (path, label): returns (image tensor, label, error message or "")."""

    def __init__(self, samples: Sequence[Tuple[Path, int]], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                x = self.transform(im.convert("RGB"))
            return x, label, ""
        except Exception as e:  # noqa: BLE001 - reported in the main process as one line
            return torch.zeros(0), label, f"cannot read image {path}: {e}"


def _collate(items):
    import torch

    errors = [e for _, _, e in items if e]
    if errors:
        return None, None, errors[0]
    return torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items]), ""


def _progress(iterable, total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def _batches(samples, transform, batch_size: int, workers: int, desc: str, quiet: bool):
    """Yield (inputs, labels) batches, with a progress bar counting images."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Images(samples, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate)
    bar = _progress(None, len(samples), desc, quiet)
    try:
        for x, y, error in loader:
            if error:
                raise UserError(error)
            bar.update(x.shape[0])
            yield x, y
    finally:
        bar.close()


def calibration_batches(files: Sequence[Path], transform: Callable, count: int, seed: int, batch_size: int = 32,
                        workers: int = 0, quiet: bool = True):
    """A seeded random subset of ``count`` images (all of them when there are fewer),
    preprocessed with ``transform``: (list of [B, 3, H, W] batches, the chosen files)."""
    import torch

    if count < 1:
        raise UserError(f"--calib-images must be >= 1, got {count}")
    g = torch.Generator().manual_seed(seed)
    chosen = [files[i] for i in torch.randperm(len(files), generator=g)[:count].tolist()]
    batches = [x for x, _ in _batches([(p, -1) for p in chosen], transform, batch_size, workers, "calibration images", quiet)]
    return batches, chosen


@dataclass
class EvalData:
    """Labelled evaluation images; ``cached`` holds the preprocessed batches when they fit
    (small sets, evaluated many times by ``sweep``)."""

    samples: List[Tuple[Path, int]]
    transform: Callable
    num_classes_found: int
    batch_size: int = 64
    workers: int = 0
    cached: Optional[List[Tuple[Any, Any]]] = None

    def batches(self, quiet: bool, desc: str = "evaluating"):
        if self.cached is not None:
            bar = _progress(None, len(self.samples), desc, quiet)
            for x, y in self.cached:
                bar.update(x.shape[0])
                yield x, y
            bar.close()
            return
        yield from _batches(self.samples, self.transform, self.batch_size, self.workers, desc, quiet)

    def cache(self, quiet: bool, limit: int = 2048) -> None:
        if self.cached is None and len(self.samples) <= limit:
            self.cached = list(_batches(self.samples, self.transform, self.batch_size, self.workers, "loading images", quiet))


def evaluate(model, data: EvalData, quiet: bool = True, class_map: str = "sorted", desc: str = "evaluating") -> Dict[str, Any]:
    """Top-1 / top-5 of ``model`` on ``data``: {"top1", "top5", "correct1", "correct5", "images",
    "seconds", "predictions" (top-1 class per image, a tensor)}."""
    import torch

    t0 = time.perf_counter()
    c1 = c5 = n = 0
    preds = []
    with torch.no_grad():
        for x, y in data.batches(quiet, desc):
            out = model(x)
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise UserError("the model's output is not [N, classes] logits")
            if int(y.max()) >= out.shape[1]:
                raise UserError(
                    f"class index {int(y.max())} is out of range for a model with {out.shape[1]} outputs (see --class-map)"
                )
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            c1 += int((top[:, 0] == y).sum())
            c5 += int((top == y[:, None]).any(dim=1).sum())
            n += y.numel()
            preds.append(top[:, 0])
            classes = out.shape[1]
    if class_map == "sorted" and data.num_classes_found != classes:
        print(
            f"mpq: note: {data.num_classes_found} class folders for a model with {classes} outputs; with --class-map "
            f"sorted the k-th folder counts as class k (use --class-map index or a JSON map for a subset of classes)",
            file=sys.stderr,
        )
    return {"top1": c1 / n, "top5": c5 / n, "correct1": c1, "correct5": c5, "images": n,
            "seconds": time.perf_counter() - t0, "predictions": torch.cat(preds)}


def quantize_and_evaluate(model, calib: List[Any], cfg, data: Optional[EvalData], quiet: bool = True,
                          reference: Optional[Any] = None, class_map: str = "sorted") -> Tuple[Any, Dict[str, Any]]:
    """Quantize ``model`` with ``cfg`` on ``calib`` and evaluate it on ``data``: (qmodel, row)."""
    import mpq

    t0 = time.perf_counter()
    qmodel = mpq.quantize(model, calib, cfg)
    seconds = time.perf_counter() - t0
    report = mpq.last_report(qmodel)
    row: Dict[str, Any] = {
        "method": cfg.method,
        "config": cfg.to_dict(),
        "target_bits": cfg.budget_bits,
        "avg_bits": report.avg_bits,
        "size_mb": mpq.model_size_bytes(qmodel) / 1e6,
        "quantize_seconds": seconds,
        "float_layers": [n for n, _ in report.float_layers],
    }
    if data is not None:
        res = evaluate(qmodel, data, quiet, class_map, desc=f"evaluating {cfg.method}")
        preds = res.pop("predictions")
        row.update(res)
        row["eval_seconds"] = row.pop("seconds")
        if reference is not None:
            row["agreement"] = float((preds == reference).double().mean())
    return qmodel, row


# ---- commands ------------------------------------------------------------------------------------


def _eval_data(args, transform) -> EvalData:
    samples, found = labelled_images(args.data, args.class_map)
    return EvalData(samples, transform, found, args.batch_size, args.workers)


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


def cmd_quantize(args) -> int:
    import mpq

    cfg = make_config(args.config, avg_bits=args.avg_bits, method=args.method, seed=args.seed,
                      calib_batches=max(1, math.ceil(args.calib_images / args.batch_size)))
    files = image_files(args.calib)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out}: the folder {out.parent} does not exist")
    m = load_model(args.model, preprocess=args.preprocess)
    if m.kind != "float":
        raise UserError(f"--model {args.model} is a saved {m.kind} model; expected a float model "
                        f"(torchvision:<name> or efficientnet_lite0)")
    calib, chosen = calibration_batches(files, m.transform, args.calib_images, cfg.seed, args.batch_size, args.workers,
                                        args.quiet)
    _say(args, f"quantizing {m.label} ({cfg.method}, w_bits={cfg.w_bits}, a_bits={cfg.a_bits}, "
               f"{cfg.budget_bits:g} bits/weight budget) on {len(chosen)} calibration images ...")
    qmodel, row = quantize_and_evaluate(m.module, calib, cfg, None, args.quiet)
    mpq.save(qmodel, out, config=cfg, architecture=m.architecture)
    if args.summary:
        print(mpq.summary(qmodel))
    if args.plot:
        mpq.plot_allocation(qmodel, args.plot, title=f"{m.label}, {cfg.method}: points per output channel, "
                                                     f"{row['avg_bits']:.2f} bits per weight on average")
    print(f"quantized {m.label}: {len(mpq.last_report(qmodel).layers)} layers, {row['avg_bits']:.3f} bits per weight "
          f"on average, {row['size_mb']:.2f} MB, {row['quantize_seconds']:.1f} s")
    print(f"saved {out}")
    return 0


def _print_result(label: str, res: Dict[str, Any]) -> None:
    print(f"{label}: top-1 {100 * res['top1']:.2f}% ({res['correct1']}/{res['images']})  "
          f"top-5 {100 * res['top5']:.2f}% ({res['correct5']}/{res['images']})")


def cmd_eval(args) -> int:
    import mpq

    samples, found = labelled_images(args.data, args.class_map)  # fail before loading anything
    if args.quantized:
        if not Path(args.quantized).is_file():
            raise UserError(f"--quantized {args.quantized}: no such file")
        base = load_model(args.model, need_weights=False, preprocess=args.preprocess)
        if base.kind != "float":
            raise UserError(f"--model {args.model}: with --quantized, expected the float architecture")
        module = mpq.load(args.quantized, base.module)
        m = LoadedModel(module, base.transform, f"{base.label} + {Path(args.quantized).name}", base.architecture, "mpq")
    else:
        m = load_model(args.model, preprocess=args.preprocess)
    data = EvalData(samples, m.transform, found, args.batch_size, args.workers)
    res = evaluate(m.module, data, args.quiet, args.class_map)
    res.pop("predictions")
    _print_result(m.label, res)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": m.label, "data": str(args.data), **res, **_versions()}, indent=2))
    return 0


def _floats(text: str, what: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise UserError(f"{what}: expected at least one number")
    return vals


def sweep_configs(base: str, avg_bits: List[float], methods: List[str], seed: int, calib_batches: int) -> List[Any]:
    """One config per (method, average bits); single-point methods (RTN, ...) once, as their
    size does not follow the budget."""
    from mpq.methods import available, get_method

    configs = []
    for method in methods:
        if method not in available():
            raise UserError(f"--methods: unknown method {method!r}; expected some of {', '.join(available())}")
        if get_method(method).multipoint:
            configs += [make_config(base, avg_bits=b, method=method, seed=seed, calib_batches=calib_batches) for b in avg_bits]
        else:
            configs.append(make_config(base, method=method, seed=seed, calib_batches=calib_batches))
    return configs


def format_table(rows: List[Dict[str, Any]]) -> str:
    header = f"{'model':<24}{'avg bits':>9}{'size MB':>9}{'top-1':>9}{'top-5':>9}{'agree':>8}{'quant s':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        agree = f"{100 * r['agreement']:7.1f}%" if r.get("agreement") is not None else f"{'-':>8}"
        lines.append(f"{r['name']:<24}{r['avg_bits']:>9.3f}{r['size_mb']:>9.2f}{100 * r['top1']:>8.2f}%"
                     f"{100 * r['top5']:>8.2f}%{agree}{r.get('quantize_seconds', 0.0):>9.1f}")
    return "\n".join(lines)


def cmd_sweep(args) -> int:
    import mpq
    from mpq.methods import get_method
    from mpq.plots import plot_sweep

    bits = _floats(args.avg_bits, "--avg-bits")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    configs = sweep_configs(args.config, bits, methods, args.seed, max(1, math.ceil(args.calib_images / args.batch_size)))
    files = image_files(args.calib)
    labelled_images(args.data, args.class_map)  # check the folder before the long part
    m = load_model(args.model, preprocess=args.preprocess)
    if m.kind != "float":
        raise UserError(f"--model {args.model} is a saved {m.kind} model; expected a float model "
                        f"(torchvision:<name> or efficientnet_lite0)")
    calib, _ = calibration_batches(files, m.transform, args.calib_images, args.seed, args.batch_size, args.workers, args.quiet)
    data = _eval_data(args, m.transform)
    data.cache(args.quiet)
    fp = evaluate(m.module, data, args.quiet, args.class_map, desc="evaluating FP32")
    reference = fp.pop("predictions")
    n_weights = sum(p.numel() for p in m.module.parameters())
    rows = [{"name": "FP32", "method": "fp32", "avg_bits": 32.0, "size_mb": mpq.model_size_bytes(m.module) / 1e6,
             "agreement": 1.0, "quantize_seconds": 0.0, "n_params": n_weights, **fp}]
    for i, cfg in enumerate(configs):
        what = f"at {cfg.budget_bits:g} bits per weight" if get_method(cfg.method).multipoint else "(one point per channel)"
        _say(args, f"[{i + 1}/{len(configs)}] {cfg.method} {what} ...")
        _, row = quantize_and_evaluate(m.module, calib, cfg, data, args.quiet, reference, class_map="-")
        row["name"] = f"{cfg.method} {cfg.budget_bits:g}" if get_method(cfg.method).multipoint else cfg.method
        rows.append(row)
    print(f"{m.label}: {sum(b.shape[0] for b in calib)} calibration images, {len(data.samples)} evaluation images; "
          f"agree = top-1 agreement with FP32")
    print(format_table(rows))
    plot = args.plot or "sweep.png"
    plot_sweep([r for r in rows[1:]], plot, reference=rows[0],
               title=f"{m.label}: quality vs average bits per weight ({len(data.samples)} images)")
    print(f"plot: {plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": m.label, "rows": rows, **_versions()}, indent=2))
        print(f"json: {args.json}")
    return 0


def _versions() -> Dict[str, Any]:
    import platform

    import torch
    import torchvision

    import mpq

    return {"versions": {"mpq": mpq.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                         "python": platform.python_version(), "platform": platform.platform()},
            "build": mpq.build_info()}


def cmd_info(args) -> int:
    import mpq

    print(json.dumps(mpq.build_info(), indent=2))
    return 0


def cmd_demo(args) -> int:
    from mpq.examples.assets import AssetMissing
    from mpq.examples.demo import run_demo

    try:
        run_demo(json_path=args.json, seed=args.seed)
    except AssetMissing as e:
        print(f"mpq demo: {e}", file=sys.stderr)
        return 2
    return 0


# ---- argument parsing ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (and exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _int_at_least(lo: int):
    """An argparse type: an integer >= lo, with a one-line message otherwise."""
    what = "a positive integer" if lo == 1 else f"an integer >= {lo}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _common(p: argparse.ArgumentParser, calib: bool, data: bool) -> None:
    p.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
    if calib:
        p.add_argument("--calib", required=True, metavar="DIR",
                       help="folder of calibration images (any layout, searched recursively; e.g. ImageNet train/)")
        p.add_argument("--calib-images", type=_positive_int, default=1024, metavar="N",
                       help="number of calibration images, a seeded random subset of DIR (default 1024)")
    if data:
        p.add_argument("--data", required=True, metavar="DIR",
                       help="labelled images in the ImageFolder layout DIR/<class>/<image> (e.g. ImageNet val/)")
        p.add_argument("--class-map", default="sorted", metavar="MAP", help=CLASS_MAP_HELP)
    p.add_argument("--preprocess", default="auto", choices=("auto", "imagenet", "tflite"),
                   help="input preprocessing: auto (the model's own: torchvision weights' transforms, the TF Lite "
                        "scaling for efficientnet_lite0, imagenet for TorchScript files), imagenet (resize 256, "
                        "center crop 224, ImageNet mean/std) or tflite (same crop, pixels (255x-127)/128)")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="images per batch (default 32)")
    p.add_argument("--workers", type=_nonneg_int, default=min(4, os.cpu_count() or 1), metavar="W",
                   help="image decoding processes (default: min(4, CPUs); 0 decodes in the main process)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m mpq",
        description="Multipoint post-training quantization for PyTorch: quantize a trained image classifier to "
                    "low-bit weights without retraining, evaluate it, and compare methods.",
        epilog="Run 'python -m mpq COMMAND --help' for a command's options. Example: python -m mpq quantize "
               "--model efficientnet_lite0 --calib photos/ --config W4A8 --out effnet.mpq.safetensors",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every quantized layer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser(
        "quantize", help="quantize a model on calibration images and save it",
        description="Quantize a model's Conv2d and Linear layers (multipoint weights or a baseline method) using "
                    "calibration images, and save the result with mpq.save (load it with mpq.load or "
                    "'python -m mpq eval --model FILE').",
    )
    _common(q, calib=True, data=False)
    q.add_argument("--config", default="W4A8", metavar="CONFIG",
                   help="preset W4A8 (4-bit weights, 8-bit activations; default), W4A16, W3A16, W2A16, W8A8 "
                        "(A16: float activations), or a JSON file of QuantConfig fields")
    q.add_argument("--avg-bits", type=float, metavar="BITS",
                   help="average bits per weight for multipoint, codes and scales counted (default: w_bits + 0.5)")
    q.add_argument("--method", metavar="METHOD",
                   help="weight quantizer: multipoint (default) or rtn (round to nearest, one point per channel), "
                        "or another registered method")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration subset and of quantization (default 0)")
    q.add_argument("--out", required=True, metavar="PATH", help="file to write, e.g. model.mpq.safetensors")
    q.add_argument("--summary", action="store_true", help="print the per-layer table (points, bits, SQNR)")
    q.add_argument("--plot", metavar="PNG", help="also write a PNG of the points per channel of every layer")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser(
        "eval", help="top-1 / top-5 accuracy of a model on labelled images",
        description="Evaluate a float model, a saved quantized model (--model FILE), or a float architecture with "
                    "a quantized file loaded into it (--quantized FILE) on an ImageFolder of labelled images "
                    "(e.g. ImageNet val/), and print top-1 and top-5.",
    )
    _common(e, calib=False, data=True)
    e.add_argument("--quantized", metavar="FILE", help="a file written by 'quantize' (mpq.save), loaded into --model")
    e.add_argument("--json", metavar="PATH", help="also write the result and versions as JSON")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser(
        "sweep", help="quality vs average bits for several methods: a table and a PNG plot",
        description="Quantize one model at several average bit widths with several methods (same calibration "
                    "images), evaluate each, print a table and plot quality against average bits per weight.",
    )
    _common(s, calib=True, data=True)
    s.add_argument("--config", default="W4A8", metavar="CONFIG", help="the base preset or JSON config (default W4A8)")
    s.add_argument("--avg-bits", default="4.0,4.25,4.5,5", metavar="LIST",
                   help="average bits per weight to try, comma-separated (default 4.0,4.25,4.5,5); single-point "
                        "methods such as rtn run once")
    s.add_argument("--methods", default="rtn,multipoint", metavar="LIST", help="methods, comma-separated (default rtn,multipoint)")
    s.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    s.add_argument("--plot", metavar="PNG", help="where to write the plot (default sweep.png)")
    s.add_argument("--json", metavar="PATH", help="also write every row as JSON")
    s.set_defaults(func=cmd_sweep)

    d = sub.add_parser("demo", help="quantize EfficientNet-Lite0 offline and compare FP32, RTN and multipoint")
    d.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    d.add_argument("--seed", type=int, default=0, help="calibration crops and sampling seed (default 0)")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="print how the ops library was built")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command in ("demo", "info"):
        return args.func(args)
    try:
        return args.func(args)
    except UserError as e:
        msg = str(e)
    except ValueError as e:  # mpq's own argument and file checks (mpq.load, QuantConfig, ...)
        if args.verbose:
            raise
        msg = str(e)
    except OSError as e:  # unreadable or unwritable files
        if args.verbose:
            raise
        msg = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    except KeyboardInterrupt:
        print(f"mpq {args.command}: interrupted", file=sys.stderr)
        return 130
    first = " ".join(msg.split())  # one line
    print(f"mpq {args.command}: {first}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
