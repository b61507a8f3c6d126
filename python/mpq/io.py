"""``mpq.save`` / ``mpq.load``: a quantized model as one safetensors file plus JSON metadata.

A quantized model is the user's ``nn.Module`` with ``MultipointConv2d`` / ``MultipointLinear``
swapped in, so its class is the user's: pickling it would tie the file to that code. The file
holds instead every tensor of ``qmodel.state_dict()`` (the multipoint buffers and all other
parameters and buffers) and, in the safetensors header's ``__metadata__["mpq"]``, a JSON object:

- ``format`` ("mpq"), ``format_version``, ``mpq_version``, ``torch_version``;
- ``config`` (the ``QuantConfig`` as a dict, or null when unknown) and ``seed``;
- ``architecture``: how to rebuild the float model without the user's help
  (``"torchvision:<name>"``, ``"efficientnet_lite0"``), or null;
- ``layers``: per quantized layer its spec (``to_spec``, owned by each layer type of ``mpq.nn``:
  ``kind`` ("linear", "conv", "codebook_linear", "codebook_conv"), constructor arguments,
  ``output_sqnr_db``, whether ``bias`` / ``act_qparams`` exist);
- ``folded_batchnorms``: the BatchNorms that ``mpq.quantize`` folded into their convolutions
  (``nn.Identity`` in the quantized model; from its ``QuantReport``, or from the file it was
  loaded from). Files written before this key hold ``identity_modules`` (every ``nn.Identity``
  of the quantized model), which ``load`` reads the same way;
- ``tensors_sha256``: a checksum of all tensors, so a damaged file is refused.

``load(path, model)`` rebuilds the quantized model on a copy of the float architecture ``model``:
it swaps in the multipoint layers named in the metadata, replaces the folded BatchNorms by
``nn.Identity``, and loads every tensor after checking names, shapes and dtypes. The round trip
is bit-exact.

The architecture-free format is TorchScript: ``torch.jit.script(qmodel).save("model.pt")`` holds
code and tensors and loads with ``torch.jit.load`` (or ``mpq.load("model.pt")``) in Python, or in
C++ with LibTorch and ``libmpq_ops.so``, with no model class at all.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io as _io
import json
import os
import struct
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.config import QuantConfig
from mpq.fold import set_submodule
from mpq.nn.modules import MultipointLayer
from mpq.pipeline.report import last_report
from mpq.version import __version__

__all__ = ["save", "load", "read_metadata", "build_architecture", "FORMAT_VERSION"]

FORMAT = "mpq"
# 2: multipoint layers hold the stored form (point_codes, point_scales: only the points in use,
# bit-packed codes); 1: codes [C, P, ...] int8 and scales [C, P], converted when loaded.
FORMAT_VERSION = 2
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

PathLike = str | os.PathLike

# Metadata of the models this process loaded, so that saving them again keeps their config.
_LOADED: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


# ---- architectures -------------------------------------------------------------------------------


def build_architecture(spec: str) -> nn.Module:
    """The float model named by ``spec``, in eval mode, with untrained weights (``mpq.load``
    overwrites every tensor): ``"torchvision:<name>"`` or ``"efficientnet_lite0"``."""
    if not isinstance(spec, str):
        raise ValueError(f"mpq.load: expected the architecture to be a string, got {spec!r}")
    if spec == "efficientnet_lite0":
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ValueError(
                "mpq.load: the architecture efficientnet_lite0 needs `pip install efficientnet-lite-pytorch`"
            ) from None
        with contextlib.redirect_stdout(_io.StringIO()):  # the package prints on construction
            return EfficientNet.from_name("efficientnet-lite0").eval()
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":")[1]
        if name not in torchvision.models.list_models():
            raise ValueError(f"mpq.load: unknown torchvision model {name!r} (see torchvision.models.list_models())")
        return torchvision.models.get_model(name, weights=None).eval()
    raise ValueError(f"mpq.load: unknown architecture {spec!r}; expected 'torchvision:<name>' or 'efficientnet_lite0'")


# ---- save ----------------------------------------------------------------------------------------


def check_output_path(where: str, path: PathLike) -> None:
    """A file path whose folder exists, checked before any work."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: expected path to be a str or os.PathLike, got {type(path).__name__}")
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{where}: expected path in an existing folder, {folder} does not exist")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}|{str(t.dtype)}|{list(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def save(
    qmodel: nn.Module,
    path: PathLike,
    *,
    config: QuantConfig | None = None,
    architecture: str | None = None,
) -> None:
    """Save a quantized model to ``path`` (safetensors tensors + JSON metadata; see the module doc).

    Args:
        qmodel: the output of ``mpq.quantize`` (or of ``mpq.load``).
        path: the file to write (conventionally ``*.mpq.safetensors``); written atomically.
        config: the ``QuantConfig`` to record; default: the one ``mpq.quantize`` used, when this
            process quantized (or loaded) ``qmodel``.
        architecture: ``"torchvision:<name>"`` or ``"efficientnet_lite0"`` when ``qmodel`` is one
            of those, so that ``mpq.load(path)`` can rebuild it without a model.

    Loading needs the float architecture (``mpq.load(path, model)``) unless ``architecture`` is
    given; ``torch.jit.script(qmodel).save(path)`` is the format that needs no model class.
    """
    from safetensors.torch import save_file

    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"mpq.save: expected qmodel to be a torch.nn.Module, got {type(qmodel).__name__}")
    if isinstance(qmodel, torch.jit.ScriptModule):
        raise TypeError("mpq.save: qmodel is a TorchScript module; save it with its own .save(path)")
    check_output_path("mpq.save", path)
    layers = {name: m.to_spec() for name, m in qmodel.named_modules() if isinstance(m, MultipointLayer)}
    if not layers:
        raise ValueError("mpq.save: qmodel has no multipoint layer; expected the output of mpq.quantize")
    previous = _LOADED.get(qmodel, {})
    report = last_report(qmodel)
    if report is not None:
        folded = list(report.folded_batchnorm_names)
    elif previous.get("folded_batchnorms") is not None:
        folded = list(previous["folded_batchnorms"])
    else:  # not quantized or loaded in this process (e.g. a deepcopy): load only swaps BatchNorms
        folded = [n for n, m in qmodel.named_modules() if type(m) is nn.Identity]
    if config is None:
        if report is not None:
            config = report.config
        elif previous.get("config") is not None:
            config = QuantConfig.from_dict(previous["config"])
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"mpq.save: expected config to be a QuantConfig, got {type(config).__name__}")
    if architecture is None:
        architecture = previous.get("architecture")
    if architecture is not None:
        _check_architecture_spec(architecture)

    tensors: dict[str, torch.Tensor] = {}
    seen_storage = set()
    for key, value in qmodel.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"mpq.save: state entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storage:  # tied or aliasing tensors: safetensors stores copies
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mpq_version": __version__,
        "torch_version": torch.__version__,
        "config": config.to_dict() if config is not None else None,
        "seed": config.seed if config is not None else None,
        "architecture": architecture,
        "model_class": f"{type(qmodel).__module__}.{type(qmodel).__qualname__}",
        "layers": layers,
        "folded_batchnorms": folded,
        "tensors_sha256": _checksum(tensors),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"mpq": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_architecture_spec(spec: str) -> None:
    if not isinstance(spec, str) or not (spec == "efficientnet_lite0" or spec.startswith("torchvision:")):
        raise ValueError(
            f"mpq.save: expected architecture to be 'torchvision:<name>' or 'efficientnet_lite0', got {spec!r}"
        )


# ---- load ----------------------------------------------------------------------------------------


def is_torchscript_file(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip file) rather than an mpq.save file."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"  # TorchScript archives are zip files


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors header of ``path`` with the mpq metadata parsed, after checking that the
    file is complete."""
    where = f"mpq.load: {path}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{where}: the file is truncated or not an mpq file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise ValueError(f"{where}: not an mpq file (no safetensors header)")
            raw = f.read(n)
    except OSError as e:
        raise ValueError(f"{where}: cannot read the file ({e.strerror or e})") from None
    if len(raw) < n:
        raise ValueError(f"{where}: the file is truncated (its header needs {n} bytes, {len(raw)} are there)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: the file's JSON header is corrupted ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: the file's JSON header is corrupted (not an object)")
    meta_raw = (header.get("__metadata__") or {}).get("mpq") if isinstance(header.get("__metadata__"), dict) else None
    if meta_raw is None:
        raise ValueError(f"{where}: not an mpq file (a safetensors file without mpq metadata)")
    try:
        meta = json.loads(meta_raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: the mpq metadata is corrupted ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: the mpq metadata is corrupted (no 'format': 'mpq')")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{where}: the mpq metadata is corrupted (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: written by a newer mpq ({meta.get('mpq_version')}, file format version {version}); "
            f"this mpq reads format versions up to {FORMAT_VERSION}: upgrade mpq"
        )
    data_size = size - 8 - n
    try:
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ValueError(f"{where}: the file's JSON header is corrupted (bad tensor entries)") from None
    if end > data_size:
        raise ValueError(f"{where}: the file is truncated (tensor data needs {end} bytes, {data_size} are there)")
    for key in ("layers",):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{where}: the mpq metadata is corrupted (no {key!r} object)")
    for key in ("folded_batchnorms", "identity_modules"):  # the second in files written before the first
        names = meta.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}: the mpq metadata is corrupted ({key!r} is not a list of names)")
    return meta


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The JSON metadata of an mpq file (format and versions, config, seed, layers), without
    loading its tensors. Raises ``ValueError`` for a file that is not a complete mpq file."""
    return _read_header(Path(path))


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        return (
            f"{type(m).__name__}({m.in_channels}, {m.out_channels}, kernel_size={tuple(m.kernel_size)}, "
            f"groups={m.groups})"
        )
    if isinstance(m, nn.Linear):
        return f"{type(m).__name__}({m.in_features}, {m.out_features})"
    return type(m).__name__


def _check_float_layer(name: str, m: nn.Module, spec: dict[str, Any], model_class: str) -> None:
    """The float layer that a multipoint layer replaces must have its shape."""
    if "in_channels" in spec:  # a convolution's spec (multipoint or codebook)
        ok = isinstance(m, nn.Conv2d) and (
            [m.in_channels, m.out_channels, list(m.kernel_size), m.groups]
            == [spec.get("in_channels"), spec.get("out_channels"), spec.get("kernel_size"), spec.get("groups")]
        )
        saved = (
            f"a conv {spec.get('in_channels')} -> {spec.get('out_channels')}, kernel_size "
            f"{tuple(spec.get('kernel_size') or ())}, groups={spec.get('groups')}"
        )
    else:
        ok = isinstance(m, nn.Linear) and [m.in_features, m.out_features] == [
            spec.get("in_features"),
            spec.get("out_features"),
        ]
        saved = f"a linear {spec.get('in_features')} -> {spec.get('out_features')}"
    if not ok:
        raise ValueError(
            f"mpq.load: layer {name!r} is {_describe(m)} in the model but the file has {saved}; "
            f"expected the float architecture the file was saved from ({model_class})"
        )


def _list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load(path: PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a quantized model saved by ``mpq.save``.

    Args:
        path: an mpq file, or a TorchScript archive (``torch.jit.script(qmodel).save(path)``),
            which is returned by ``torch.jit.load`` (then ``model`` must be None).
        model: the float architecture the file was quantized from (e.g. a fresh
            ``torchvision.models.resnet18()``; its weights do not matter, every tensor is loaded).
            None: rebuilt from the metadata's ``architecture`` when the file has one.
            ``model`` itself is not modified: the quantized model is built on a copy.

    Returns:
        The quantized model in eval mode, bit-identical to the saved one.

    Raises:
        ValueError: the file is truncated, corrupted, written by a newer mpq, or does not fit
            ``model`` (missing or unexpected tensors, other shapes or dtypes); ``model`` is then
            left untouched.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"mpq.load: expected path to be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"mpq.load: {path}: no such file")
    if is_torchscript_file(path):
        if model is not None:
            raise ValueError(
                f"mpq.load: {path} is a TorchScript archive, which holds its own architecture; "
                f"call mpq.load(path) without model"
            )
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"mpq.load: {path}: cannot load the TorchScript archive ({first})") from None
    meta = _read_header(path)
    if model is None:
        if not meta.get("architecture"):
            raise ValueError(
                f"mpq.load: {path} was saved without an architecture; pass the float model: mpq.load(path, model)"
            )
        model = build_architecture(meta["architecture"])
        owned = True
    elif not isinstance(model, nn.Module):
        raise TypeError(f"mpq.load: expected model to be a torch.nn.Module, got {type(model).__name__}")
    else:
        owned = False
    model_class = meta.get("model_class", "?")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("mpq.load: expected model to be the float nn.Module, got a TorchScript module")

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"mpq.load: {path}: cannot read the tensors ({e})") from None
    if meta.get("tensors_sha256") is not None and _checksum(tensors) != meta["tensors_sha256"]:
        raise ValueError(f"mpq.load: {path}: the tensor data is corrupted (checksum mismatch)")

    # Build the quantized model on a copy, so that a mismatch leaves the user's model as it was.
    target = model if owned else copy.deepcopy(model)
    modules = dict(target.named_modules())
    for name, spec in meta["layers"].items():
        if name not in modules or name == "":
            raise ValueError(
                f"mpq.load: the file has a multipoint layer {name!r} that the model lacks; "
                f"expected the float architecture the file was saved from ({model_class})"
            )
        old = modules[name]
        q = MultipointLayer.from_spec(spec, name, "mpq.load")  # checks the metadata first
        _check_float_layer(name, old, spec, model_class)
        weight = getattr(old, "weight", None)
        if isinstance(weight, torch.Tensor):
            q = q.to(weight.device)
        set_submodule(target, name, q)
        _stored_form_from_file(name, q, tensors, meta["format_version"])
    modules = dict(target.named_modules())
    folded = []
    for name in meta.get("folded_batchnorms", meta.get("identity_modules", [])):
        m = modules.get(name)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            set_submodule(target, name, nn.Identity())
            folded.append(name)
    # A conv or linear kept in float may have gained a bias from BatchNorm folding.
    modules = dict(target.named_modules())
    for key in tensors:
        mod_name, _, attr = key.rpartition(".")
        m = modules.get(mod_name)
        if attr == "bias" and isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is None:
            bias = torch.zeros_like(tensors[key], device=m.weight.device)
            m.bias = nn.Parameter(bias, requires_grad=m.weight.requires_grad)

    expected = target.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"tensors missing from the file: {_list(missing)}")
        if unexpected:
            parts.append(f"tensors the model has no place for: {_list(unexpected)}")
        raise ValueError(
            f"mpq.load: {path} does not fit the model ({'; '.join(parts)}); expected the float architecture "
            f"the file was saved from ({model_class})"
        )
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} {tensors[k].dtype}, model {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if tuple(v.shape) != tuple(tensors[k].shape) or v.dtype != tensors[k].dtype
    ]
    if wrong:
        raise ValueError(
            f"mpq.load: {path} does not fit the model (other shapes or dtypes: {'; '.join(wrong[:3])}"
            f"{f' and {len(wrong) - 3} more' if len(wrong) > 3 else ''}); expected the float architecture "
            f"the file was saved from ({model_class})"
        )
    target.load_state_dict(tensors, strict=True)
    target.eval()
    loaded_meta = dict(meta)
    loaded_meta["folded_batchnorms"] = folded
    _LOADED[target] = loaded_meta
    return target


def _stored_form_from_file(name: str, q: MultipointLayer, tensors: dict[str, torch.Tensor], version: int) -> None:
    """Fits layer ``q`` to the file's stored form: version-1 files hold codes [C, P, ...] and
    scales [C, P], packed here; the number of stored points (rows of point_codes) is the file's."""
    codes, scales, counts = f"{name}.codes", f"{name}.scales", f"{name}.num_points"
    if version == 1 and codes in tensors and scales in tensors and counts in tensors:
        c, s, n = tensors.pop(codes), tensors.pop(scales), tensors[counts]
        if c.dtype != torch.int8 or s.shape != c.shape[:2] or n.shape != c.shape[:1]:
            raise ValueError(
                f"mpq.load: layer {name!r}: the version-1 codes, scales and num_points do not fit each other"
            )
        keep = torch.arange(c.shape[1])[None, :] < n.long()[:, None]
        tensors[f"{name}.point_codes"], tensors[f"{name}.point_scales"] = torch.ops.mpq.pack_points(
            c, torch.where(keep, s.float(), torch.zeros(())), n.int(), q.w_bits
        )
    for buf in ("point_codes", "point_scales"):
        t, mine = tensors.get(f"{name}.{buf}"), getattr(q, buf)
        if t is not None and t.dim() == mine.dim() and t.shape[1:] == mine.shape[1:]:
            setattr(q, buf, torch.empty(t.shape, dtype=mine.dtype, device=mine.device))


def loaded_metadata(model: nn.Module) -> dict[str, Any] | None:
    """The metadata of the file ``model`` was loaded from in this process (plus
    ``folded_batchnorms``: the BatchNorms ``load`` replaced by Identity), or None."""
    return _LOADED.get(model)
