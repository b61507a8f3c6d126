"""The models ``--model`` names: torchvision's zoo, the bundled EfficientNet-Lite0
(``mpq.examples.assets``), saved quantized files and TorchScript files; and their preprocessing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpq.cli.errors import UserError

__all__ = ["MODEL_HELP", "LoadedModel", "imagenet_transform", "load_model"]

MODEL_HELP = (
    "the model: 'torchvision:<name>' (ImageNet-pretrained weights through torchvision's weights API, "
    "downloaded once into $TORCH_HOME; 'torchvision:<name>:random' for random weights, "
    "'torchvision:<name>:<WEIGHTS>' e.g. IMAGENET1K_V2 for other weights), 'efficientnet_lite0' (bundled "
    "offline, ImageNet-pretrained), or the path of a saved quantized model (mpq.save) or a TorchScript file"
)


@dataclass
class LoadedModel:
    module: Any  # torch.nn.Module or TorchScript module, eval mode
    transform: Callable  # PIL image -> float tensor [3, H, W]
    label: str  # for messages and tables
    architecture: str | None = None  # what mpq.save records, to rebuild the float model
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
        raise UserError(
            f"bad model {spec!r}: expected torchvision:<name>, torchvision:<name>:random or torchvision:<name>:<WEIGHTS>"
        )
    name = parts[1]
    choice = parts[2] if len(parts) == 3 else "DEFAULT"
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = [k for k in known if name.lower().replace("-", "_") in k][:5]
        raise UserError(
            f"unknown torchvision model {name!r}"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
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
        if mpq.io.is_torchscript_file(path):
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
