"""Plain-dict surgery on experiment configs, shared by the tools that run ``fit`` many times (compare, stages)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml


def deep_merge(base: dict, extra: dict) -> dict:
    """A copy of ``base`` with ``extra`` merged in: nested dicts key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def section(config: dict, key: str) -> dict:
    """``config[key]`` (created if missing), or its ``init_args`` when it is written as ``class_path``/``init_args``."""
    value = config.get(key) or {}
    config[key] = value
    return value.setdefault("init_args", {}) if "class_path" in value else value


def read_base(base: str | dict, config_path: Path) -> dict:
    """The experiment config a tool config names: inline, or a path relative to the working directory or to
    the tool config's own folder."""
    if isinstance(base, dict):
        return base
    candidates = [Path(base), config_path.parent / base]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"{config_path}: base config {base!r} not found (looked at {[str(p) for p in candidates]})"
        )
    return yaml.safe_load(found.read_text()) or {}
