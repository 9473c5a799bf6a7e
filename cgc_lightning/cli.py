"""LightningCLI wiring: subcommands, argument links, defaults. No training logic lives here.

python -m cgc_lightning fit --config experiments/exp.yaml
python -m cgc_lightning test --config experiments/exp.yaml --ckpt_path outputs/<exp>/<run>/checkpoints/best.ckpt

Three more subcommands run whole experiments, each ``fit`` (and ``test``) one or more times; they are
not LightningCLI subcommands and take their own config files:

python -m cgc_lightning compare --config experiments/compare/exp.yaml   methods side by side   (cgc_lightning.compare)
python -m cgc_lightning grid --config experiments/grids/<name>.yaml     an ablation grid       (cgc_lightning.grid)
python -m cgc_lightning stages --config experiments/stages/<name>.yaml  staged training        (cgc_lightning.stages)
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings
import zipfile
from pathlib import Path

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from cgc_lightning.callbacks import GateUsageMonitor, GradientConflictMonitor, SeesawMonitor
from cgc_lightning.callbacks.progress import step_progress_bar
from cgc_lightning.guard import ResumeCheckpoint, RunGuard, check_monitors
from cgc_lightning.module import MultiTaskLoRAModule
from cgc_lightning.tracking import BestAdapterArtifact, MLflowConfigCallback, check_tracking_uri, default_tracking_uri
from datamodules.multitask import MultiTaskDataModule

TRAINER_DEFAULTS = {
    "logger": {"class_path": "cgc_lightning.tracking.MLflowLogger"},
    "default_root_dir": "outputs",
    "log_every_n_steps": 10,
}
_CKPT_RUN = re.compile(r"(?P<exp>[^/]+)/(?P<run>[0-9a-f]{32})/checkpoints/[^/]+\.ckpt$")
_SECTIONS = {
    "AdapterConfig": "model.adapter",
    "ModelSpec": "model.model",
    "MultiTaskLoRAModule": "model",
    "MultiTaskDataModule": "data",
    "TaskSpec": "data.tasks",
    "ResumeCheckpoint": "resume_checkpoint",
}
_OURS = tuple(str(Path(__file__).resolve().parents[1] / pkg) for pkg in ("cgc_lightning", "datamodules"))


def our_config_error(error: BaseException) -> str | None:
    """What our own config checks said, under whatever jsonargparse wrapped it in, with the config section."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb, owners = error.__traceback__, []
        while tb is not None:  # the classes whose methods the error passed through, innermost last
            frame = tb.tb_frame
            # a method's own check (a plain function of the registry) speaks for the config that called it
            if not (frame.f_code.co_filename.endswith("methods.py") and "self" not in frame.f_locals):
                owners.append(type(frame.f_locals.get("self")).__name__)
            if tb.tb_next is None:
                break
            tb = tb.tb_next
        ours = isinstance(error, ValueError) and tb is not None and tb.tb_frame.f_code.co_filename.startswith(_OURS)
        if ours and found is None:  # the outermost of ours: it names the file or key (ModelLoadError from ValueError)
            found = (error, owners[-1] if owners else "")
        error = error.__cause__ or error.__context__
    if found is None:
        return None
    message, section = str(found[0]), _SECTIONS.get(found[1])
    return f"{section}: {message}" if section and not message.startswith(section) else message


class CGCLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the data module tokenises with the model's tokenizer
        parser.link_arguments("model.model", "data.tokenizer")
        # task count, names, clusters and metrics come from the data: nobody repeats them for the model
        parser.link_arguments("data.task_names", "model.task_names", apply_on="instantiate")
        parser.link_arguments("data.task_clusters", "model.task_clusters", apply_on="instantiate")
        parser.link_arguments("data.task_metrics", "model.task_metrics", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt every N steps, at most once a minute, so a crash loses at most that much: `fit --ckpt_path last`
        # resumes from it
        parser.add_lightning_class_args(ResumeCheckpoint, "resume_checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(BestAdapterArtifact, "best_adapter")
        # seesaw diagnostics, on by default; `<name>.enabled: false` turns one off
        parser.add_lightning_class_args(SeesawMonitor, "seesaw")
        parser.add_lightning_class_args(GradientConflictMonitor, "grad_conflict")
        parser.add_lightning_class_args(GateUsageMonitor, "gate_usage")
        # a NaN/inf loss stops the run, Ctrl-C keeps a checkpoint, monitored metrics are checked before step 1
        parser.add_lightning_class_args(RunGuard, "guard")
        parser.set_defaults(
            {
                "lr_monitor.logging_interval": "step",
                "checkpoint.monitor": "val/avg/score",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best",
                "resume_checkpoint.every_n_train_steps": 50,
                "resume_checkpoint.min_interval_s": 60,
                "resume_checkpoint.save_top_k": 0,
                "resume_checkpoint.save_last": True,
                # both write `last.ckpt` (whichever saved last holds the newest state); with the version counter
                # on, the second would write `last-v1.ckpt` and leave a stale `last.ckpt` for `--ckpt_path last`
                "checkpoint.enable_version_counter": False,
                "resume_checkpoint.enable_version_counter": False,
            }
        )

    def instantiate_classes(self) -> None:
        # a bad value in the config (r: 0, lr: -1, ...) is one line naming it, not a dump of the namespace
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as e:
            ours = our_config_error(e)
            if ours is None and isinstance(e, MisconfigurationException):
                ours = f"trainer: {e}"  # Lightning's own check of a trainer value (max_steps: -5, ...)
            if ours is None:
                raise
            self._refuse(ours)

    def _refuse(self, message: str) -> None:
        sub = getattr(self, "subcommand", None) or self.config.get("subcommand")
        sources = [str(c) for c in (self.config.get(sub, self.config).get("config") or [])]
        where = f" (in {', '.join(sources)} and the command line)" if sources else ""
        print(f"error: {message}{where}", file=sys.stderr)
        raise SystemExit(2) from None

    def _run_subcommand(self, subcommand: str) -> None:
        # our checks that run once fit/validate/test has started (data files read in prepare_data, monitored
        # metric names) are one line too; a failure in training itself keeps its traceback
        try:
            super()._run_subcommand(subcommand)
        except ValueError as e:
            ours = our_config_error(e)
            if ours is None:
                raise
            self._refuse(ours)

    def before_fit(self) -> None:
        check_monitors(self.trainer, self.model)  # before the MLflow run exists, not in the first setup hook

    def _parse_ckpt_path(self) -> None:
        # a missing or foreign --ckpt_path is named before Lightning unpickles it, or the model loads
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry") and not str(ckpt).startswith("registry:"):
            path = Path(ckpt)
            if not path.is_file():
                self._refuse(f"ckpt_path: {ckpt} does not exist (give a checkpoint file, or `last` with fit)")
            if not zipfile.is_zipfile(path):
                self._refuse(
                    f"ckpt_path: {ckpt} is not a checkpoint (not a torch zip file): truncated or another file?"
                )
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # our bar (real totals under max_steps), unless the bar is off or the config brings its own
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, step_progress_bar()]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        self._show_run()

    def after_validate(self) -> None:
        print_results(self.model.results.get("val", []), "validate")
        self._show_run()

    def after_test(self) -> None:
        print_results(self.model.results.get("test", []), "test")
        self._show_run()

    def _show_run(self) -> None:
        """Put the run's scores into the experiment's runs view and say where to see it."""
        from cgc_lightning.runs_view import runs_url, ui_command, update_runs_view
        from cgc_lightning.tracking import mlflow_logger

        logger = mlflow_logger(self.trainer)
        if logger is None or not self.trainer.is_global_zero or logger._run_id is None:
            return
        exp = logger.experiment_id
        try:
            client = logger.experiment
            update_runs_view(client, exp, client.get_run(logger.run_id).data.metrics)
        except Exception as e:  # the store is unreachable: the run's own metrics are kept (tracking.py); say so
            print(f"MLflow run {logger.run_id}: could not update the runs view ({type(e).__name__})", file=sys.stderr)
            return
        print(f"MLflow run {logger.run_id}: `{ui_command(logger._tracking_uri)}`, then {runs_url(exp)}", flush=True)

    def before_instantiate_classes(self) -> None:
        # `test`/`validate` of a checkpoint written by `fit` logs into that fit's MLflow run
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        ckpt = getattr(cfg, "ckpt_path", None)
        logger = cfg.trainer.logger
        init = getattr(logger, "init_args", None) if not isinstance(logger, bool) else None
        if init is not None and "mlflow" in str(getattr(logger, "class_path", "")).lower():
            # a tracking server that is down fails the run here, before the model loads
            check_tracking_uri(getattr(init, "tracking_uri", None) or default_tracking_uri())
        interval = getattr(cfg.trainer, "val_check_interval", None)
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
            self._refuse(
                f"trainer.val_check_interval must be positive (steps, or a fraction of an epoch), got {interval}"
            )
        if self.subcommand in ("test", "validate"):
            # Lightning's table repeats every task's metrics under every dataloader's column; ours is a row each
            cfg.verbose = False
        if self.subcommand == "fit" and ckpt == "last":
            cfg.ckpt_path = ckpt = find_last_checkpoint(cfg)
        if self.subcommand in ("test", "validate", "predict", "fit") and ckpt and not isinstance(logger, bool):
            m = _CKPT_RUN.search(Path(ckpt).resolve().as_posix())
            init = getattr(logger, "init_args", None)
            if m and init is not None and getattr(init, "run_id", None) is None:
                init.run_id = m.group("run")
                init.resume = self.subcommand == "fit"


def print_results(rows: list[tuple], title: str) -> None:
    """One row per task: its metric, the value and the loss, then the average over tasks."""
    if not rows:
        return
    width = max(len("task"), len("average"), *(len(t) for t, *_ in rows))
    lines = [f"{title} results", f"{'task':<{width}}  {'metric':<12} {'value':>8} {'loss':>8}"]
    for task, metric, value, loss in rows:
        loss_text = f"{float(loss):>8.4f}" if loss is not None else f"{'-':>8}"
        lines.append(f"{task:<{width}}  {metric:<12} {float(value):>8.4f} {loss_text}")
    mean = sum(float(v) for _, _, v, _ in rows) / len(rows)
    lines.append(f"{'average':<{width}}  {'score':<12} {mean:>8.4f}")
    print("\n".join(lines), flush=True)


def find_last_checkpoint(cfg) -> str:
    """The newest ``last.ckpt`` of this config's MLflow experiment, for ``fit --ckpt_path last``."""
    logger = cfg.trainer.logger
    init = getattr(logger, "init_args", None) if not isinstance(logger, bool) else None
    root = Path(getattr(init, "checkpoint_dir", None) or cfg.trainer.default_root_dir or "outputs")
    experiment = getattr(init, "experiment_name", None) or "cgc-lightning"
    found = sorted(root.glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if init is not None:
        from mlflow import MlflowClient

        from cgc_lightning.tracking import default_tracking_uri

        exp = MlflowClient(getattr(init, "tracking_uri", None) or default_tracking_uri()).get_experiment_by_name(
            experiment
        )
        found = [p for p in found if exp is not None and p.parts[-4] == exp.experiment_id]
    if not found:
        raise SystemExit(
            f"--ckpt_path last: no last.ckpt of experiment {experiment!r} under {root}/<experiment id>/<run id>/"
            "checkpoints; give the checkpoint's path instead"
        )
    return str(found[-1])


#: Subcommands that are not LightningCLI's: ``module`` (its ``main(argv)``) or ``module:function``.
TOOLS = {
    "compare": "cgc_lightning.compare",
    "grid": "cgc_lightning.grid",
    "stages": "cgc_lightning.stages",
    "export": "cgc_lightning.export_cli",
    "merge": "cgc_lightning.export_cli:merge_main",
}


def _config_paths(argv: list[str]) -> list[str]:
    """The files given as ``--config PATH`` or ``--config=PATH``."""
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return paths + [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]


def check_yaml_syntax(argv: list[str]) -> None:
    """A YAML syntax error in a ``--config`` file is one line that names the file and line.

    (jsonargparse would say ``<unicode string>``.)
    """
    for path in _config_paths(argv):
        try:
            text = Path(path).read_text()
        except OSError:
            continue  # a missing file: jsonargparse's own error names it
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
            if context and start is not None:
                context += f" that starts at line {start.line + 1}, column {start.column + 1}"
            print(f"error: {path}{where}: {problem}" + (f" ({context})" if context else ""), file=sys.stderr)
            raise SystemExit(2) from None


def main(args: list[str] | None = None) -> CGCLightningCLI | None:
    argv = sys.argv[1:] if args is None else args
    check_yaml_syntax(argv)
    if argv and argv[0] in TOOLS:
        module, _, function = TOOLS[argv[0]].partition(":")
        result = getattr(importlib.import_module(module), function or "main")(argv[1:])
        if isinstance(result, int) and result:  # grid: the number of points that failed
            raise SystemExit(result)
        return None
    with warnings.catch_warnings():
        if args is not None:  # called with its arguments (grid points, stages, compare's methods, benchmarks): the
            # command line is the caller's own, not meant for this CLI, and Lightning's warning about both is noise
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return CGCLightningCLI(
            MultiTaskLoRAModule,
            MultiTaskDataModule,
            save_config_callback=MLflowConfigCallback,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=42,
            args=args,
        )
