r"""Train the same tasks, data split and seed with several methods and report transfer against a reference.

    python -m cgc_lightning compare --config experiments/compare/exp.yaml
    python -m cgc_lightning compare --from-runs --experiment <name> --parent <parent run id>

A comparison is a grid over one axis, the method: each method is one MLflow child run (``fit``, then ``test`` of
its best checkpoint, in a fresh process: :mod:`cgc_lightning.driver`) nested under one parent run, all with the
same metric names, so MLflow's "compare runs" draws every method's per-task curves on one chart. On the parent go
``comparison.csv``, ``comparison.md`` and ``delta_m.png``, and the metrics ``delta_m/<method>``,
``negative_transfer/<method>`` and ``rel/<method>/<task>``. With s_t = -1 for a lower-is-better metric
(``metrics.LOWER_IS_BETTER``), +1 otherwise:

    rel_{m,t} = s_t (M_{m,t} - M_{ref,t}) / |M_{ref,t}|     (M_{ref,t} = 0: s_t (M_{m,t} - M_{ref,t}), flagged)
    Δm_m      = mean_t rel_{m,t}                            (reported in percent)
    negative transfer of m = #{t : rel_{m,t} < 0}

The compare config (YAML)::

    base: experiments/exp.yaml      # an experiment config (path, relative to the working directory), or inline
    methods:                        # method names, or {name: ..., <adapter field or dotted key>: ...} for variants
      - cgc_lora
      - independent_lora
      - {name: cgc_token_gate, method: cgc_lora, gate_input: token}
      - {name: cgc_lr, method: cgc_lora, model.lr: 1.0e-3}      # a dotted key sets any config value
    reference: independent_lora     # a name from methods
    experiment_name: my-compare     # MLflow experiment; default: the base config's
    metric: primary                 # each task's own metric, or `loss` (lower is better)
    overrides: {trainer.max_steps: 100}   # dotted keys, as on the command line; set for every method

The nested form of earlier configs (``overrides: {trainer: {max_steps: 100}}``) is still read, with a warning.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml

from cgc_lightning import chain, driver
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
from cgc_lightning.configs import dotted, get_key, read_base, read_tool_config, resolve, set_key
from cgc_lightning.driver import run_logged  # noqa: F401  (importable from here as before)

ADAPTER_KEY = "model.adapter"


@dataclass
class CompareConfig:
    """A comparison: one base experiment, the methods to train on it, and the reference."""

    base: str | dict
    """An experiment config (same format as ``experiments/*.yaml``): a path, or the config inline."""
    methods: list[str | dict]
    """Method names, or dicts ``{name: <run name>, <AdapterConfig field>: value, <dotted key>: value, ...}``: an
    undotted key is a field of ``model.adapter``, a dotted one any config key (as in ``overrides``)."""
    reference: str = "independent_lora"
    """The method (a name from ``methods``) every relative change is measured against."""
    experiment_name: str | None = None
    """MLflow experiment for the parent and child runs; default: the base config's logger's."""
    metric: Literal["primary", "loss"] = "primary"
    """Compare each task's own metric (``test/<task>/<metric>``) or its loss (``test/<task>/loss``)."""
    overrides: dict = field(default_factory=dict)
    """``{dotted key: value}`` set in the base config for every method (e.g. ``{trainer.max_steps: 100}``)."""

    def __post_init__(self):
        if not isinstance(self.overrides, dict):
            raise ValueError(f"compare config: `overrides` must be a mapping, got {type(self.overrides).__name__}")
        self.overrides = dotted(self.overrides, "compare config, `overrides`")
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
    """Read a compare config; return it and its base experiment config (as a dict, overrides applied)."""
    path = Path(path)
    raw = read_tool_config(path, CompareConfig, "compare")
    cfg = CompareConfig(**raw)
    base = read_base(cfg.base, path)
    return cfg, resolve(base, cfg.overrides, "compare")


def method_overrides(cfg: CompareConfig) -> dict[str, dict]:
    """``{method name: {dotted key: value}}``: the one axis of the comparison (an adapter field ``f`` is
    ``model.adapter.f``)."""
    out = {}
    for m in cfg.methods:
        spec = {"method": m} if isinstance(m, str) else {k: v for k, v in m.items() if k != "name"}
        name = m if isinstance(m, str) else m.get("name", m.get("method"))
        out[name] = {k if "." in k else f"{ADAPTER_KEY}.{k}": v for k, v in spec.items()}
    return out


def method_configs(cfg: CompareConfig, base: dict) -> dict[str, dict]:
    """``{method name: its experiment config}``, each adapter checked against :class:`AdapterConfig` before anything
    runs."""
    out = {}
    for name, overrides in method_overrides(cfg).items():
        config = resolve(base, overrides, f"compare config, method {name!r}:")
        try:
            AdapterConfig(**(get_key(config, ADAPTER_KEY) or {}))
        except TypeError as e:
            valid = [f.name for f in fields(AdapterConfig)]
            raise ValueError(f"compare config, method {name!r}: {e}; adapter fields are {valid}") from None
        except ValueError as e:
            raise ValueError(f"compare config, method {name!r}: {e}") from None
        out[name] = config
    return out


def method_adapters(cfg: CompareConfig, base: dict) -> dict[str, dict]:
    """``{method name: full adapter config}``, each checked against :class:`AdapterConfig` before anything runs."""
    return {name: get_key(config, ADAPTER_KEY) for name, config in method_configs(cfg, base).items()}


def child_run_name(name: str, config: dict, *more: str) -> str:
    """``<method name> [more] seed=<seed> <suffix>``: one method's run, told apart from other runs of its seed."""
    from cgc_lightning.tracking import DEFAULT_SEED, seed_text, unique_run_name

    return unique_run_name(name, *more, seed_text(config.get("seed_everything", DEFAULT_SEED)))


def child_config(base: dict, adapter: dict, *, name: str, experiment: str, tracking_uri: str, parent: str) -> dict:
    """The base experiment with this method's adapter, logging into a child run of ``parent``."""
    config = copy.deepcopy(base)
    set_key(config, ADAPTER_KEY, adapter)
    return method_run_config(config, name=name, experiment=experiment, tracking_uri=tracking_uri, parent=parent)


def method_run_config(config: dict, *, name: str, experiment: str, tracking_uri: str, parent: str) -> dict:
    """A method's experiment config, logging into a child run of ``parent`` named and tagged by the method."""
    tags = {driver.PARENT_TAG: parent, PARENT_TAG: parent, METHOD_TAG: name}
    run_name = child_run_name(name, config)
    return driver.logged_config(
        config, tool="compare", experiment=experiment, run_name=run_name, tracking_uri=tracking_uri, tags=tags
    )


def fit_and_test(config_path: str | Path) -> str:
    """``fit`` then ``test`` of the best checkpoint, in this process (:func:`cgc_lightning.driver.fit_and_test`);
    returns the MLflow run id.

    A MoDULA method left at ``stage: joint`` trains its three stages (``cgc_lightning.chain``): the universal and
    domain stages in runs nested under the method's run, the router stage and the test in the method's run.
    """
    config = yaml.safe_load(Path(config_path).read_text())
    args = ["--config", str(config_path)]
    if not chain.is_chain(config):
        return driver.fit_and_test(args, what=str(config_path)).run_id
    from mlflow import MlflowClient

    init = config["trainer"]["logger"]["init_args"]
    client = MlflowClient(init["tracking_uri"])
    exp = client.get_experiment_by_name(init["experiment_name"])
    exp_id = exp.experiment_id if exp else client.create_experiment(init["experiment_name"])
    name = (init.get("tags") or {}).get(METHOD_TAG) or get_key(config, f"{ADAPTER_KEY}.method")
    run_name = init.get("run_name") or child_run_name(name, config)
    method_run = client.create_run(exp_id, run_name=run_name, tags=init.get("tags") or {}).info.run_id
    root = Path(init.get("checkpoint_dir") or "outputs")

    def stage_run(stage: str) -> chain.StageRun:  # the earlier stages' runs belong to the method's, not the compare
        tags = {driver.PARENT_TAG: method_run, chain.STAGE_RUN_TAG: stage}
        stage_name = child_run_name(name, config, f"stage={stage}")
        run_id = client.create_run(exp_id, run_name=stage_name, tags=tags).info.run_id
        return chain.StageRun(run_id, root / exp_id / run_id / "checkpoints")

    ckpts = root / exp_id / method_run / "checkpoints"
    chained = driver.Chain.of(config, None, stage_run)  # equal thirds of max_steps
    return driver.fit_and_test(args, what=f"method {name!r}", run_id=method_run, folder=ckpts, chained=chained).run_id


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

    configs = method_configs(cfg, base)
    init = driver.logger_init(base, "compare")
    tracking_uri = tracking_uri or init.get("tracking_uri") or default_tracking_uri()
    experiment = cfg.experiment_name or init.get("experiment_name") or "cgc-lightning"
    parent = MLflowLogger(
        experiment_name=experiment,
        run_name=unique_run_name(f"compare:{config_path.stem}", seed_text(base.get("seed_everything", DEFAULT_SEED))),
        tracking_uri=tracking_uri,
        tags={
            ROLE_TAG: "parent",
            "compare.reference": cfg.reference,
            "compare.methods": ",".join(configs),
            "compare.metric": cfg.metric,
        },
    )
    client, parent_id = parent.experiment, parent.run_id
    client.log_text(parent_id, yaml.safe_dump(copy.deepcopy(cfg.__dict__), sort_keys=False), "compare_config.yaml")
    print(f"compare: parent run {parent_id} in experiment {experiment!r} ({tracking_uri})")
    # each method's config and log stay beside the checkpoints, the logs also on the parent run and the method's
    work = Path((base.get("trainer") or {}).get("default_root_dir") or "outputs") / "compare" / parent_id
    work.mkdir(parents=True, exist_ok=True)
    status = "FAILED"
    try:
        for i, (name, method_config) in enumerate(configs.items(), 1):
            print(f"[{i}/{len(configs)}] {name} ...", flush=True)
            start = time.perf_counter()
            path = work / f"{name}.yaml"
            config = method_run_config(
                method_config, name=name, experiment=experiment, tracking_uri=tracking_uri, parent=parent_id
            )
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            if in_process:
                fit_and_test(path)
            else:
                log = work / f"{name}.log"
                print(f"[{i}/{len(configs)}] {name}: config {path}, log {log}", flush=True)
                returncode = driver.run_logged(driver.child_command("compare", "--child", str(path)), log)
                client.log_artifact(parent_id, str(log), "logs")
                # and on the method's own run, where a grid point's or a stage's log is on its run
                query = f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{METHOD_TAG}` = '{name}'"
                for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id], query):
                    client.log_artifact(run.info.run_id, str(log), "logs")
                if returncode:
                    tail = driver.log_tail(log, 30)
                    raise RuntimeError(f"method {name!r} failed (exit {returncode}); end of its log:\n{tail}")
            print(f"[{i}/{len(configs)}] {name}: done in {time.perf_counter() - start:.0f} s", flush=True)
        runs = client.search_runs(
            [client.get_experiment_by_name(experiment).experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'"
        )
        report = report_from_runs(runs, cfg.reference, "test", cfg.metric, order=list(configs))
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
