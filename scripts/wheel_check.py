"""mpq as a user gets it from its wheel: run by scripts/wheel_check.sh inside a fresh virtual
environment that holds only the wheel and the dependencies it declares (no source tree on sys.path).

    python -I wheel_check.py SOURCE_ROOT

Quantizes a torchvision ResNet-18 (random weights, seed 0) to W4A8 on random calibration batches,
saves and loads it (mpq.save / mpq.load: safetensors must have come with the wheel), scripts it
with TorchScript and runs the scripted model from a file, and finds the bundled Fashion-MNIST
checkpoint inside the installed package. Prints what it measures; any failed check raises.
"""

import importlib.metadata
import sys
import tempfile
import time
import warnings
from pathlib import Path

start = time.perf_counter()
warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)

import torch  # noqa: E402
import torchvision  # noqa: E402

import mpq  # noqa: E402


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def main() -> None:
    source_root = Path(sys.argv[1]).resolve()
    package = Path(mpq.__file__).resolve().parent
    # The installed package, not the source tree.
    assert package.is_relative_to(Path(sys.prefix).resolve()), f"mpq imported from {package}, not from {sys.prefix}"
    assert not package.is_relative_to(source_root), f"mpq imported from the source tree: {package}"
    on_path = [p for p in sys.path if p and Path(p).resolve().is_relative_to(source_root)]
    assert not on_path, f"the source tree is on sys.path: {on_path}"
    version = importlib.metadata.version("mpq")
    assert version == mpq.__version__, f"wheel metadata says {version}, mpq.__version__ {mpq.__version__}"
    info = mpq.build_info()
    assert Path(info["library_path"]).resolve().is_relative_to(package), info["library_path"]
    assert info["mpq_version"] == version, (
        f"libmpq_ops.so was built as mpq {info['mpq_version']}, the wheel is {version}"
    )
    cuda = f"CUDA kernels for {info['cuda_architectures']}" if info["cuda_kernels"] else "no CUDA kernels"
    print(f"mpq {version} from {package}; torch {torch.__version__}; {cuda}")

    # Package data: the Fashion-MNIST ResNet checkpoint and its description (mpq/data/ or mpq/examples/data/).
    found = sorted(package.rglob("fashion_resnet14.pt"))
    assert len(found) == 1, f"expected one fashion_resnet14.pt inside {package}, found {found}"
    assert found[0].with_suffix(".json").is_file(), f"{found[0].with_suffix('.json')} is missing"
    state = torch.load(found[0], map_location="cpu", weights_only=True)
    n_params = sum(t.numel() for t in state.values() if t.is_floating_point())
    assert len(state) > 0 and n_params > 100_000, (len(state), n_params)
    print(f"checkpoint {found[0].relative_to(package.parent)}: {len(state)} tensors, {n_params} float values")

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    calib = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    x = torch.randn(4, 3, 64, 64)
    t0 = time.perf_counter()
    qmodel = mpq.quantize(model, calib, "W4A8")
    t_quantize = time.perf_counter() - t0
    n_layers = sum(isinstance(m, mpq.nn.MultipointConv2d | mpq.nn.MultipointLinear) for m in qmodel.modules())
    assert n_layers == 21, f"expected ResNet-18's 20 convolutions and its Linear quantized, got {n_layers}"
    with torch.no_grad():
        y_float = model(x)
        y = qmodel(x)
    assert torch.isfinite(y).all()
    rel = ((y - y_float).norm() / y_float.norm()).item()
    assert rel < 0.5, f"W4A8 output far from the float model's: relative L2 {rel:.3f}"
    print(f"quantize W4A8: {n_layers} multipoint layers in {t_quantize:.1f} s; relative L2 to float {rel:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet18.mpq.safetensors"
        mpq.save(qmodel, path)
        loaded = mpq.load(path, torchvision.models.resnet18(weights=None))
        with torch.no_grad():
            d_load = max_abs(loaded(x), y)
        assert d_load == 0.0, f"mpq.load: max abs difference {d_load} to the saved model"
        print(f"mpq.save / mpq.load: {path.stat().st_size / 1e6:.2f} MB, max abs difference {d_load}")

        scripted_path = Path(tmp) / "resnet18_mpq.pt"
        torch.jit.script(qmodel).save(str(scripted_path))
        scripted = torch.jit.load(str(scripted_path))
        with torch.no_grad():
            d_script = max_abs(scripted(x), y)
        # The same kernels run: equal up to float32 rounding where TorchScript orders an op differently
        # (1e-5 of the largest logit, the bound of the C++ deployment test).
        bound = 1e-5 * y.abs().max().item()
        assert d_script <= bound, f"TorchScript: max abs difference {d_script} > {bound}"
        print(f"torch.jit.script -> save -> load: max abs difference {d_script:.3g} (bound {bound:.3g})")

    print(f"wheel check passed in {time.perf_counter() - start:.1f} s (imports included)")


if __name__ == "__main__":
    main()
