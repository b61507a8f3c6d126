"""Quantization configs from the command line: a preset name or a JSON file, with overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mpq.cli.errors import UserError

__all__ = ["make_config", "sweep_configs"]


def make_config(
    config: str, *, avg_bits: float | None = None, method: str | None = None, seed: int | None = None, **overrides: Any
):
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
        changes: dict[str, Any] = dict(overrides)
        if avg_bits is not None:
            changes["avg_bits"] = avg_bits
        if method is not None:
            changes["method"] = method
        if seed is not None:
            changes["seed"] = seed
        return cfg.replace(**changes) if changes else cfg
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def sweep_configs(base: str, avg_bits: list[float], methods: list[str], seed: int, calib_batches: int) -> list[Any]:
    """One config per (method, average bits); single-point methods (RTN, ...) once, as their
    size does not follow the budget."""
    from mpq.methods import available, get_method

    configs = []
    for method in methods:
        if method not in available():
            raise UserError(f"--methods: unknown method {method!r}; expected some of {', '.join(available())}")
        if get_method(method).multipoint:
            configs += [
                make_config(base, avg_bits=b, method=method, seed=seed, calib_batches=calib_batches) for b in avg_bits
            ]
        else:
            configs.append(make_config(base, method=method, seed=seed, calib_batches=calib_batches))
    return configs
