r"""Ablation grids: one config expands to many runs, each an MLflow child run of one parent; resumable, parallel.

    python -m cgc_lightning grid --config experiments/grids/cgc_structure.yaml --dry-run   # list the points
    python -m cgc_lightning grid --config experiments/grids/cgc_structure.yaml --jobs 4    # run what is not done
    python -m cgc_lightning grid --config experiments/grids/cgc_structure.yaml --summary   # the table, no training
    python -m cgc_lightning grid --config experiments/grids/cgc_structure.yaml --emit slurm > grid.sbatch

A grid config (YAML; keys are dotted experiment-config keys, see ``docs/grids.md``)::

    base: experiments/exp.yaml                 # every point starts from this experiment config
    overrides: {trainer.max_steps: 100}        # set for every point
    axes:                                      # the product of these; values as a list, or {display name: value}
      model.adapter.r: [4, 8]
      seed_everything: [1, 2, 3]
    zip:                                       # each entry is one more axis whose keys move together, written as
      - {model.adapter.num_shared: [2, 0], model.adapter.num_specific: [0, 2]}          # equal-length columns
      - [{model.adapter.method: independent_lora}, {model.adapter.method: cgc_lora}]    # or rows
    exclude:                                   # drop the points that match every key of an entry
      - {model.adapter.r: 4, model.adapter.num_shared: 0}
    reference: {model.adapter.method: independent_lora}    # the Δm baseline, matched per seed

A point's identity (tag ``grid.point_id``) is a hash of its resolved config: the base with the point's
overrides applied. Reordering axes, adding values or editing comments keeps it; changing what a point
trains changes it. A point is finished when its child run is FINISHED and has every task's test metric;
re-running a grid skips those, resumes an interrupted point from its ``last.ckpt`` in the same run, and
starts the others afresh. Every point runs as ``grid --point <id>`` in its own process: ``--jobs N`` runs
N of them here (on GPUs, as many per GPU as their measured memory allows: ``gpu_slots``), ``--emit`` writes
them out for a cluster scheduler.

``data.clusters`` may be given as ``{cluster: [task, ...]}``: the point then also moves each task of
``data.tasks`` to its cluster (the cluster-count ablation).
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import inspect
import io
import itertools
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cgc_lightning.configs import find_base, read_tool_config

METHOD_KEY = "model.adapter.method"
ROLE_TAG, NAME_TAG, POINT_TAG, STAGE_TAG, OWNER_TAG = (
    "grid.role",
    "grid.name",
    "grid.point_id",
    "grid.stage",
    "grid.owner",
)
GPU_TAG = "grid.gpu"
PARENT_TAG = "mlflow.parentRunId"
MLFLOW_LOGGERS = ("cgc_lightning.tracking.MLflowLogger",)


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


# ----------------------------------------------------------------------------------- config surgery


def _step(node: Any, part: str, key: str, create: bool) -> Any:
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
            node = _step(node, part, key, create=False)
    except KeyError:
        return default
    return node


def set_key(config: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = _step(node, part, key, create=True)
    if isinstance(node, list):
        _step(node, last, key, create=False)  # index check
        node[int(last)] = copy.deepcopy(value)
    elif isinstance(node, dict):
        if "class_path" in node and last not in ("class_path", "init_args"):
            node = node.setdefault("init_args", {})
        node[last] = copy.deepcopy(value)
    else:
        raise KeyError(f"{key!r}: cannot go into {last!r} of a {type(node).__name__}")


def _cli_keys(config: dict, key: str, value: Any) -> list[str]:
    """The keys to pass on the command line for an override of ``key``: itself, or the list it indexes into."""
    if key == "data.clusters" and isinstance(value, dict):
        return ["data.clusters", "data.tasks"]
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if isinstance(node, list):
            return [".".join(parts[:i])]
        node = _step(node, part, key, create=False)
    return [key]


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


def resolve(base: dict, overrides: dict[str, Any]) -> dict:
    """The base config with ``overrides`` (``{dotted key: value}``) applied, in order."""
    config = copy.deepcopy(base)
    for key, value in overrides.items():
        try:
            if key == "data.clusters" and isinstance(value, dict):
                _assign_clusters(config, value)
            else:
                set_key(config, key, value)
        except KeyError as e:
            raise ValueError(f"grid override {key}={value!r}: {e.args[0]}") from None
    return config


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


# --------------------------------------------------------------------------------------------- store


@dataclass
class Store:
    """Where a grid's runs go: the MLflow experiment, and where checkpoints of its runs are written."""

    client: Any
    tracking_uri: str
    experiment_name: str
    checkpoint_dir: str

    @property
    def experiment_id(self) -> str | None:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        return exp.experiment_id if exp is not None else None

    def checkpoints(self, run) -> Path:
        return Path(self.checkpoint_dir) / run.info.experiment_id / run.info.run_id / "checkpoints"


def open_store(cfg: GridConfig, base: dict, tracking_uri: str | None) -> Store:
    from cgc_lightning.tracking import LockRetryingClient, default_tracking_uri

    config = resolve(base, cfg.overrides)
    logger = get_key(config, "trainer.logger")
    if logger is False or (
        isinstance(logger, dict) and logger.get("class_path", MLFLOW_LOGGERS[0]) not in MLFLOW_LOGGERS
    ):
        raise ValueError(f"grid needs trainer.logger to be {MLFLOW_LOGGERS[0]}; the base config has {logger!r}")
    init = (logger.get("init_args") or {}) if isinstance(logger, dict) else {}
    uri = tracking_uri or init.get("tracking_uri") or default_tracking_uri()
    experiment = cfg.experiment_name or init.get("experiment_name") or "cgc-lightning"
    return Store(LockRetryingClient(uri), uri, experiment, init.get("checkpoint_dir") or "outputs")


def new_run(store: Store, run_name: str, tags: dict[str, str]) -> str:
    """A new run (the experiment is created as ``fit`` would, artifacts under ``mlruns/artifacts`` by default)."""
    from cgc_lightning.tracking import MLflowLogger

    logger = MLflowLogger(
        experiment_name=store.experiment_name, run_name=run_name, tracking_uri=store.tracking_uri, tags=tags
    )
    return logger.run_id


def parent_run(store: Store, cfg: GridConfig, parent_id: str | None = None) -> str:
    """The grid's parent run: ``parent_id``, else the newest run tagged with this grid's name, else a new one."""
    if parent_id:
        return store.client.get_run(parent_id).info.run_id
    exp = store.experiment_id
    if exp is not None:
        found = store.client.search_runs(
            [exp],
            f"tags.`{ROLE_TAG}` = 'parent' and tags.`{NAME_TAG}` = '{cfg.name}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            return found[0].info.run_id
    from cgc_lightning.tracking import unique_run_name

    return new_run(store, unique_run_name(f"grid:{cfg.name}"), {ROLE_TAG: "parent", NAME_TAG: cfg.name})


def child_runs(store: Store, parent_id: str, point: str | None = None) -> dict[str, Any]:
    """``{point id: newest active child run}`` of the parent (or of one point)."""
    query = f"tags.`{PARENT_TAG}` = '{parent_id}'" + (f" and tags.`{POINT_TAG}` = '{point}'" if point else "")
    runs = store.client.search_runs(
        [store.experiment_id], query, max_results=50000, order_by=["attributes.start_time DESC"]
    )
    out: dict[str, Any] = {}
    for run in runs:
        out.setdefault(run.data.tags.get(POINT_TAG), run)
    return out


def task_scores(run) -> tuple[dict[str, float], dict[str, str]] | None:
    """``({task: test metric}, {task: metric name})`` of a run (tasks from its ``tasks`` tag), or None while one is
    missing."""
    values, names = {}, {}
    for task in [t for t in run.data.tags.get("tasks", "").split(",") if t] or [None]:
        found = sorted(k for k in run.data.metrics if k.startswith(f"test/{task}/") and not k.endswith("/loss"))
        if task is None or not found:
            return None
        values[task], names[task] = run.data.metrics[found[0]], found[0].rsplit("/", 1)[1]
    return values, names


def finished(run) -> bool:
    return run is not None and run.info.status == "FINISHED" and task_scores(run) is not None


def _owner_alive(run) -> bool:
    host, _, pid = run.data.tags.get(OWNER_TAG, "").rpartition(":")
    if run.info.status != "RUNNING" or host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False  # on another host we cannot tell: a RUNNING run there counts as interrupted
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# ------------------------------------------------------------------------------------- one point


def run_point(cfg: GridConfig, point: Point, base_path: str, store: Store, parent_id: str) -> str:
    """Bring one point to finished, in this process: ``fit`` (resumed from ``last.ckpt`` if any), then ``test``."""
    from cgc_lightning import chain, cli, gpu_slots
    from cgc_lightning.tracking import MLflowLogger

    client = store.client
    run = child_runs(store, parent_id, point.id).get(point.id)
    if finished(run):
        return "skipped"
    if run is not None and _owner_alive(run):
        return f"busy (pid {run.data.tags[OWNER_TAG]})"
    resume = test_only = False
    if run is not None:
        ckpts = store.checkpoints(run)
        # a process killed while writing a checkpoint leaves a truncated zip: not something to continue from
        usable = [c for c in ("best.ckpt", "last.ckpt") if zipfile.is_zipfile(ckpts / c)]
        test_only = run.data.tags.get(STAGE_TAG) in ("fit_done", "test") and bool(usable)
        resume = not test_only and "last.ckpt" in usable
        if not (test_only or resume):  # nothing to continue from: start over in a clean run
            client.delete_run(run.info.run_id)
            run = None
    if run is None:
        tags = {PARENT_TAG: parent_id, NAME_TAG: cfg.name, POINT_TAG: point.id, ROLE_TAG: "point"}
        tags |= {f"grid.{k}": v for k, v in point.names.items()}
        # the axis values are tags; the fit logs every value once as a param under its stable name (adapter.r, seed)
        run = client.get_run(new_run(store, point_run_name(cfg, point), tags))
    run_id, ckpts = run.info.run_id, store.checkpoints(run)
    # placed on a GPU by the grid: report the peak memory, by which the grid packs points onto GPUs
    peak_report = (
        [f"--trainer.callbacks+={gpu_slots.REPORT_CALLBACK}"] if os.environ.get(gpu_slots.MEMORY_FILE_ENV) else []
    )
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, OWNER_TAG, f"{socket.gethostname()}:{os.getpid()}")
    if peak_report and os.environ.get("CUDA_VISIBLE_DEVICES"):  # the GPU the grid placed this point on
        client.set_tag(run_id, GPU_TAG, os.environ["CUDA_VISIBLE_DEVICES"])
    common = [
        "--config",
        base_path,
        *point.args,
        f"--trainer.logger.init_args.run_id={run_id}",
        f"--trainer.logger.init_args.tracking_uri={store.tracking_uri}",
        "--trainer.enable_progress_bar=false",
        *peak_report,
    ]
    try:
        if not test_only:
            client.set_tag(run_id, STAGE_TAG, "fit")
            extra = ["--ckpt_path", str(ckpts / "last.ckpt")] if resume else []
            if resume and "resume" in inspect.signature(MLflowLogger).parameters:  # don't re-log steps before the crash
                extra.append("--trainer.logger.init_args.resume=true")
            if chain.is_chain(point.config):  # MoDULA: its three stages, the last one into this point's run

                def fit_stage(args: list[str]) -> None:
                    stage = cli.main(["fit", *args]).trainer
                    if stage.interrupted or getattr(stage, "received_sigterm", False):
                        raise RuntimeError(f"point {point.id}: a MoDULA stage's fit was interrupted")

                def stage_run(stage: str) -> tuple[str, Path]:
                    tags = {PARENT_TAG: run_id, chain.STAGE_RUN_TAG: stage, ROLE_TAG: "modula_stage"}
                    child = client.get_run(new_run(store, point_run_name(cfg, point, f"stage={stage}"), tags))
                    return child.info.run_id, store.checkpoints(child)

                trainer_cfg = point.config.get("trainer") or {}
                val_every = trainer_cfg.get("val_check_interval")
                chain.run_chain(
                    fit_stage,
                    [c for c in common if not c.startswith("--trainer.logger.init_args.run_id=")],
                    int(trainer_cfg.get("max_steps") or 0),
                    val_every if isinstance(val_every, int) else None,
                    cfg.modula_stages,
                    stage_run,
                    (run_id, ckpts),
                )
            else:
                trainer = cli.main(["fit", *common, *extra]).trainer
                if trainer.interrupted or getattr(trainer, "received_sigterm", False):
                    raise RuntimeError(f"point {point.id}: fit was interrupted")
            client.set_tag(run_id, STAGE_TAG, "fit_done")
        best = next((p for p in (ckpts / "best.ckpt", ckpts / "last.ckpt") if zipfile.is_zipfile(p)), None)
        if best is None:
            raise RuntimeError(f"point {point.id}: fit wrote no checkpoint under {ckpts}; does validation run?")
        client.set_tag(run_id, STAGE_TAG, "test")
        cli.main(["test", *common, "--ckpt_path", str(best)])
        client.set_tag(run_id, STAGE_TAG, "done")
    except BaseException as e:
        client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return "resumed and finished" if resume else "finished"


# ------------------------------------------------------------------------------------------ runner


def visible_gpus(arg: str | None) -> list[str]:
    """GPU ids to hand out: ``--gpus``, else ``$CUDA_VISIBLE_DEVICES``, else what ``nvidia-smi -L`` lists."""
    if arg:
        return [g.strip() for g in arg.split(",") if g.strip()]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def point_command(config_path: str, point: Point, parent_id: str, tracking_uri: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cgc_lightning",
        "grid",
        "--config",
        config_path,
        "--point",
        point.id,
        "--parent",
        parent_id,
        "--tracking-uri",
        tracking_uri,
    ]


@dataclass
class _Job:
    """A point's process, while it runs."""

    proc: subprocess.Popen
    index: int
    point: Point
    started: float
    log: Any
    log_from: int
    """The log's size when this attempt started: what it wrote comes after."""
    memory_file: Path | None = None
    """Where the point reports its peak GPU memory (``gpu_slots.PeakMemoryReport``)."""


def run_grid(
    config_path: str,
    cfg: GridConfig,
    points: list[Point],
    store: Store,
    parent_id: str,
    *,
    jobs: int,
    gpus: list[str],
    jobs_per_gpu: int | None = None,
) -> bool:
    """Run every unfinished point, at most ``jobs`` processes at a time; True when all points are finished.

    With ``gpus``, each point goes to the GPU ``gpu_slots.GpuSlots`` picks (by free memory and the points' measured
    peak, or at most ``jobs_per_gpu`` per GPU) and waits while none has room; one that runs out of memory next to
    other points is retried once.
    """
    short = short_names(points)
    runs = child_runs(store, parent_id)
    pending: list[tuple[int, Point]] = []
    for i, p in enumerate(points, 1):
        if finished(runs.get(p.id)):
            print(f"[{i}/{len(points)}] point {p.id} {p.label(short)} skipped (finished: run {runs[p.id].info.run_id})")
        else:
            pending.append((i, p))
    logs = Path(store.checkpoint_dir) / "grids" / cfg.name
    logs.mkdir(parents=True, exist_ok=True)
    slots = None
    if gpus:
        from cgc_lightning import gpu_slots

        slots = gpu_slots.GpuSlots(gpus, jobs_per_gpu=jobs_per_gpu)
    memory: dict = {}
    asked = -1e9  # when the GPUs' memory was last queried
    running: dict[str, _Job] = {}
    retried: set[str] = set()  # points already retried after running out of GPU memory
    failed = 0
    said_wait = False

    def name(i: int, p: Point) -> str:
        return f"[{i}/{len(points)}] point {p.id} {p.label(short)}"

    def start(i: int, p: Point, gpu: str | None) -> _Job:
        env = dict(os.environ)
        # N processes that each spin one thread per core on the same cores slow each other down manyfold
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        memory_file = None
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's device k is nvidia-smi's index k
            memory_file = logs / f"{p.id}.gpu_memory.json"
            memory_file.unlink(missing_ok=True)
            env[gpu_slots.MEMORY_FILE_ENV] = str(memory_file)
        log = open(logs / f"{p.id}.log", "a")  # noqa: SIM115 (closed when the process ends)
        proc = subprocess.Popen(
            point_command(config_path, p, parent_id, store.tracking_uri), env=env, stdout=log, stderr=subprocess.STDOUT
        )
        return _Job(proc, i, p, time.perf_counter(), log, log.tell(), memory_file)

    def end(job: _Job) -> None:
        nonlocal failed
        i, p = job.index, job.point
        took = time.perf_counter() - job.started
        text = Path(job.log.name).read_bytes()[job.log_from :].decode(errors="replace")
        code = job.proc.returncode
        oom, placed, peak = False, None, None
        if slots is not None:
            peak = gpu_slots.read_report(job.memory_file)
            if peak is not None:  # a point that finished has been through every allocation it makes
                slots.report(p.id, peak[0], peak[1] or code == 0)
            oom = code != 0 and gpu_slots.is_out_of_memory(text)
            placed = slots.end(p.id, out_of_memory=oom)
        retry = oom and placed.others and p.id not in retried
        if oom:
            how = (
                "alone on a GPU"
                if jobs_per_gpu is not None
                else f"with a larger memory estimate ({gpu_slots.gib(slots.estimate or 0)} per point)"
            )
            advice = gpu_slots.oom_advice(
                f"{p.id} {p.label(short)}", placed, jobs_per_gpu=jobs_per_gpu, retrying=how if retry else None
            )
        if code == 0:
            memory = f", peak {gpu_slots.gib(peak[0])} of GPU memory" if peak is not None else ""
            print(f"{name(i, p)} finished ({took:.0f} s{memory})", flush=True)
        elif retry:
            retried.add(p.id)
            pending.insert(0, (i, p))
            print(f"[{i}/{len(points)}] {advice} ({took:.0f} s; log {job.log.name})", flush=True)
        else:
            failed += 1
            tail = "\n    ".join(text.splitlines()[-15:])
            print(f"{name(i, p)} failed (exit {code}, {took:.0f} s); log {job.log.name}:\n    {tail}", flush=True)
            if oom:
                print(f"[{i}/{len(points)}] {advice}", flush=True)
        run = child_runs(store, parent_id, p.id).get(p.id)
        if run is not None:
            store.client.log_artifact(run.info.run_id, job.log.name, "grid_logs")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while pending or running:
            if slots is not None and pending and len(running) < jobs and time.perf_counter() - asked > 2:
                memory, asked = gpu_slots.query_gpus(gpus), time.perf_counter()
            # first come, first placed: a point that waits for room holds back the ones behind it
            while pending and len(running) < jobs:
                i, p = pending[0]
                gpu = None
                if slots is not None:
                    gpu = slots.choose(memory, alone=p.id in retried and jobs_per_gpu is not None)
                    if gpu is None:
                        if not said_wait:
                            print(f"{name(i, p)} {slots.waiting(memory)}", flush=True)
                            said_wait = True
                        break
                    slots.start(p.id, gpu, alone=p.id in retried and jobs_per_gpu is not None)
                pending.pop(0)
                running[p.id] = start(i, p, gpu)
                said_wait = False
                where = f" on {slots.where(gpu, memory.get(gpu))}" if slots is not None else ""
                print(f"{name(i, p)} running{where}", flush=True)
            time.sleep(0.5)
            for job in list(running.values()):
                if slots is not None and (peak := gpu_slots.read_report(job.memory_file)) is not None:
                    slots.report(job.point.id, *peak)
                if job.proc.poll() is None:
                    continue
                job.log.close()
                del running[job.point.id]
                end(job)
                asked, said_wait = -1e9, False  # a GPU has freed up: look again
    except KeyboardInterrupt:
        for job in running.values():
            job.proc.terminate()
        for job in running.values():
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    runs = child_runs(store, parent_id)
    return failed == 0 and all(finished(runs.get(p.id)) for p in points)


def emit(kind: str, config_path: str, cfg: GridConfig, points: list[Point], store: Store, parent_id: str) -> str:
    """One command per unfinished point, for a scheduler: ``shell`` lines, or a ``slurm`` array job script."""
    runs = child_runs(store, parent_id)
    todo = [p for p in points if not finished(runs.get(p.id))]
    cwd = shlex.quote(str(Path.cwd()))
    if kind == "shell":
        return "".join(
            f"cd {cwd} && {shlex.join(point_command(config_path, p, parent_id, store.tracking_uri))}\n" for p in todo
        )
    if not todo:
        return "# every point of this grid is finished\n"
    cmd = point_command(config_path, todo[0], parent_id, store.tracking_uri)
    cmd[cmd.index("--point") + 1] = "@POINT@"
    line = shlex.join(cmd).replace("@POINT@", '"${POINTS[$SLURM_ARRAY_TASK_ID]}"')
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name=grid-{cfg.name}",
            f"#SBATCH --array=0-{len(todo) - 1}",
            "#SBATCH --gres=gpu:1",
            f"# {len(todo)} unfinished point(s) of grid {cfg.name!r}; parent run {parent_id}",
            f"POINTS=({' '.join(p.id for p in todo)})",
            f"cd {cwd}",
            f"exec {line}",
            "",
        ]
    )


# ----------------------------------------------------------------------------------------- summary


@dataclass
class Summary:
    """Per-point results and their aggregates over seeds."""

    tasks: dict[str, str]
    """``{task: metric name}``."""
    axes: list[str]
    """Axis keys shown as columns (the seed axis is averaged over, not shown)."""
    points: list[dict]
    """One row per point: ``axis values, seed, run_id, status, <task>, avg, delta_m, reference``."""
    groups: list[dict]
    """One row per combination of non-seed axes: ``axis values, n, <task>/avg/delta_m: [values over seeds]``,
    ``pairs`` (the (point run, reference run) of each seed) and, once :func:`add_intervals` ran, ``significance``."""
    interval_note: str | None = None
    """Why the groups have no Δm interval, when they have none."""


def summarise(cfg: GridConfig, points: list[Point], runs: dict[str, Any]) -> Summary:
    """Test metrics of each point, Δm against the baseline point of the same seed, and mean/spread over seeds."""
    from cgc_lightning.compare import build_report

    short = short_names(points)
    results, tasks = {}, {}
    for p in points:
        run = runs.get(p.id)
        found = task_scores(run) if run is not None and run.info.status == "FINISHED" else None
        if found:
            results[p.id] = found[0]
            tasks.update(found[1])

    def seed(p: Point) -> Any:
        return get_key(p.config, cfg.seed_key)

    ref_points = [
        p
        for p in points
        if cfg.reference and all(canonical(get_key(p.config, k)) == canonical(v) for k, v in cfg.reference.items())
    ]

    def reference_of(p: Point) -> Point | None:
        same_seed = [r for r in ref_points if canonical(seed(r)) == canonical(seed(p))]
        varying = {k for r in same_seed for k in r.values if len({canonical(x.values.get(k)) for x in same_seed}) > 1}
        match = [r for r in same_seed if all(canonical(r.values.get(k)) == canonical(p.values.get(k)) for k in varying)]
        return match[0] if len(match) == 1 else None

    axes = [k for k in short if k != cfg.seed_key]
    rows, groups = [], {}
    for p in points:
        run, vals = runs.get(p.id), results.get(p.id)
        ref = reference_of(p)
        delta = None
        if vals is not None and ref is not None and ref.id in results:
            report = build_report({"ref": results[ref.id], "point": vals}, tasks, "ref")
            delta = 100 * report.delta_m["point"]
        status = "missing" if run is None else run.info.status + ("" if vals is not None else " (incomplete)")
        row = {short[k]: p.names[k] for k in short if k in p.names}
        row |= {"seed": seed(p), "point_id": p.id, "run_id": run.info.run_id if run else "", "status": status}
        row |= {t: (vals or {}).get(t) for t in tasks}
        row |= {"avg": statistics.fmean(vals.values()) if vals else None, "delta_m": delta}
        row["reference"] = ref.id if ref is not None else ""
        rows.append(row)
        key = canonical([p.names.get(k) for k in axes])
        group = groups.setdefault(key, {**{short[k]: p.names.get(k, "") for k in axes}, "n": 0, "values": {}})
        if vals is not None:
            group["n"] += 1
            for col in [*tasks, "avg", "delta_m"]:
                if row[col] is not None:
                    group["values"].setdefault(col, []).append(row[col])
            if delta is not None and ref is not p:  # the paired runs behind Δm's interval, seed by seed
                group.setdefault("pairs", []).append((row["run_id"], runs[ref.id].info.run_id))
    return Summary(tasks, [short[k] for k in axes], rows, list(groups.values()))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(values: list[float], pct: bool = False) -> str:
    mean, std = _mean_std(values)
    if mean is None:
        return "-"
    text = f"{mean:+.2f}" if pct else f"{mean:.4f}"
    if std is None:
        return text
    return text + (f" ± {std:.2f}" if pct else f" ± {std:.4f}")


def summary_table(s: Summary) -> tuple[list[str], list[list[str]]]:
    header = [*s.axes, "n", *[f"{t} ({m})" for t, m in s.tasks.items()], "avg", "Δm %"]
    with_ci = any("significance" in g for g in s.groups)
    if with_ci:
        header += ["Δm 95% CI", "sig. losses"]
    rows = []
    for g in s.groups:
        row = [
            *[str(g[a]) for a in s.axes],
            str(g["n"]),
            *[_cell(g["values"].get(t, [])) for t in s.tasks],
            _cell(g["values"].get("avg", [])),
            _cell(g["values"].get("delta_m", []), pct=True),
        ]
        if with_ci:
            sig = g.get("significance")
            d = sig.delta_m if sig else None
            row += [f"[{d.ci_low:+.2f}, {d.ci_high:+.2f}]" if d else "-", str(sig.significant_losses) if sig else "-"]
        rows.append(row)
    return header, rows


def delta_m_figure(s: Summary, cfg: GridConfig):
    """Each group's mean Δm over its seeds, with the 95% interval where there is one; None without any Δm."""
    from cgc_lightning.callbacks.plots import grouped_bars

    groups = [g for g in s.groups if g["values"].get("delta_m")]
    if not groups:
        return None
    labels = [" ".join(str(g[a]) for a in s.axes) or "all" for g in groups]
    means = [statistics.fmean(g["values"]["delta_m"]) for g in groups]
    cis = [
        (g["significance"].delta_m.ci_low, g["significance"].delta_m.ci_high) if "significance" in g else None
        for g in groups
    ]
    ref = ", ".join(f"{k}={v}" for k, v in (cfg.reference or {}).items())
    title = f"grid {cfg.name}: Δm against {ref}, mean over seeds" + (" with 95% intervals" if any(cis) else "")
    return grouped_bars(labels, {"Δm": means}, title, "Δm (%)", intervals={"Δm": cis})


def add_intervals(s: Summary, client, n_resamples: int | None = None) -> None:
    """Δm's bootstrap interval for each group with a reference, over its seeds and the test examples (paired with
    the reference point of each seed), from the runs' per-example results; ``s.interval_note`` says why not."""
    from cgc_lightning.compare import LOWER_IS_BETTER
    from cgc_lightning.significance import N_RESAMPLES, method_significance

    for g in s.groups:
        pairs = g.get("pairs") or []
        if not pairs or len(pairs) != g["n"]:  # a seed without its reference: the interval would mix seeds
            continue
        runs = {"point": [p for p, _ in pairs], "reference": [r for _, r in pairs]}
        found, why = method_significance(
            client, runs, "reference", s.tasks, set(LOWER_IS_BETTER), n_resamples=n_resamples or N_RESAMPLES
        )
        if why:
            s.interval_note = why
            continue
        g["significance"] = found["point"]


def format_text(s: Summary) -> str:
    header, rows = summary_table(s)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _notes(s: Summary, cfg: GridConfig) -> str:
    ref = ", ".join(f"{k}={v}" for k, v in (cfg.reference or {}).items()) or "none"
    text = (
        f"test metrics, mean ± sample std over {cfg.seed_key}; Δm: mean relative change per task against the "
        f"point with {ref} and the same seed, in percent (+ is better)"
    )
    if any("significance" in g for g in s.groups):
        text += (
            "; CI: paired bootstrap over seeds and test examples; sig. losses: tasks whose whole interval is below "
            "the reference"
        )
    elif s.interval_note:
        text += f"; no Δm intervals: {s.interval_note}"
    return text


def format_markdown(s: Summary, cfg: GridConfig) -> str:
    header, rows = summary_table(s)
    md = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * len(s.axes) + ["---:"] * (len(header) - len(s.axes))) + "|",
    ]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([f"# grid {cfg.name}", "", *md, "", _notes(s, cfg), ""])


def format_csv(s: Summary, per_point: bool) -> str:
    buf = io.StringIO()
    cols = [*s.tasks, "avg", "delta_m"]
    if per_point:
        w = csv.DictWriter(
            buf, [*s.axes, "seed", "point_id", "run_id", "status", *cols, "reference"], extrasaction="ignore"
        )
        w.writeheader()
        w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in s.points])
    else:
        w = csv.writer(buf, lineterminator="\n")
        ci = ["delta_m_ci_low", "delta_m_ci_high", "significant_losses"]
        w.writerow([*s.axes, "n", *[f"{c}_{stat}" for c in cols for stat in ("mean", "std")], *ci])
        for g in s.groups:
            stats = [_mean_std(g["values"].get(c, [])) for c in cols]
            sig = g.get("significance")
            extra = [sig.delta_m.ci_low, sig.delta_m.ci_high, sig.significant_losses] if sig else ["", "", ""]
            w.writerow([*[g[a] for a in s.axes], g["n"], *["" if x is None else x for st in stats for x in st], *extra])
    return buf.getvalue()


def report(cfg: GridConfig, points: list[Point], store: Store, parent_id: str, out: Path | None = None) -> Summary:
    """Summarise the grid from MLflow, log the tables on the parent run (and into ``out``), print the table."""
    s = summarise(cfg, points, child_runs(store, parent_id))
    add_intervals(s, store.client)
    files = {
        "grid_summary.md": format_markdown(s, cfg),
        "grid_summary.csv": format_csv(s, per_point=False),
        "grid_points.csv": format_csv(s, per_point=True),
    }
    significance = {" ".join(f"{a}={g[a]}" for a in s.axes): g["significance"] for g in s.groups if "significance" in g}
    if significance:
        from cgc_lightning.significance import transfer_csv

        ref = " ".join(f"{k}={v}" for k, v in (cfg.reference or {}).items())
        files["grid_transfer.csv"] = transfer_csv(significance, ref)
    for name, text in files.items():
        store.client.log_text(parent_id, text, name)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
    figure = delta_m_figure(s, cfg)
    if figure is not None:
        store.client.log_figure(parent_id, figure, "grid_delta_m.png")
        if out is not None:
            figure.savefig(out / "grid_delta_m.png")
    log_summary_metrics(store.client, parent_id, s)
    from cgc_lightning.runs_view import runs_url, ui_command, update_runs_view

    children = child_runs(store, parent_id).values()
    metrics = {k for run in children for k in run.data.metrics} | {"grid/delta_m"}
    update_runs_view(store.client, store.experiment_id, metrics)
    done = sum(r["status"] == "FINISHED" for r in s.points)
    print(
        f"\ngrid {cfg.name}: {done} of {len(points)} point(s) finished; parent run {parent_id} "
        f"(experiment {store.experiment_name!r}, {store.tracking_uri})\n"
        f"runs: `{ui_command(store.tracking_uri)}`, then {runs_url(store.experiment_id)}"
    )
    print(format_text(s))
    print(_notes(s, cfg))
    return s


def _metric_name(*parts: str) -> str:
    """An MLflow metric name (alphanumerics, ``_ - . / :`` and spaces) from free text."""
    return "/".join(re.sub(r"[^0-9A-Za-z_\-. :]", "_", str(p).replace("=", ":")) for p in parts if str(p))


def log_summary_metrics(client, parent_id: str, s: Summary) -> None:
    """The summary as metrics, so the MLflow runs table shows it: on the parent, each group's mean over seeds
    (``grid/<axis:value ...>/avg``, ``.../delta_m``, ``.../n``); on each point's run, its ``grid/delta_m``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for group in s.groups:
        label = " ".join(f"{k}:{group[k]}" for k in s.axes) or "all"
        for col in ("avg", "delta_m"):
            values = group["values"].get(col)
            if values:
                metrics.append(Metric(_metric_name("grid", label, col), statistics.fmean(values), now, 0))
        metrics.append(Metric(_metric_name("grid", label, "n"), float(group["n"]), now, 0))
        if "significance" in group:
            d = group["significance"].delta_m
            metrics.append(Metric(_metric_name("grid", label, "delta_m_ci_low"), d.ci_low, now, 0))
            metrics.append(Metric(_metric_name("grid", label, "delta_m_ci_high"), d.ci_high, now, 0))
    try:
        for i in range(0, len(metrics), 500):
            client.log_batch(parent_id, metrics=metrics[i : i + 500])
        for row in s.points:
            if row["run_id"] and row["delta_m"] is not None:
                client.log_metric(row["run_id"], "grid/delta_m", row["delta_m"], timestamp=now)
    except Exception as e:  # the tables are logged already; a store that refuses metrics costs only the columns
        print(f"grid: could not log the summary metrics ({e})", file=sys.stderr)


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cgc_lightning grid",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="grid config (YAML), e.g. experiments/grids/tiny.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the expanded points and their count; run nothing")
    p.add_argument("--jobs", type=int, default=1, help="points run at once, each in its own process (default 1)")
    p.add_argument(
        "--gpus",
        help="GPU ids to place points on, by free memory and each point's measured peak (default: every visible GPU)",
    )
    p.add_argument(
        "--jobs-per-gpu",
        type=int,
        help="at most this many points per GPU, in place of the measured memory (lower it after an out-of-memory)",
    )
    p.add_argument("--summary", action="store_true", help="only summarise the grid's existing runs")
    p.add_argument("--emit", choices=["shell", "slurm"], help="print one command per unfinished point, for a scheduler")
    p.add_argument("--point", help="run this one point (by id) in this process")
    p.add_argument("--parent", help="the grid's parent run (default: the newest parent run of this grid's name)")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: the base config's, $MLFLOW_TRACKING_URI, or sqlite:///mlruns/mlflow.db)",
    )
    p.add_argument("--out", help="also write the summary files into this folder")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs_per_gpu is not None and args.jobs_per_gpu < 1:
        p.error(f"--jobs-per-gpu must be at least 1, got {args.jobs_per_gpu}")
    cfg, base, base_path = load(args.config)
    points, notes = expand(cfg, base)
    if not points:
        raise SystemExit(f"grid {cfg.name}: no points ({'; '.join(notes) or 'empty axes'})")
    if args.dry_run:
        short = short_names(points)
        fixed = [f"--{k}={_cli_value(v)}" for k, v in cfg.overrides.items()]
        print(f"grid {cfg.name}: base {base_path}" + (f", fixed overrides {' '.join(fixed)}" if fixed else ""))
        for i, pt in enumerate(points, 1):
            axis_args = [a if len(a) <= 100 else f"{a[:80]}... ({len(a)} chars)" for a in pt.args if a not in fixed]
            print(f"[{i}/{len(points)}] point {pt.id} {pt.label(short)}\n    {' '.join(axis_args)}")
        print(f"{len(points)} point(s)" + "".join(f"; {n}" for n in notes))
        return 0
    store = open_store(cfg, base, args.tracking_uri)
    if args.point:
        byid = {pt.id: pt for pt in points}
        if args.point not in byid:
            raise SystemExit(f"grid {cfg.name}: no point {args.point!r}; its points are {sorted(byid)}")
        parent = parent_run(store, cfg, args.parent)
        outcome = run_point(cfg, byid[args.point], base_path, store, parent)
        print(f"point {args.point}: {outcome}")
        return 3 if outcome.startswith("busy") else 0
    parent = parent_run(store, cfg, args.parent)
    client = store.client
    client.set_tag(parent, "grid.points", str(len(points)))
    client.set_tag(parent, "grid.axes", ",".join(short_names(points)))
    if args.emit:
        print(emit(args.emit, args.config, cfg, points, store, parent), end="")
        return 0
    if args.summary:
        report(cfg, points, store, parent, Path(args.out) if args.out else None)
        return 0
    client.log_text(parent, Path(args.config).read_text(), "grid.yaml")
    client.update_run(parent, status="RUNNING")
    gpus = visible_gpus(args.gpus)
    if all(get_key(pt.config, "trainer.accelerator") == "cpu" for pt in points):
        gpus = []  # placing CPU points by GPU memory would only hold them back
    if gpus:
        per_gpu = f"at most {args.jobs_per_gpu}" if args.jobs_per_gpu else "as many as fit in free memory"
        notes.append(f"GPU(s) {','.join(gpus)}, {per_gpu} per GPU")
    elif args.jobs_per_gpu:
        notes.append("no GPUs: --jobs-per-gpu has nothing to do")
    print(
        f"grid {cfg.name}: {len(points)} point(s), parent run {parent}, {args.jobs} at a time"
        + "".join(f"; {n}" for n in notes)
    )
    ok = False
    try:
        ok = run_grid(
            args.config, cfg, points, store, parent, jobs=args.jobs, gpus=gpus, jobs_per_gpu=args.jobs_per_gpu
        )
        report(cfg, points, store, parent, Path(args.out) if args.out else None)
    except KeyboardInterrupt:
        client.set_terminated(parent, "KILLED")
        return 130
    client.set_terminated(parent, "FINISHED" if ok else "FAILED")
    return 0 if ok else 1
