r"""The run driver: one training run of ``compare``, ``stages`` or ``grid``, from its config to a finished MLflow run.

    config = logged_config(base, tool="compare", experiment=..., run_name=..., tracking_uri=..., tags={...})
    result = fit_and_test(["--config", path], what="method 'cgc_lora'")          # in this process
    code = run_logged(child_command("compare", "--child", path), log)            # in a process of its own

A run is ``fit``, then ``test`` of its best checkpoint into the same MLflow run (``cgc_lightning.cli.main``, as
on the command line: the arguments are ``--config`` files and dotted ``--key=value`` overrides, which jsonargparse
merges). Each tool makes its runs children of one parent run (tag ``mlflow.parentRunId``). A MoDULA method left at
``stage: joint`` trains its three stages (:mod:`cgc_lightning.chain`): the universal and domain stages in runs of
their own, nested under the run, the router stage and the test in the run itself. A run interrupted after
``last.ckpt`` is resumed from it in the same run (:func:`resume_plan`), one whose fit finished is only tested.

Who uses it: ``compare`` runs each method in a child process (``compare --child``) with its output in a log file,
``grid`` each point (``grid --point``, side by side), ``stages`` each stage (``stages --child``, one after
another).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgc_lightning import chain

#: The logger classes a tool's base config may name; the runs log through the first (it knows ``checkpoint_dir``
#: and ``resume``), which :func:`logged_config` puts in place of the second.
MLFLOW_LOGGERS = ("cgc_lightning.tracking.MLflowLogger", "lightning.pytorch.loggers.MLFlowLogger")
PARENT_TAG = "mlflow.parentRunId"


def logger_init(config: dict, tool: str, *, ours_only: bool = False) -> dict:
    """The ``init_args`` of the config's ``trainer.logger`` (``{}`` when it names none).

    Raises:
        ValueError: the logger is not one of :data:`MLFLOW_LOGGERS` (with ``ours_only``: not the first, or off).
    """
    logger = (config.get("trainer") or {}).get("logger")
    accepted = MLFLOW_LOGGERS[:1] if ours_only else MLFLOW_LOGGERS
    if (ours_only and logger is False) or (
        isinstance(logger, dict) and logger.get("class_path", MLFLOW_LOGGERS[0]) not in accepted
    ):
        shown = logger.get("class_path") if isinstance(logger, dict) else logger
        raise ValueError(
            f"{tool} needs the MLflow logger ({' or '.join(accepted)}); the base config's trainer.logger is {shown!r}"
        )
    return dict(logger.get("init_args") or {}) if isinstance(logger, dict) else {}


def logged_config(
    config: dict, *, tool: str, experiment: str, run_name: str, tracking_uri: str, tags: dict[str, str]
) -> dict:
    """A copy of ``config`` that logs into a new run ``run_name`` of ``experiment`` with ``tags`` added to its own
    (``mlflow.parentRunId`` among them makes it a child run); the base's logger settings are kept otherwise."""
    import copy

    config = copy.deepcopy(config)
    init = logger_init(config, tool)
    init.update(
        experiment_name=experiment,
        run_name=run_name,
        tracking_uri=tracking_uri,
        tags={**(init.get("tags") or {}), **tags},
    )
    init.pop("run_id", None)
    config.setdefault("trainer", {})["logger"] = {"class_path": MLFLOW_LOGGERS[0], "init_args": init}
    return config


# ------------------------------------------------------------------------------------------------ in process


@dataclass
class Chain:
    """A MoDULA run's three stages (:func:`cgc_lightning.chain.run_chain`)."""

    max_steps: int
    """The budget of the whole chain, shared out over the stages."""
    val_every: int | None
    """Each stage validates every this many steps (and at its end)."""
    split: dict[str, float] | None
    """Shares of ``max_steps`` per stage; ``None``: equal thirds."""
    stage_run: Callable[[str], chain.StageRun]
    """The child run of an earlier stage: made, or found again (and how far it got) when resuming."""

    @classmethod
    def of(cls, config: dict, split: dict[str, float] | None, stage_run: Callable[[str], chain.StageRun]) -> Chain:
        trainer = config.get("trainer") or {}
        val_every = trainer.get("val_check_interval")
        return cls(
            int(trainer.get("max_steps") or 0), val_every if isinstance(val_every, int) else None, split, stage_run
        )


@dataclass
class Result:
    """What a run left."""

    run_id: str
    best: str
    """The best checkpoint (``last.ckpt`` where nothing was monitored): the one tested."""
    last: str
    """The last checkpoint (empty where none was saved)."""
    trainer: Any = None
    """The ``fit``'s trainer (its callbacks hold what the fit measured); ``None`` when only tested, or chained."""


def fit(args: list[str], what: str) -> Any:
    """``fit`` with ``args`` in this process; its trainer. Raises when the fit was interrupted (Ctrl-C, SIGTERM)."""
    from cgc_lightning import cli

    trainer = cli.main(["fit", *args]).trainer
    if trainer.interrupted or getattr(trainer, "received_sigterm", False):
        raise RuntimeError(f"{what}: fit was interrupted")
    return trainer


def fit_and_test(
    args: list[str],
    *,
    what: str,
    run_id: str | None = None,
    folder: Path | None = None,
    resume: bool = False,
    test_only: bool = False,
    chained: Chain | None = None,
    test: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> Result:
    """``fit`` with ``args`` (``--config`` files and ``--key=value`` overrides), then ``test`` of its best checkpoint.

    Args:
        args: as for ``python -m cgc_lightning fit``, without the subcommand.
        what: names the run in errors (``point 1a2b3c``, ``method 'cgc_lora'``).
        run_id: log into this run (made beforehand); default: the logger's config makes one.
        folder: the run's checkpoint folder, where it is known beforehand (with ``run_id``); default: the fit's.
        resume: continue the fit from ``folder/last.ckpt``, in the same run, without logging its steps again.
        test_only: the fit finished before: only test the best checkpoint in ``folder``.
        chained: a MoDULA chain: fit its three stages, the router stage into ``run_id`` (needs ``run_id``, ``folder``).
        test: test the best checkpoint after the fit.
        on_step: told ``fit``, ``fit_done``, ``test`` and ``done`` as the run gets there (the grid tags its run).
    """
    from cgc_lightning.tracking import mlflow_logger

    step = on_step or (lambda _: None)
    into = [f"--trainer.logger.init_args.run_id={run_id}"] if run_id else []
    trainer = None
    if not test_only:
        step("fit")
        if chained is not None:
            if run_id is None or folder is None:
                raise ValueError(f"{what}: a MoDULA chain logs into a run made beforehand; give run_id and folder")
            chain.run_chain(
                lambda stage_args: fit(stage_args, f"{what}, a MoDULA stage's"),
                list(args),
                chained.max_steps,
                chained.val_every,
                chained.split,
                chained.stage_run,
                chain.StageRun(run_id, folder, "resume" if resume else "new"),
            )
        else:
            extra = (
                ["--ckpt_path", str(folder / "last.ckpt"), "--trainer.logger.init_args.resume=true"] if resume else []
            )
            trainer = fit([*args, *into, *(extra if resume else [])], what)
            run_id = run_id or mlflow_logger(trainer).run_id
        step("fit_done")
    best, last = _checkpoints(trainer, folder)
    if not best:
        where = folder if folder is not None else "its checkpoint folder"
        raise RuntimeError(f"{what}: fit wrote no checkpoint under {where}; does validation run before max_steps?")
    if test:
        step("test")
        test_checkpoint(args, best, run_id)
    step("done")
    return Result(run_id, best, last, trainer)


def test_checkpoint(args: list[str], checkpoint: str, run_id: str) -> None:
    """``test`` of ``checkpoint`` with ``args`` (as the fit's), logged into the fit's run."""
    from cgc_lightning import cli

    cli.main(["test", *args, "--ckpt_path", checkpoint, f"--trainer.logger.init_args.run_id={run_id}"])


def _checkpoints(trainer: Any, folder: Path | None) -> tuple[str, str]:
    """``(best, last)``: from the fit's checkpoint callbacks, or (no trainer at hand) from the run's folder."""
    if trainer is None:
        best = chain.best_checkpoint(folder) if folder is not None else None
        last = folder / "last.ckpt" if folder is not None and zipfile.is_zipfile(folder / "last.ckpt") else None
        return str(best or ""), str(last or "")
    # the callback that monitors a metric (others may only save `last.ckpt` for resuming)
    monitored = [c for c in trainer.checkpoint_callbacks if c.monitor and c.best_model_path]
    last = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), "")
    return (monitored[0].best_model_path if monitored else last), last


def resume_plan(stage_tag: str | None, folder: Path) -> str:
    """How to continue a run that did not finish, from what it left in ``folder``: ``test`` (its fit finished,
    ``stage_tag`` says so, and a checkpoint is there), ``resume`` (from ``last.ckpt``) or ``restart`` (nothing usable:
    a process killed while writing a checkpoint leaves a truncated zip, not something to continue from)."""
    usable = [c for c in ("best.ckpt", "last.ckpt") if zipfile.is_zipfile(folder / c)]
    if stage_tag in ("fit_done", "test") and usable:
        return "test"
    return "resume" if "last.ckpt" in usable else "restart"


# ----------------------------------------------------------------------------------------- child processes


def child_command(tool: str, *args: str) -> list[str]:
    """``python -m cgc_lightning <tool> <args>`` with this interpreter."""
    return [sys.executable, "-m", "cgc_lightning", tool, *args]


def start_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Any]:
    """Start ``command`` with its output appended to ``log``; the process and the open log (close it when it ends).
    For runs side by side, whose output would interleave on a terminal."""
    fh = open(log, "a")  # noqa: SIM115 (the caller closes it when the process ends)
    return subprocess.Popen(command, env=env, stdout=fh, stderr=subprocess.STDOUT), fh


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


def log_tail(log: Path, lines: int) -> str:
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
