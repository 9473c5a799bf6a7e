"""A grid's config and its points: :class:`GridConfig` and :func:`load`, the expansion of its axes, zips and
exclusions into points (:class:`Point`, :func:`expand`), dotted-key overrides of the base config (:func:`resolve`),
and each point's id and run name."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cgc_lightning.configs import (  # noqa: F401  (get_key, set_key, resolve: importable from here as before)
    dotted,
    find_base,
    get_key,
    read_tool_config,
    resolve,
    set_key,
    step,
)

METHOD_KEY = "model.adapter.method"


@dataclass
class GridConfig:
    """A grid: one base experiment and the axes along which its points differ."""

    base: str
    """The experiment config every point starts from: a path, relative to the working directory or this file."""
    axes: dict[str, list | dict] = field(default_factory=dict)
    """``{dotted key: [values]}`` or ``{dotted key: {display name: value}}``; the grid is their product."""
    zip: list[dict | list] = field(default_factory=list)
    """Axes whose keys move together: ``{key: [values], ...}`` (equal lengths) or ``[{key: value, ...}, ...]``."""
    exclude: list[dict] = field(default_factory=list)
    """Points matching every ``key: value`` of an entry are dropped (a value may be an axis value's display name)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """``{dotted key: value}`` set for every point (part of each point's identity)."""
    reference: dict[str, Any] | None = field(default_factory=lambda: {METHOD_KEY: "independent_lora"})
    """Resolved-config values that pick the Δm baseline points; ``null`` for no Δm."""
    seed_key: str = "seed_everything"
    """The config key whose values are seeds: the summary averages over it and matches baselines on it."""
    name: str | None = None
    """Grid name (tag ``grid.name`` of the parent run); default: the config file's stem."""
    experiment_name: str | None = None
    """MLflow experiment of the parent and child runs; default: the base config's logger's."""
    modula_stages: dict[str, float] | None = None
    """Shares of ``trainer.max_steps`` for a MoDULA point's universal, domain and router stages
    (``cgc_lightning.chain``); default: equal thirds."""

    def __post_init__(self):
        for what, value, kind in [
            ("axes", self.axes, dict),
            ("zip", self.zip, list),
            ("exclude", self.exclude, list),
            ("overrides", self.overrides, dict),
        ]:
            if not isinstance(value, kind):
                raise ValueError(f"grid config: `{what}` must be a {kind.__name__}, got {type(value).__name__}")
        self.overrides = dotted(self.overrides, "grid config, `overrides`")
        for key, values in self.axes.items():
            if not isinstance(values, (list, dict)) or not values:
                raise ValueError(
                    f"grid config: axis {key!r} needs a non-empty list (or {{name: value}}), got {values!r}"
                )
        for i, entry in enumerate(self.zip):
            if isinstance(entry, dict):
                lengths = {k: len(v) if isinstance(v, list) else None for k, v in entry.items()}
                if None in lengths.values() or len(set(lengths.values())) != 1 or not entry:
                    raise ValueError(f"grid config: zip[{i}] needs lists of one length per key, got lengths {lengths}")
            elif not isinstance(entry, list) or not entry or not all(isinstance(r, dict) for r in entry):
                raise ValueError(f"grid config: zip[{i}] must be {{key: [values]}} or a list of {{key: value}} rows")
        seen: dict[str, str] = {}
        for where, keys in [("axes", list(self.axes))] + [(f"zip[{i}]", _zip_keys(e)) for i, e in enumerate(self.zip)]:
            for k in keys:
                if k in seen and seen[k] != where:
                    raise ValueError(f"grid config: key {k!r} is in both {seen[k]} and {where}; a key is one axis")
                seen[k] = where
        axis_keys = set(seen)
        for i, entry in enumerate(self.exclude):
            unknown = sorted(set(entry) - axis_keys) if isinstance(entry, dict) else None
            if unknown is None or unknown:
                raise ValueError(f"grid config: exclude[{i}] may only name axis keys {sorted(axis_keys)}; got {entry}")


def _zip_keys(entry: dict | list) -> list[str]:
    return list(entry) if isinstance(entry, dict) else list(dict.fromkeys(k for row in entry for k in row))


def canonical(value: Any) -> str:
    """A config as one string; ``16`` and ``16.0`` are the same value (the parser makes both a float)."""

    def plain(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"), default=str)


def _cli_keys(config: dict, key: str, value: Any) -> list[str]:
    """The keys to pass on the command line for an override of ``key``: itself, or the list it indexes into."""
    if key == "data.clusters" and isinstance(value, dict):
        return ["data.clusters", "data.tasks"]
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if isinstance(node, list):
            return [".".join(parts[:i])]
        node = step(node, part, key, create=False)
    return [key]


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# -------------------------------------------------------------------------------------------- points


@dataclass(frozen=True)
class Point:
    """One grid point: its axis values, the overrides that make it, and its resolved config."""

    id: str
    values: dict[str, Any]
    """``{axis key: value}`` of this point."""
    names: dict[str, str]
    """``{axis key: display name}`` of each value."""
    overrides: dict[str, Any]
    """The grid's overrides, then this point's axis values."""
    config: dict
    """The resolved experiment config."""

    @property
    def args(self) -> list[str]:
        """``--key=value`` overrides for ``fit --config <base>``, read off the resolved config."""
        keys = dict.fromkeys(k for key, v in self.overrides.items() for k in _cli_keys(self.config, key, v))
        return [f"--{k}={_cli_value(get_key(self.config, k))}" for k in keys]

    def label(self, short: dict[str, str] | None = None) -> str:
        return " ".join(f"{(short or {}).get(k, k)}={v}" for k, v in self.names.items())


#: Run names stay about this short (MLflow's runs table cuts longer ones off); the seed and the suffix are never cut.
RUN_NAME_CHARS = 80


def point_run_name(cfg: GridConfig, point: Point, *more: str) -> str:
    """``<method> <axis>=<value> ... [more] seed=<seed> <suffix>``: what the point trains, then a unique suffix.

    The method and seed come from the resolved config, so they show whether or not they are axes; the other axes
    go by their short names (``r=8``). Only they are shortened when the name would run past :data:`RUN_NAME_CHARS`.
    """
    from cgc_lightning.tracking import DEFAULT_SEED, seed_text, unique_run_name

    short = short_names([point])
    method = get_key(point.config, METHOD_KEY) or "cgc_lora"
    seed = seed_text(get_key(point.config, cfg.seed_key, DEFAULT_SEED))
    # a value with no display name (a dict of clusters) keeps its head, so the axes after it still show
    clip = lambda v: v if len(v) <= 24 else v[:21] + "..."  # noqa: E731
    axes = " ".join(f"{short[k]}={clip(v)}" for k, v in point.names.items() if k not in (METHOD_KEY, cfg.seed_key))
    room = RUN_NAME_CHARS - len(" ".join([method, "", *more, seed, "123456"]))
    if len(axes) > room:
        axes = axes[: max(room - 3, 0)] + "..."
    return unique_run_name(method, axes, *more, seed)


def point_id(config: dict) -> str:
    return hashlib.sha256(canonical(config).encode()).hexdigest()[:12]


def _display(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_display(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_display(v) for v in value) + "]"
    return str(value)


def dimensions(cfg: GridConfig) -> list[list[tuple[dict, dict]]]:
    """Each axis as a list of ``({key: value}, {key: display name})`` choices; the grid is their product."""
    dims = []
    for key, values in cfg.axes.items():
        items = values.items() if isinstance(values, dict) else [(_display(v), v) for v in values]
        dims.append([({key: v}, {key: str(name)}) for name, v in items])
    for entry in cfg.zip:
        rows = (
            [dict(zip(entry, col, strict=True)) for col in zip(*entry.values(), strict=True)]
            if isinstance(entry, dict)
            else entry
        )
        dims.append([(dict(row), {k: _display(v) for k, v in row.items()}) for row in rows])
    return dims


def _excluded(values: dict, names: dict, rules: list[dict]) -> bool:
    def match(k, v):
        return k in values and (canonical(values[k]) == canonical(v) or names[k] == str(v))

    return any(all(match(k, v) for k, v in rule.items()) for rule in rules)


def expand(cfg: GridConfig, base: dict) -> tuple[list[Point], list[str]]:
    """The grid's points in product order, and notes on what was dropped (exclusions, duplicate configs)."""
    points, notes, seen = [], [], {}
    excluded = 0
    for combo in itertools.product(*dimensions(cfg)):
        values = {k: v for vals, _ in combo for k, v in vals.items()}
        names = {k: n for _, ns in combo for k, n in ns.items()}
        if _excluded(values, names, cfg.exclude):
            excluded += 1
            continue
        overrides = {**cfg.overrides, **values}
        config = resolve(base, overrides)
        pid = point_id(config)
        if pid in seen:
            notes.append(f"{Point(pid, values, names, overrides, config).label()} is the same config as {seen[pid]}")
            continue
        point = Point(pid, values, names, overrides, config)
        seen[pid] = point.label()
        points.append(point)
    if excluded:
        notes.insert(0, f"{excluded} point(s) excluded")
    return points, notes


def short_names(points: list[Point]) -> dict[str, str]:
    """Each axis key by its last component, unless two axes share it."""
    keys = list(dict.fromkeys(k for p in points for k in p.values))
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}


def load(path: str | Path) -> tuple[GridConfig, dict, str]:
    """Read a grid config: the config, its base experiment config (a dict) and the base's path."""
    path = Path(path)
    raw = read_tool_config(path, GridConfig, "grid")
    if "base" not in raw:
        raise ValueError(f"{path}: no `base`; name the experiment config every point starts from")
    cfg = GridConfig(**raw)
    cfg.name = cfg.name or path.stem
    found = find_base(cfg.base, path)
    return cfg, yaml.safe_load(found.read_text()) or {}, str(found)
