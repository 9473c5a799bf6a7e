r"""Train the same tasks, data split and seed with several methods and report transfer against a reference.

    python -m cgc_lightning compare --config experiments/compare/exp.yaml
    python -m cgc_lightning compare --from-runs --experiment <name> --parent <parent run id>

Each method is one MLflow child run (``fit``, then ``test`` of its best checkpoint, in a fresh process)
nested under one parent run, all with the same metric names, so MLflow's "compare runs" draws every
method's per-task curves on one chart. On the parent go ``comparison.csv``, ``comparison.md`` and
``delta_m.png``, and the metrics ``delta_m/<method>``, ``negative_transfer/<method>`` and
``rel/<method>/<task>``. With s_t = -1 for a lower-is-better metric (``metrics.LOWER_IS_BETTER``), +1 otherwise:

    rel_{m,t} = s_t (M_{m,t} - M_{ref,t}) / |M_{ref,t}|     (M_{ref,t} = 0: s_t (M_{m,t} - M_{ref,t}), flagged)
    Δm_m      = mean_t rel_{m,t}                            (reported in percent)
    negative transfer of m = #{t : rel_{m,t} < 0}

The compare config (YAML)::

    base: experiments/exp.yaml      # an experiment config (path, relative to the working directory), or inline
    methods:                        # method names, or {name: ..., <adapter field>: ...} for variants
      - cgc_lora
      - independent_lora
      - {name: cgc_token_gate, method: cgc_lora, gate_input: token}
    reference: independent_lora     # a name from methods
    experiment_name: my-compare     # MLflow experiment; default: the base config's
    metric: primary                 # each task's own metric, or `loss` (lower is better)
    overrides: {trainer: {max_steps: 100}}   # merged into the base for every method
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml

from cgc_lightning import chain
from cgc_lightning.compare_report import (  # noqa: F401  (the report's names, importable from here as before)
    METHOD_TAG,
    PARENT_TAG,
    ROLE_TAG,
    Report,
    add_significance,
    build_report,
    delta_m_figure,
    format_csv,
    format_markdown,
    format_table,
    log_report,
    read_runs,
    report_from_runs,
    table_rows,
    write_files,
)
from cgc_lightning.config import AdapterConfig
from cgc_lightning.configs import deep_merge, read_base, read_tool_config, section

MLFLOW_LOGGERS = ("cgc_lightning.tracking.MLflowLogger", "lightning.pytorch.loggers.MLFlowLogger")


@dataclass
class CompareConfig:
    """A comparison: one base experiment, the methods to train on it, and the reference."""

    base: str | dict
    """An experiment config (same format as ``experiments/*.yaml``): a path, or the config inline."""
    methods: list[str | dict]
    """Method names, or dicts ``{name: <run name>, <AdapterConfig field>: value, ...}`` of adapter overrides."""
    reference: str = "independent_lora"
    """The method (a name from ``methods``) every relative change is measured against."""
    experiment_name: str | None = None
    """MLflow experiment for the parent and child runs; default: the base config's logger's."""
    metric: Literal["primary", "loss"] = "primary"
    """Compare each task's own metric (``test/<task>/<metric>``) or its loss (``test/<task>/loss``)."""
    overrides: dict = field(default_factory=dict)
    """Merged into the base config for every method (e.g. ``{trainer: {max_steps: 100}}``)."""

    def __post_init__(self):
        if not self.methods:
            raise ValueError("compare config: `methods` is empty; list at least two methods")
        names = [m if isinstance(m, str) else m.get("name", m.get("method")) for m in self.methods]
        if None in names:
            raise ValueError(f"compare config: a method dict needs `name` or `method`: {self.methods}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"compare config: method names must be unique; repeated: {repeated} (give `name:`)")
        if self.reference not in names:
            raise ValueError(f"compare config: reference {self.reference!r} is not among the methods {names}")
        if self.metric not in ("primary", "loss"):
            raise ValueError(f"compare config: metric must be 'primary' or 'loss', got {self.metric!r}")


def load_config(path: str | Path) -> tuple[CompareConfig, dict]:
    """Read a compare config; return it and its base experiment config (as a dict, overrides merged in)."""
    path = Path(path)
    raw = read_tool_config(path, CompareConfig, "compare")
    cfg = CompareConfig(**raw)
    base = read_base(cfg.base, path)
    return cfg, deep_merge(base, cfg.overrides)


def method_adapters(cfg: CompareConfig, base: dict) -> dict[str, dict]:
    """``{method name: full adapter config}``, each checked against :class:`AdapterConfig` before anything runs."""
    base_adapter = dict(section(copy.deepcopy(base), "model").get("adapter") or {})
    out = {}
    for m in cfg.methods:
        spec = {"method": m} if isinstance(m, str) else {k: v for k, v in m.items() if k != "name"}
        name = m if isinstance(m, str) else m.get("name", m.get("method"))
        adapter = {**base_adapter, **spec}
        try:
            AdapterConfig(**adapter)
        except TypeError as e:
            valid = [f.name for f in fields(AdapterConfig)]
            raise ValueError(f"compare config, method {name!r}: {e}; adapter fields are {valid}") from None
        except ValueError as e:
            raise ValueError(f"compare config, method {name!r}: {e}") from None
        out[name] = adapter
    return out


def child_run_name(name: str, config: dict, *more: str) -> str:
    """``<method name> [more] seed=<seed> <suffix>``: one method's run, told apart from other runs of its seed."""
    from cgc_lightning.tracking import DEFAULT_SEED, seed_text, unique_run_name

    return unique_run_name(name, *more, seed_text(config.get("seed_everything", DEFAULT_SEED)))


def child_config(base: dict, adapter: dict, *, name: str, experiment: str, tracking_uri: str, parent: str) -> dict:
    """The base experiment with this method's adapter, logging into a child run of ``parent``."""
    config = copy.deepcopy(base)
    section(config, "model")["adapter"] = adapter
    trainer = config.setdefault("trainer", {})
    logger = trainer.get("logger")
    if isinstance(logger, dict) and logger.get("class_path", MLFLOW_LOGGERS[0]) not in MLFLOW_LOGGERS:
        raise ValueError(f"compare needs an MLflow logger; the base config's trainer.logger is {logger['class_path']}")
    init = dict((logger or {}).get("init_args", {}) if isinstance(logger, dict) else {})
    tags = {**(init.get("tags") or {}), "mlflow.parentRunId": parent, PARENT_TAG: parent, METHOD_TAG: name}
    init.update(experiment_name=experiment, run_name=child_run_name(name, config), tracking_uri=tracking_uri, tags=tags)
    init.pop("run_id", None)
    trainer["logger"] = {"class_path": MLFLOW_LOGGERS[0], "init_args": init}
    return config


def fit_and_test(config_path: str | Path) -> str:
    """``fit`` then ``test`` of the best checkpoint, in this process; returns the MLflow run id.

    A MoDULA method left at ``stage: joint`` trains its three stages (``cgc_lightning.chain``): the universal and
    domain stages in runs nested under the method's run, the router stage and the test in the method's run.
    """
    from cgc_lightning.cli import main
    from cgc_lightning.tracking import mlflow_logger

    config = yaml.safe_load(Path(config_path).read_text())
    if chain.is_chain(config):
        return _fit_chain_and_test(Path(config_path), config)
    fit = main(["fit", "--config", str(config_path)])
    # the checkpoint callback that monitors a metric (others may only save `last.ckpt` for resuming)
    monitored = [c for c in fit.trainer.checkpoint_callbacks if c.monitor and c.best_model_path]
    best = monitored[0].best_model_path if monitored else ""
    if not best:
        raise RuntimeError(f"{config_path}: fit saved no checkpoint to test; does validation run before max_steps?")
    run_id = mlflow_logger(fit.trainer).run_id
    main(["test", "--config", str(config_path), "--ckpt_path", best, f"--trainer.logger.init_args.run_id={run_id}"])
    return run_id


def _fit_chain_and_test(config_path: Path, config: dict) -> str:
    from mlflow import MlflowClient

    from cgc_lightning.cli import main

    init = config["trainer"]["logger"]["init_args"]
    client = MlflowClient(init["tracking_uri"])
    exp = client.get_experiment_by_name(init["experiment_name"])
    exp_id = exp.experiment_id if exp else client.create_experiment(init["experiment_name"])
    name = (init.get("tags") or {}).get(METHOD_TAG) or section(config, "model").get("adapter", {}).get("method")
    run_name = init.get("run_name") or child_run_name(name, config)
    method_run = client.create_run(exp_id, run_name=run_name, tags=init.get("tags") or {}).info.run_id
    root = Path(init.get("checkpoint_dir") or "outputs")
    # the earlier stages' configs carry no compare tags: their runs belong to the method's run, not to the compare
    stage_cfg = copy.deepcopy(config)
    stage_cfg["trainer"]["logger"]["init_args"]["tags"] = {}
    stage_path = config_path.with_name(f"{config_path.stem}.stages.yaml")
    stage_path.write_text(yaml.safe_dump(stage_cfg, sort_keys=False))

    def fit(args: list[str]) -> None:
        router = "--model.adapter.stage=router" in args
        main(["fit", "--config", str(config_path if router else stage_path), *args])

    def stage_run(stage: str) -> tuple[str, Path]:
        tags = {"mlflow.parentRunId": method_run, chain.STAGE_RUN_TAG: stage}
        stage_name = child_run_name(name, config, f"stage={stage}")
        run_id = client.create_run(exp_id, run_name=stage_name, tags=tags).info.run_id
        return run_id, root / exp_id / run_id / "checkpoints"

    trainer = config.get("trainer") or {}
    val_every = trainer.get("val_check_interval")
    ckpts = root / exp_id / method_run / "checkpoints"
    chain.run_chain(
        fit,
        [],
        int(trainer.get("max_steps") or 0),
        val_every if isinstance(val_every, int) else None,
        None,  # equal thirds of max_steps
        stage_run,
        (method_run, ckpts),
    )
    best = chain.best_checkpoint(ckpts)
    main(
        [
            "test",
            "--config",
            str(config_path),
            "--ckpt_path",
            str(best),
            f"--trainer.logger.init_args.run_id={method_run}",
        ]
    )
    return method_run


def run_logged(command: list[str], log: Path) -> int:
    """Run ``command`` with its output written to ``log`` and, when this process writes to a terminal, shown
    there too (with the child's progress bars live); return its exit code."""
    env = dict(os.environ)
    live = sys.stdout.isatty()
    if live:
        env.setdefault("FORCE_COLOR", "1")  # the child's output is a pipe; its progress bars still draw
    with open(log, "wb") as fh:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for chunk in iter(lambda: proc.stdout.read1(1 << 14), b""):
            fh.write(chunk)
            if live:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
    return proc.wait()


def train(
    cfg: CompareConfig,
    base: dict,
    config_path: Path,
    *,
    tracking_uri: str | None,
    in_process: bool,
    out_dir: Path | None,
) -> Report:
    """Train every method as a child run of a new parent run, then report on the parent."""
    from cgc_lightning.tracking import DEFAULT_SEED, MLflowLogger, default_tracking_uri, seed_text, unique_run_name

    adapters = method_adapters(cfg, base)
    logger = (base.get("trainer") or {}).get("logger")
    init = (logger.get("init_args") or {}) if isinstance(logger, dict) else {}
    tracking_uri = tracking_uri or init.get("tracking_uri") or default_tracking_uri()
    experiment = cfg.experiment_name or init.get("experiment_name") or "cgc-lightning"
    parent = MLflowLogger(
        experiment_name=experiment,
        run_name=unique_run_name(f"compare:{config_path.stem}", seed_text(base.get("seed_everything", DEFAULT_SEED))),
        tracking_uri=tracking_uri,
        tags={
            ROLE_TAG: "parent",
            "compare.reference": cfg.reference,
            "compare.methods": ",".join(adapters),
            "compare.metric": cfg.metric,
        },
    )
    client, parent_id = parent.experiment, parent.run_id
    client.log_text(parent_id, yaml.safe_dump(copy.deepcopy(cfg.__dict__), sort_keys=False), "compare_config.yaml")
    print(f"compare: parent run {parent_id} in experiment {experiment!r} ({tracking_uri})")
    # each method's config and log stay beside the checkpoints, the logs also on the parent run
    work = Path((base.get("trainer") or {}).get("default_root_dir") or "outputs") / "compare" / parent_id
    work.mkdir(parents=True, exist_ok=True)
    status = "FAILED"
    try:
        for i, (name, adapter) in enumerate(adapters.items(), 1):
            print(f"[{i}/{len(adapters)}] {name} ...", flush=True)
            start = time.perf_counter()
            path = work / f"{name}.yaml"
            config = child_config(
                base, adapter, name=name, experiment=experiment, tracking_uri=tracking_uri, parent=parent_id
            )
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            if in_process:
                fit_and_test(path)
            else:
                log = work / f"{name}.log"
                print(f"[{i}/{len(adapters)}] {name}: config {path}, log {log}", flush=True)
                returncode = run_logged([sys.executable, "-m", "cgc_lightning", "compare", "--child", str(path)], log)
                client.log_artifact(parent_id, str(log), "logs")
                if returncode:
                    tail = "\n".join(log.read_text().splitlines()[-30:])
                    raise RuntimeError(f"method {name!r} failed (exit {returncode}); end of its log:\n{tail}")
            print(f"[{i}/{len(adapters)}] {name}: done in {time.perf_counter() - start:.0f} s", flush=True)
        runs = client.search_runs(
            [client.get_experiment_by_name(experiment).experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'"
        )
        report = report_from_runs(runs, cfg.reference, "test", cfg.metric, order=list(adapters))
        add_significance(client, report, "test", cfg.metric)
        log_report(client, parent_id, report, "test", out_dir)
        print(format_table(report, "test"))
        status = "FINISHED"
        return report
    finally:
        client.set_terminated(parent_id, status)


def from_runs(args, cfg: CompareConfig | None) -> Report:
    """Build the report from runs that already exist: a parent's children, or any runs matching a filter."""
    from mlflow import MlflowClient

    from cgc_lightning.tracking import default_tracking_uri

    client = MlflowClient(args.tracking_uri or default_tracking_uri())
    name = args.experiment or (cfg.experiment_name if cfg else None)
    exp = client.get_experiment_by_name(name) if name else None
    if exp is None:
        raise ValueError(f"compare --from-runs: no MLflow experiment {name!r}; pass --experiment")
    reference = args.reference or (cfg.reference if cfg else "independent_lora")
    metric = args.metric or (cfg.metric if cfg else "primary")
    parent = args.parent
    if parent is None and not args.filter:  # the latest comparison in the experiment
        parents = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'parent'", max_results=1)
        if not parents:
            raise ValueError(f"compare --from-runs: no comparison in experiment {name!r}; pass --parent or --filter")
        parent = parents[0].info.run_id
    filters = [f for f in (args.filter, f"tags.`{PARENT_TAG}` = '{parent}'" if parent else None) if f]
    runs = client.search_runs([exp.experiment_id], " and ".join(filters), order_by=["attributes.start_time DESC"])
    if not runs:
        raise ValueError(f"compare --from-runs: no run in {name!r} matches {' and '.join(filters)!r}")
    order = [m if isinstance(m, str) else m.get("name", m.get("method")) for m in cfg.methods] if cfg else None
    report = report_from_runs(runs, reference, args.stage, metric, order)
    add_significance(client, report, args.stage, metric)
    out = Path(args.out) if args.out else None
    print(format_table(report, args.stage))
    if args.no_log:
        if out is not None:
            write_files(report, args.stage, out)
        return report
    target = parent
    if target is None:  # runs picked by a filter: the report gets a run of its own
        tags = {ROLE_TAG: "report", "compare.runs": ",".join(report.run_ids.values())}
        from cgc_lightning.tracking import unique_run_name

        target = client.create_run(exp.experiment_id, run_name=unique_run_name("compare-report"), tags=tags).info.run_id
        client.set_terminated(target)
    log_report(client, target, report, args.stage, out)
    print(f"compare: report logged to run {target}")
    return report


def main(argv: list[str] | None = None) -> Report | None:
    p = argparse.ArgumentParser(prog="python -m cgc_lightning compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="compare config (YAML); see `cgc_lightning/compare.py`")
    p.add_argument("--from-runs", action="store_true", help="build the report from existing runs, no training")
    p.add_argument("--experiment", help="--from-runs: MLflow experiment name")
    p.add_argument("--parent", help="--from-runs: the parent run whose children to compare")
    p.add_argument("--filter", help="--from-runs: MLflow search filter, e.g. \"tags.seed = '7'\"")
    p.add_argument("--reference", help="--from-runs: reference method (default: the config's, or independent_lora)")
    p.add_argument("--metric", choices=["primary", "loss"], help="--from-runs: each task's metric, or its loss")
    p.add_argument("--stage", default="test", choices=["test", "val"], help="--from-runs: which logged metrics")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the project store)")
    p.add_argument("--in-process", action="store_true", help="train the methods in this process, one after another")
    p.add_argument("--out", help="also write comparison.csv, comparison.md and delta_m.png here")
    p.add_argument("--no-log", action="store_true", help="--from-runs: print (and --out) only, log nothing to MLflow")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: fit + test one method's config
    args = p.parse_args(argv)
    if args.child:
        fit_and_test(args.child)
        return None
    cfg, base = load_config(args.config) if args.config else (None, None)
    if args.from_runs:
        return from_runs(args, cfg)
    if cfg is None:
        p.error("give --config (to train and compare) or --from-runs")
    return train(
        cfg,
        base,
        Path(args.config),
        tracking_uri=args.tracking_uri,
        in_process=args.in_process,
        out_dir=Path(args.out) if args.out else None,
    )
