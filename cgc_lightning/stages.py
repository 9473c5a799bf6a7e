r"""Staged training (MoDULA): one command runs each stage as its own ``fit``, each starting from the last one's adapter.

    python -m cgc_lightning stages --config experiments/stages/modula_tiny.yaml
    python -m cgc_lightning stages --config experiments/stages/modula_add_domain_tiny.yaml \
        --init_adapter runs:/<run id of the last stage>/best_adapter

Stage ``i`` trains with ``model.adapter.stage`` set to its stage and ``model.adapter.init_adapter`` set
to stage ``i-1``'s best (or last) checkpoint, so it loads the earlier stages' weights, freezes what they
trained and trains its own parameters only (:meth:`cgc_lightning.adapters.MoDULA.set_stage`). In MLflow
the chain is one parent run (tags ``method``, ``stages``; per-stage times as metrics; tag
``stages.adapter``, the last stage's ``best_adapter`` URI, for adding a domain later) with one child run
per stage (tags ``mlflow.parentRunId``, ``stage``, ``stage.index``). Each child records its training time
(:class:`StageTimer`): ``time/train_steps_s`` (forward, backward and optimizer steps only),
``time/fit_s`` (the whole ``fit``, validation included) and ``time/stage_wall_s`` (from the start of the
stage's process to the end of its fit: start-up, imports, model and data loading too).

A stages config (YAML)::

    base: experiments/tiny.yaml              # an experiment config, as given to `fit` (path or inline)
    overrides: {model.adapter.method: modula_res}   # dotted keys, as on the command line; for every stage
    stages:                                  # run in order
      - {stage: universal}
      - {stage: domain, overrides: {trainer.max_steps: 20}}
      - {stage: router, name: router, overrides: {model.lr: 1.0e-2}}
    init_adapter: null                       # the first stage starts from this adapter (adding a domain)
    checkpoint: best                         # hand the next stage the best or the last checkpoint
    test: true                               # test the last stage's best checkpoint into its run
    experiment_name: null                    # MLflow experiment; default: the base config's
    run_name: null                           # parent run name; default: <method>:<file name> seed=<seed> <suffix>

Stage configs live in ``experiments/stages/``, apart from the experiment configs they point to. The nested form
of earlier configs (``overrides: {trainer: {max_steps: 20}}``) is still read, with a warning. Each stage is a
point run by :mod:`cgc_lightning.driver` in a process of its own (``stages --child``, as ``compare --child`` and
``grid --point``), one after another: its config, output (``<i>_<name>.log``, also its run's artifact ``logs/``)
and result (``.json``: checkpoints and times, read by this process) lie in ``<default_root_dir>/stages/<parent
run id>/``. A stage that fails ends the chain: its run and the parent are marked FAILED, and the error ends with
the end of its log.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from cgc_lightning import driver
from cgc_lightning.config import STAGES
from cgc_lightning.configs import dotted, get_key, read_base, read_tool_config, resolve, set_key

PARENT_TAG, STAGE_TAG, INDEX_TAG, ADAPTER_TAG = "mlflow.parentRunId", "stage", "stage.index", "stages.adapter"


class StageTimer(Callback):
    """Training time of a ``fit``, logged at its end as ``time/train_steps_s``, ``time/train_steps_cpu_s``
    and ``time/fit_s``.

    ``time/train_steps_s`` adds up the wall time of each training batch from its start to its end
    (forward, backward, optimizer step), leaving out validation, checkpointing and the diagnostics that
    run after the batch; ``time/train_steps_cpu_s`` is the process's CPU time over the same spans (on
    a shared CPU it moves less with the other processes' load than wall time does); ``time/fit_s`` is
    the whole ``fit``. Also kept as attributes of the same names.
    """

    def __init__(self):
        self.train_steps_s = self.train_steps_cpu_s = self.fit_s = 0.0
        self.steps = 0
        self._fit_start = self._batch_start = self._batch_cpu = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.train_steps_s = self.train_steps_cpu_s = 0.0
        self.steps, self._fit_start = 0, time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_start, self._batch_cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.train_steps_s += time.perf_counter() - self._batch_start
        self.train_steps_cpu_s += time.process_time() - self._batch_cpu
        self.steps += 1

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fit_s = time.perf_counter() - self._fit_start
        metrics = {
            "time/train_steps_s": self.train_steps_s,
            "time/train_steps_cpu_s": self.train_steps_cpu_s,
            "time/fit_s": self.fit_s,
        }
        if self.steps:
            metrics["time/train_step_ms"] = 1000 * self.train_steps_s / self.steps
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


@dataclass
class StageSpec:
    """One stage of the chain."""

    stage: Literal["joint", "universal", "domain", "router"]
    """``model.adapter.stage`` of this ``fit``."""
    name: str | None = None
    """Run name suffix and key of its times on the parent; default: the stage."""
    overrides: dict = field(default_factory=dict)
    """``{dotted key: value}`` set for this stage only (after the config-wide ``overrides``)."""

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stages config: unknown stage {self.stage!r}; choose one of {STAGES}")
        self.name = self.name or self.stage
        if not isinstance(self.overrides, dict):
            raise ValueError(f"stages config: stage {self.name!r}: `overrides` must be a mapping")
        self.overrides = dotted(self.overrides, f"stages config, stage {self.name!r}, `overrides`")


@dataclass
class StagesConfig:
    """A chain of training stages over one experiment."""

    base: str | dict
    """An experiment config (as given to ``fit``): a path, relative to the working directory or this file, or inline."""
    stages: list[StageSpec | dict]
    """The stages, run in order; each starts from the previous one's adapter."""
    overrides: dict = field(default_factory=dict)
    """``{dotted key: value}`` set in the base config for every stage (e.g. ``{model.adapter.method: modula_res}``)."""
    init_adapter: str | None = None
    """The adapter the first stage starts from (a saved adapter directory, ``runs:/<run id>/best_adapter``, or
    a ``.ckpt``): a trained MoDULA adapter to add a domain to. Required when the first stage is ``domain`` or
    ``router``."""
    checkpoint: Literal["best", "last"] = "best"
    """Which checkpoint of a stage the next stage starts from."""
    test: bool = True
    """After the last stage, ``test`` its best checkpoint into its run."""
    experiment_name: str | None = None
    """MLflow experiment of the parent and child runs; default: the base config's logger's."""
    run_name: str | None = None
    """The parent run's name; default: ``<method>:<stages file name> seed=<seed> <suffix>``.

    Each stage's run is ``<method>:<stage name> seed=<seed> <suffix>`` (the suffix tells apart runs of one config)."""

    def __post_init__(self):
        if not isinstance(self.overrides, dict):
            raise ValueError(f"stages config: `overrides` must be a mapping, got {type(self.overrides).__name__}")
        self.overrides = dotted(self.overrides, "stages config, `overrides`")
        self.stages = [_stage_spec(s, i) for i, s in enumerate(self.stages)]
        if not self.stages:
            raise ValueError("stages config: `stages` is empty; list at least one stage")
        names = [s.name for s in self.stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"stages config: stage names must be unique; repeated: {repeated} (give `name:`)")
        if self.checkpoint not in ("best", "last"):
            raise ValueError(f"stages config: checkpoint must be 'best' or 'last', got {self.checkpoint!r}")
        if self.stages[0].stage in ("domain", "router") and not self.init_adapter:
            raise ValueError(
                f"stages config: the first stage is {self.stages[0].stage!r}, which continues a trained adapter; "
                "set init_adapter (in the file or with --init_adapter) to the adapter it starts from"
            )


def _stage_spec(value: StageSpec | dict, index: int) -> StageSpec:
    if isinstance(value, StageSpec):
        return value
    known = {f.name for f in fields(StageSpec)}
    if not isinstance(value, dict) or set(value) - known:
        unknown = sorted(set(value) - known) if isinstance(value, dict) else value
        raise ValueError(f"stages config: stage {index}: unknown key(s) {unknown}; a stage has {sorted(known)}")
    return StageSpec(**value)


def load_config(path: str | Path, init_adapter: str | None = None) -> tuple[StagesConfig, dict]:
    """Read a stages config; return it and its base experiment config (a dict, config-wide overrides applied)."""
    path = Path(path)
    raw = read_tool_config(path, StagesConfig, "stages")
    if init_adapter is not None:
        raw["init_adapter"] = init_adapter
    try:
        cfg = StagesConfig(**raw)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    base = read_base(cfg.base, path)
    return cfg, resolve(base, cfg.overrides, f"{path}:")


def stage_config(
    base: dict,
    spec: StageSpec,
    *,
    init_adapter: str | None,
    experiment: str,
    tracking_uri: str,
    run_name: str,
    tags: dict,
) -> dict:
    """The experiment config of one stage: its overrides, stage and starting adapter, a child run, and a timer."""
    config = resolve(base, spec.overrides, f"stages config, stage {spec.name!r}:")
    set_key(config, "model.adapter.stage", spec.stage)
    set_key(config, "model.adapter.init_adapter", init_adapter)
    config = driver.logged_config(
        config, tool="stages", experiment=experiment, run_name=run_name, tracking_uri=tracking_uri, tags=tags
    )
    trainer = config["trainer"]
    trainer["callbacks"] = [*(trainer.get("callbacks") or []), {"class_path": f"{__name__}.StageTimer"}]
    return config


#: A stage's times: its :class:`StageTimer`'s and ``wall_s``; on its run and, as ``time/<stage>/<key>``, its parent.
TIMES = ("train_steps_s", "train_steps_cpu_s", "fit_s", "wall_s")


@dataclass
class StageResult:
    """What one stage's ``fit`` left."""

    name: str
    stage: str
    run_id: str
    checkpoint: str
    """The checkpoint the next stage starts from."""
    train_steps_s: float
    train_steps_cpu_s: float
    fit_s: float
    wall_s: float
    """From the start of the stage's process to the end of its fit: interpreter start-up and imports, model and data
    loading, and the fit; not the last stage's test. What a stage costs, start-up included."""


def run_stage(config_path: str | Path, *, test: bool) -> None:
    """One stage in this process (``stages --child``, started by :func:`run_stages`): ``fit`` with the stage's
    config, then, with ``test``, ``test`` of its best checkpoint into its run.

    What the fit left, its checkpoints, :class:`StageTimer`'s times and when it ended (``fit_end``, seconds since
    the epoch), goes to ``<config>.json`` for the chain to read.
    """
    config_path = Path(config_path)
    args = ["--config", str(config_path)]
    run_id = yaml.safe_load(config_path.read_text())["trainer"]["logger"]["init_args"].get("run_id")
    print(f"stage {config_path.stem}: process {os.getpid()}, run {run_id}", flush=True)
    fitted = driver.fit_and_test(args, what=f"stage {config_path.stem!r}", test=False)
    fit_end = time.time()
    timer = next(c for c in fitted.trainer.callbacks if isinstance(c, StageTimer))
    if fitted.trainer.is_global_zero:
        times = {k: getattr(timer, k) for k in TIMES if k != "wall_s"}
        left = {"run_id": fitted.run_id, "best": fitted.best, "last": fitted.last, **times, "fit_end": fit_end}
        config_path.with_suffix(".json").write_text(json.dumps(left, indent=1))
    if test:
        driver.test_checkpoint(args, fitted.best, fitted.run_id)


def _stage_process(client, config_path: Path, run_id: str, *, test: bool, what: str) -> dict:
    """Run one stage in a process of its own (:func:`run_stage`, through :func:`cgc_lightning.driver.run_logged`),
    its output in ``<config>.log``, which also goes to its run (artifact ``logs/``, as a grid point's log goes to
    the point's run); what its fit left, with ``wall_s``.

    Raises:
        RuntimeError: the stage's process failed; the message ends with the end of its log.
    """
    log = config_path.with_suffix(".log")
    command = driver.child_command("stages", "--child", str(config_path), *(["--test"] if test else []))
    launched = time.time()
    returncode = driver.run_logged(command, log)
    client.log_artifact(run_id, str(log), "logs")
    if returncode:
        if client.get_run(run_id).info.status == "RUNNING":  # the process died before it could end its run
            client.set_terminated(run_id, "FAILED")
        tail = driver.log_tail(log, 30)
        raise RuntimeError(f"{what} failed (exit {returncode}); end of its log {log}:\n{tail}")
    left = json.loads(config_path.with_suffix(".json").read_text())
    return left | {"wall_s": left["fit_end"] - launched}


def run_stages(cfg: StagesConfig, base: dict, *, label: str = "stages") -> tuple[str, list[StageResult]]:
    """Train the stages in order as child runs of a new parent run, each in a process of its own (:func:`run_stage`:
    its fit, and the last one's test, by :func:`cgc_lightning.driver.fit_and_test`), with its config, output
    (``.log``) and result (``.json``) under ``<trainer.default_root_dir>/stages/<parent run id>/``.

    Returns:
        The parent run id and each stage's result.
    """
    from mlflow import MlflowClient

    from cgc_lightning.tracking import DEFAULT_SEED, MLflowLogger, default_tracking_uri, seed_text
    from cgc_lightning.tracking import unique_run_name as named

    init = driver.logger_init(base, "stages")
    tracking_uri = init.get("tracking_uri") or default_tracking_uri()
    experiment = cfg.experiment_name or init.get("experiment_name") or "cgc-lightning"
    method = (get_key(base, "model.adapter") or {}).get("method", "cgc_lora")
    seed = base.get("seed_everything", DEFAULT_SEED)
    stage_list = ",".join(s.stage for s in cfg.stages)
    parent = MLflowLogger(
        experiment_name=experiment,
        run_name=cfg.run_name or named(f"{method}:{label}", seed_text(seed)),
        tracking_uri=tracking_uri,
        tags={"method": method, "stages": stage_list, "stages.role": "parent"},
    )
    client: MlflowClient = parent.experiment
    parent_id = parent.run_id
    client.log_text(parent_id, yaml.safe_dump(asdict(cfg), sort_keys=False), "stages.yaml")
    client.log_param(parent_id, "method", method)
    client.log_param(parent_id, "stages", stage_list)
    if cfg.init_adapter:
        client.log_param(parent_id, "init_adapter", cfg.init_adapter)
    print(f"stages: parent run {parent_id} in experiment {experiment!r} ({tracking_uri})", flush=True)
    root = Path((base.get("trainer") or {}).get("default_root_dir") or "outputs")
    work = root / "stages" / parent_id
    work.mkdir(parents=True, exist_ok=True)
    results: list[StageResult] = []
    init_adapter, status = cfg.init_adapter, "FAILED"
    try:
        for i, spec in enumerate(cfg.stages):
            tags = {PARENT_TAG: parent_id, STAGE_TAG: spec.stage, INDEX_TAG: str(i), "stages.role": "stage"}
            config = stage_config(
                base,
                spec,
                init_adapter=init_adapter,
                experiment=experiment,
                tracking_uri=tracking_uri,
                run_name=named(f"{method}:{spec.name}", seed_text(spec.overrides.get("seed_everything", seed))),
                tags=tags,
            )
            # the stage's run is made here, so it is known (and marked FAILED) even if its process dies early
            logged = config["trainer"]["logger"]["init_args"]
            logged["run_id"] = run_id = MLflowLogger(
                experiment_name=experiment, run_name=logged["run_name"], tracking_uri=tracking_uri, tags=logged["tags"]
            ).run_id
            path = work / f"{i}_{spec.name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            print(f"[{i + 1}/{len(cfg.stages)}] stage {spec.name} ({spec.stage}) from {init_adapter} ...", flush=True)
            log = path.with_suffix(".log")
            print(f"[{i + 1}/{len(cfg.stages)}] stage {spec.name}: config {path}, log {log}", flush=True)
            test = cfg.test and i == len(cfg.stages) - 1
            fitted = _stage_process(client, path, run_id, test=test, what=f"stage {spec.name!r}")
            chosen = fitted[cfg.checkpoint]
            if not chosen:
                raise RuntimeError(f"stage {spec.name!r} saved no {cfg.checkpoint} checkpoint (see {log})")
            client.log_metric(run_id, "time/stage_wall_s", fitted["wall_s"])
            result = StageResult(spec.name, spec.stage, run_id, chosen, *(fitted[k] for k in TIMES))
            for key in TIMES:
                client.log_metric(parent_id, f"time/{spec.name}/{key}", getattr(result, key), step=i)
            results.append(result)
            print(
                f"[{i + 1}/{len(cfg.stages)}] stage {spec.name}: run {run_id}, training steps "
                f"{result.train_steps_s:.1f} s, fit {result.fit_s:.1f} s, wall {result.wall_s:.1f} s",
                flush=True,
            )
            init_adapter = chosen
        last = results[-1]
        for key in TIMES:
            client.log_metric(parent_id, f"time/total/{key}", sum(getattr(r, key) for r in results))
        final = client.get_run(last.run_id).data.metrics
        client.log_batch(
            parent_id,
            metrics=[_metric(k, v) for k, v in final.items() if k.startswith(("test/", "best/"))],
        )
        client.set_tag(parent_id, ADAPTER_TAG, f"runs:/{last.run_id}/best_adapter")
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
    print(format_table(results), flush=True)
    return parent_id, results


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)


def format_table(results: list[StageResult]) -> str:
    rows = [f"{'stage':<12} {'run':<34} {'steps s':>9} {'steps cpu s':>12} {'fit s':>8} {'wall s':>8}"]
    for r in results:
        rows.append(
            f"{r.name:<12} {r.run_id:<34} {r.train_steps_s:>9.1f} {r.train_steps_cpu_s:>12.1f} "
            f"{r.fit_s:>8.1f} {r.wall_s:>8.1f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> tuple[str, list[StageResult]] | None:
    parser = argparse.ArgumentParser(prog="python -m cgc_lightning stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a stages config (experiments/stages/*.yaml)")
    parser.add_argument("--init_adapter", help="the adapter the first stage starts from; overrides the file's")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one stage's config, fitted in this process
    parser.add_argument("--test", action="store_true", help=argparse.SUPPRESS)  # with --child: test it after
    args = parser.parse_args(argv)
    if args.child:
        run_stage(args.child, test=args.test)
        return None
    if not args.config:
        parser.error("the following arguments are required: --config")
    cfg, base = load_config(args.config, args.init_adapter)
    return run_stages(cfg, base, label=Path(args.config).stem)
