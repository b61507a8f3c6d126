"""Images from folders: any folder of images for calibration (a seeded subset), ImageFolder
layouts of labelled images for evaluation (``EvalData``), decoded in batches with a progress bar."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpq.cli.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "CLASS_MAP_HELP", "image_files", "labelled_images", "calibration_batches", "EvalData"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASS_MAP_HELP = (
    "how class folders map to the model's class indices: 'sorted' (default: the k-th folder in sorted order is "
    "class k, right for the standard ImageNet validation folder with its 1000 wnid folders n01440764 ...), "
    "'index' (each folder name ends with its class index, e.g. 243 or n00000243: for a subset of classes), "
    'or a JSON file {"folder name": class index}'
)


def _folder(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} folder {path} does not exist")
    if not p.is_dir():
        raise UserError(f"{what} {path} is not a folder")
    return p


def image_files(folder: str, what: str = "calibration") -> list[Path]:
    """Every image file under ``folder`` (recursively: flat folders and ImageFolder layouts), sorted."""
    root = _folder(folder, what)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _class_index(folder_name: str, class_map: str, mapping: dict[str, int] | None, k: int) -> int:
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


def labelled_images(folder: str, class_map: str = "sorted") -> tuple[list[tuple[Path, int]], int]:
    """(image, class index) for an ImageFolder layout (one sub-folder per class) and the number
    of class folders; ``class_map`` as in ``CLASS_MAP_HELP``."""
    root = _folder(folder, "data")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(
            f"data folder {folder} has no class folders: expected the ImageFolder layout DIR/<class>/<image>"
        )
    mapping = None
    if class_map not in ("sorted", "index"):
        try:
            mapping = json.loads(Path(class_map).read_text())
        except OSError as e:
            raise UserError(
                f"--class-map: cannot read {class_map} ({e.strerror or e}); expected sorted, index or a JSON file"
            ) from None
        except json.JSONDecodeError as e:
            raise UserError(f"--class-map: {class_map} is not valid JSON ({e})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, int) and v >= 0 for v in mapping.values()):
            raise UserError(f'--class-map: {class_map} must hold a JSON object {{"folder": class index}}')
    samples = []
    for k, name in enumerate(classes):
        label = _class_index(name, class_map, mapping, k)
        samples += [
            (p, label) for p in sorted((root / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        ]
    if not samples:
        raise UserError(f"data folder {folder} holds no images in its class folders")
    return samples, len(classes)


class _Images:
    """Dataset of (path, label): returns (image tensor, label, error message or "")."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable):
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

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit="img",
        file=sys.stderr,
        leave=False,
        disable=quiet or not sys.stderr.isatty(),
    )


def _batches(samples, transform, batch_size: int, workers: int, desc: str, quiet: bool):
    """Yield (inputs, labels) batches, with a progress bar counting images."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _Images(samples, transform), batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate
    )
    bar = _progress(None, len(samples), desc, quiet)
    try:
        for x, y, error in loader:
            if error:
                raise UserError(error)
            bar.update(x.shape[0])
            yield x, y
    finally:
        bar.close()


def calibration_batches(
    files: Sequence[Path],
    transform: Callable,
    count: int,
    seed: int,
    batch_size: int = 32,
    workers: int = 0,
    quiet: bool = True,
):
    """A seeded random subset of ``count`` images (all of them when there are fewer),
    preprocessed with ``transform``: (list of [B, 3, H, W] batches, the chosen files). Under a
    process group (``mpq.distributed``) only this rank's batches are read: global batches
    r, r + N, ... of the same subset, as ``mpq.quantize`` counts them."""
    import torch

    if count < 1:
        raise UserError(f"--calib-images must be >= 1, got {count}")
    g = torch.Generator().manual_seed(seed)
    chosen = [files[i] for i in torch.randperm(len(files), generator=g)[:count].tolist()]
    mine = my_batches([(p, -1) for p in chosen], batch_size)
    batches = [x for x, _ in _batches(mine, transform, batch_size, workers, "calibration images", quiet)]
    return batches, chosen


def my_batches(samples: Sequence, batch_size: int) -> list:
    """The samples of this rank's batches (global batches r, r + N, ... of ``batch_size``
    consecutive samples), in order: batching them again gives exactly those batches."""
    from mpq.distributed import world

    rank, size = world()
    if size == 1:
        return list(samples)
    return [
        s
        for i in range(rank, math.ceil(len(samples) / batch_size), size)
        for s in samples[i * batch_size : (i + 1) * batch_size]
    ]


@dataclass
class EvalData:
    """Labelled evaluation images; ``cached`` holds the preprocessed batches when they fit
    (small sets, evaluated many times by ``sweep``)."""

    samples: list[tuple[Path, int]]
    transform: Callable
    num_classes_found: int
    batch_size: int = 64
    workers: int = 0
    cached: list[tuple[Any, Any]] | None = None

    def batches(self, quiet: bool, desc: str = "evaluating"):
        """This rank's batches: all of them alone, global batches r, r + N, ... of N ranks (every
        image in exactly one rank's batches)."""
        from mpq.distributed import world

        rank, size = world()
        if self.cached is not None:
            mine = self.cached[rank::size]
            bar = _progress(None, sum(x.shape[0] for x, _ in mine), desc, quiet)
            for x, y in mine:
                bar.update(x.shape[0])
                yield x, y
            bar.close()
            return
        mine = my_batches(self.samples, self.batch_size)
        yield from _batches(mine, self.transform, self.batch_size, self.workers, desc, quiet)

    def cache(self, quiet: bool, limit: int = 2048) -> None:
        if self.cached is None and len(self.samples) <= limit:
            self.cached = list(
                _batches(self.samples, self.transform, self.batch_size, self.workers, "loading images", quiet)
            )
