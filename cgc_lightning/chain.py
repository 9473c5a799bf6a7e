r"""A MoDULA grid point as MoDULA trains: universal, then domain, then router stage, as one point.

A grid point whose method is ``modula_res`` or ``modula_flan`` and whose ``model.adapter.stage`` is left at
``joint`` (the default) runs the method's three stages (METHODS.md section 3) one after another, each a ``fit``
that starts from the previous stage's best checkpoint (``model.adapter.init_adapter``), which freezes what the
earlier stages trained. The point's ``trainer.max_steps`` is the budget of the whole chain, split by the grid
config's ``modula_stages`` (default ``{universal: 1, domain: 1, router: 1}``: equal thirds; the shares are
relative). The universal and domain stages log into their own MLflow runs, children of the point's run (tag
``grid.modula_stage``); the router stage logs into the point's run, and the point's ``test`` scores its best
checkpoint, so the point is reported like any other method. A point pinned to one stage
(``model.adapter.stage: router``) runs that stage alone, as before.

A chain interrupted part way continues where it stopped when the grid is run again: a stage whose fit finished
(its run FINISHED, a checkpoint in its folder) is not trained again, the stage that was cut off resumes from its
``last.ckpt`` in its own run, and later stages run as usual (:class:`StageRun` says which, per stage). Once a stage
trains, every stage after it starts over from its new weights, whatever it kept from before.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cgc_lightning.config import MODULA_METHODS

STAGE_ORDER = ("universal", "domain", "router")
STAGE_RUN_TAG = "grid.modula_stage"
DEFAULT_SPLIT = {"universal": 1.0, "domain": 1.0, "router": 1.0}


def is_chain(config: dict) -> bool:
    """Whether a point's resolved config is a MoDULA method left at the single-stage default."""
    adapter = (config.get("model") or {}).get("adapter") or {}
    return adapter.get("method") in MODULA_METHODS and adapter.get("stage", "joint") == "joint"


def stage_steps(max_steps: int, split: dict[str, float] | None) -> dict[str, int]:
    """``max_steps`` shared out over the three stages in proportion to ``split`` (each stage at least 1 step)."""
    split = dict(DEFAULT_SPLIT if split is None else split)
    if set(split) != set(STAGE_ORDER) or any(not v > 0 for v in split.values()):
        raise ValueError(f"modula_stages must give a positive share to each of {list(STAGE_ORDER)}, got {split}")
    if max_steps < len(STAGE_ORDER):
        raise ValueError(f"a MoDULA point needs trainer.max_steps >= 3 (one per stage), got {max_steps}")
    total = sum(split.values())
    steps = {s: max(1, int(max_steps * split[s] / total)) for s in STAGE_ORDER}
    steps["router"] += max_steps - sum(steps.values())  # rounding goes to the last stage
    return steps


@dataclass(frozen=True)
class StageRun:
    """The MLflow run a stage logs into, its checkpoint folder, and what the stage still has to do there."""

    run_id: str
    folder: Path
    state: Literal["new", "resume", "done"] = "new"
    """``new``: fit from the start; ``resume``: continue the fit from ``folder/last.ckpt``; ``done``: its fit
    finished (its best checkpoint is in ``folder``), the chain goes on from there."""


def best_checkpoint(folder: Path) -> Path | None:
    return next((p for p in (folder / "best.ckpt", folder / "last.ckpt") if zipfile.is_zipfile(p)), None)


def run_chain(
    fit: Callable[[list[str]], None],
    common: list[str],
    max_steps: int,
    val_every: int | None,
    split: dict[str, float] | None,
    stage_run: Callable[[str], StageRun],
    point_run: StageRun,
) -> None:
    """Fit the stages that are not done yet; the router stage into ``point_run``.

    ``fit(args)`` runs ``python -m cgc_lightning fit`` with ``common`` + ``args`` in this process;
    ``stage_run(stage)`` gives the run of an earlier stage (made, or found again from an interrupted chain).
    Each stage validates every ``val_every`` steps (the point's ``trainer.val_check_interval``) and at its end.
    """
    steps = stage_steps(max_steps, split)
    previous: Path | None = None
    retrained = False  # once a stage trains, the stages after it start from its new weights, whatever they kept
    for stage in STAGE_ORDER:
        run = point_run if stage == "router" else stage_run(stage)
        if not retrained and run.state == "done" and (kept := best_checkpoint(run.folder)) is not None:
            previous = kept
            continue
        if retrained and run.state != "new":
            run = StageRun(run.run_id, run.folder, "new")
        retrained = True
        args = [
            f"--model.adapter.stage={stage}",
            f"--trainer.max_steps={steps[stage]}",
            f"--trainer.val_check_interval={min(steps[stage], val_every or steps[stage])}",
            f"--trainer.logger.init_args.run_id={run.run_id}",
        ]
        if previous is not None:
            args.append(f"--model.adapter.init_adapter={previous}")
        if run.state == "resume":  # the same run, its steps not logged twice
            args += ["--ckpt_path", str(run.folder / "last.ckpt"), "--trainer.logger.init_args.resume=true"]
        fit([*common, *args])
        previous = best_checkpoint(run.folder)
        if previous is None:
            raise RuntimeError(f"MoDULA stage {stage}: fit wrote no checkpoint under {run.folder}")
