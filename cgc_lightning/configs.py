"""Plain-dict surgery on experiment configs, shared by the tools that run ``fit`` many times (compare, stages, grid)."""

from __future__ import annotations

import copy
from dataclasses import fields
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
    return yaml.safe_load(find_base(base, config_path).read_text()) or {}


def find_base(base: str, config_path: Path) -> Path:
    """The file of a tool config's ``base``: relative to the working directory or to the tool config's folder."""
    candidates = [Path(base), config_path.parent / base]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"{config_path}: base config {base!r} not found (looked at {[str(p) for p in candidates]})"
        )
    return found


def read_tool_config(path: Path, cls: type, kind: str) -> dict:
    """The YAML mapping of a tool config (``kind``: compare, grid, stages), keys checked against ``cls``'s fields."""
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; a {kind} config has {sorted(known)}")
    return raw
