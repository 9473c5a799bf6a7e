"""Experiment configs as plain dicts, shared by the tools that run ``fit`` many times (compare, stages, grid): reading
a tool config and its base, and overrides by dotted key, as on the LightningCLI command line (``trainer.max_steps``,
``model.adapter.r``, ``data.tasks.1.prompt``), in one syntax for every tool (:func:`dotted`, :func:`resolve`)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml


def dotted(overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """``overrides`` as ``{dotted key: value}``, the one override syntax of every tool config.

    The nested form earlier compare and stages configs used (``{trainer: {max_steps: 100}}``, merged key by key) is
    still read: an undotted key whose value is a mapping stands for its leaves (``{trainer.max_steps: 100}``), with a
    warning that names ``where`` it was. A dotted key's value is set whole, mapping or not
    (``data.clusters: {judge: [plausible, qa]}``).
    """
    out: dict[str, Any] = {}
    nested = []
    for key, value in overrides.items():
        if "." not in str(key) and isinstance(value, dict) and value:
            nested.append(key)
            out.update(_leaves(str(key), value))
        else:
            out[key] = value
    if nested:
        example = next(iter(_leaves(nested[0], overrides[nested[0]])))
        warnings.warn(
            f"{where}: nested overrides ({', '.join(map(str, nested))}: {{...}}) are deprecated; write dotted keys, "
            f"as on the command line, e.g. `{example}: ...`",
            FutureWarning,
            stacklevel=2,
        )
    return out


def _leaves(prefix: str, value: Any) -> dict[str, Any]:
    """``{a: {b: 1, c: {}}}`` under ``prefix`` as ``{prefix.a.b: 1}``: what merging it key by key would set."""
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, sub in value.items() for k, v in _leaves(f"{prefix}.{key}", sub).items()}


def step(node: Any, part: str, key: str, create: bool) -> Any:
    """One level down ``key``: through ``init_args`` of a ``class_path`` section, or into a list by index."""
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise KeyError(f"{key!r}: {part!r} is not an index of a list of {len(node)}")
        return node[int(part)]
    if not isinstance(node, dict):
        raise KeyError(f"{key!r}: cannot go into {part!r} of a {type(node).__name__}")
    if "class_path" in node and part not in ("class_path", "init_args"):
        node = node.setdefault("init_args", {})
    if create and node.get(part) is None:
        node[part] = {}
    if part not in node:
        raise KeyError(f"{key!r}: no {part!r} in the config")
    return node[part]


def get_key(config: dict, key: str, default: Any = None) -> Any:
    node = config
    try:
        for part in key.split("."):
            node = step(node, part, key, create=False)
    except KeyError:
        return default
    return node


def set_key(config: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = step(node, part, key, create=True)
    if isinstance(node, list):
        step(node, last, key, create=False)  # index check
        node[int(last)] = copy.deepcopy(value)
    elif isinstance(node, dict):
        if "class_path" in node and last not in ("class_path", "init_args"):
            node = node.setdefault("init_args", {})
        node[last] = copy.deepcopy(value)
    else:
        raise KeyError(f"{key!r}: cannot go into {last!r} of a {type(node).__name__}")


def _assign_clusters(config: dict, clusters: dict) -> None:
    """``data.clusters: {cluster: [tasks]}``: list the clusters and move each task of ``data.tasks`` to its own."""
    owner = {}
    for cluster, members in clusters.items():
        for t in members or []:
            if t in owner:
                raise ValueError(f"data.clusters: task {t!r} is in both {owner[t]!r} and {cluster!r}")
            owner[t] = cluster
    tasks = get_key(config, "data.tasks") or []
    names = [t.get("name") for t in tasks]
    if sorted(owner) != sorted(names):
        raise ValueError(
            f"data.clusters {clusters} must place every task of data.tasks {names} exactly once "
            f"(missing {sorted(set(names) - set(owner))}, unknown {sorted(set(owner) - set(names))})"
        )
    for t in tasks:
        t["cluster"] = owner[t["name"]]
    set_key(config, "data.clusters", list(clusters))


def resolve(base: dict, overrides: dict[str, Any], where: str = "grid") -> dict:
    """The base config with ``overrides`` (``{dotted key: value}``) applied in order; errors name ``where``."""
    config = copy.deepcopy(base)
    for key, value in overrides.items():
        try:
            if key == "data.clusters" and isinstance(value, dict):
                _assign_clusters(config, value)
            else:
                set_key(config, key, value)
        except KeyError as e:
            raise ValueError(f"{where} override {key}={value!r}: {e.args[0]}") from None
    return config


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
