"""Per-example evaluation results: each example's task, id, prediction, references and score.

``test`` records them always, validation with ``model.log_val_examples: true``. At the end of the epoch the
ranks' shares are gathered and rank 0 logs one MLflow table artifact to the run: ``examples/test.json``
(``examples/val_step<k>.json``), shown in the run's Artifacts tab and read back with :func:`load_examples`
or ``mlflow.load_table``. Two runs on the same data (same tasks, ``data.seed`` and split fractions) score the
same examples under the same ids, so they compare example by example; ``compare`` and ``grid --summary``
pair them for their confidence intervals.

* ``example_id`` is the example's place in its task's source file (row or BIG-bench example index).
* ``score`` is in [0, 1]: 1/0 for a choice task's correct/wrong pick or an exact match, else the
  example's own F1, ROUGE-L or sentence BLEU (``TaskMetric.example_scores``). The task's metric is the
  mean of its examples' scores, except BLEU, which is a corpus score.
* ``prediction`` is the picked answer choice or the generated text (cut at the first line break).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
COLUMNS = ("task", "example_id", "prediction", "references", "score")


class ExampleRecorder:
    """Collects one evaluation epoch's per-example rows, by stage; choice picks stay on the device until the end."""

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple]] = {}

    def add_choices(self, stage: str, task: str, batch: dict, picked: torch.Tensor, correct: torch.Tensor) -> None:
        self._parts.setdefault(stage, []).append(
            ("choices", task, batch["example_ids"], batch["choices"], batch["references"], picked, correct)
        )

    def add_texts(self, stage: str, task: str, batch: dict, texts: list[str], scores: list[float]) -> None:
        self._parts.setdefault(stage, []).append(
            ("texts", task, batch["example_ids"], texts, batch["references"], scores)
        )

    def pop(self, stage: str) -> list[dict]:
        """This rank's rows of ``stage`` (one host sync for all the choice picks), and forget them."""
        rows = []
        for part in self._parts.pop(stage, []):
            if part[0] == "choices":
                _, task, ids, choices, refs, picked, correct = part
                picks, scores = picked.tolist(), correct.float().tolist()
                preds = [c[i] if 0 <= i < len(c) else "" for c, i in zip(choices, picks, strict=True)]
            else:
                _, task, ids, preds, refs, scores = part
            rows += [
                {"task": task, "example_id": i, "prediction": p, "references": list(r), "score": float(s)}
                for i, p, r, s in zip(ids, preds, refs, scores, strict=True)
            ]
        return rows


def gather(rows: list[dict], world_size: int) -> list[dict]:
    """Every rank's rows on every rank (a collective under DDP: all ranks call it), sorted by task and id."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list = [None] * world_size
        torch.distributed.all_gather_object(everyone, rows)
        rows = [r for part in everyone for r in part]
    return sorted(rows, key=lambda r: (r["task"], r["example_id"]))


def log_examples(logger, rows: list[dict], artifact_file: str) -> None:
    """``rows`` as the MLflow table ``artifact_file`` of the logger's run (the CLI's MLflow logger)."""
    if logger is None or not rows:
        return
    data = {c: [r[c] for r in rows] for c in COLUMNS}
    try:
        logger.experiment.log_table(logger.run_id, data=data, artifact_file=artifact_file)
    except Exception as e:  # a store that fails must not lose the evaluation that produced the rows
        log.warning("could not log the per-example results %s to MLflow: %s", artifact_file, e)


def last_validation(client, run_id: str) -> str | None:
    """``val_step<k>`` of the run's last validation with per-example results (the one its latest ``val/``
    metrics come from), or None."""
    try:
        names = [Path(a.path).name for a in client.list_artifacts(run_id, "examples")]
    except Exception:
        return None
    steps = [int(m.group(1)) for n in names if (m := re.fullmatch(r"val_step(\d+)\.json", n))]
    return f"val_step{max(steps)}" if steps else None


def load_examples(client, run_id: str, stage: str = "test") -> list[dict]:
    """The per-example rows a run logged for ``stage`` (``examples/<stage>.json``); [] if it has none. ``val`` is
    the last validation's (``val_step<k>`` with the largest k), as a run's ``val/`` metrics are."""
    if stage == "val":
        stage = last_validation(client, run_id) or "val"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, f"examples/{stage}.json", tmp)
        except Exception:
            return []
        table = json.loads(Path(path).read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
