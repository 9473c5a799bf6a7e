"""MLflowLogger keeps logged metrics in memory and writes them to the store in one request at most every
``flush_every_s``: each metric keeps its own step and time, and nothing is lost at a checkpoint, at the end of
the run, or while the store is unreachable. A real SQLite store throughout."""

from __future__ import annotations

import json
import time

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from cgc_lightning import tracking


def logger_counting_writes(tmp_path, **kwargs):
    """A logger on a SQLite store under ``tmp_path``, and the list of metric counts of its ``log_batch`` requests."""
    logger = tracking.MLflowLogger(experiment_name="writes", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", **kwargs)
    writes: list[int] = []
    client = logger.experiment
    real = client.log_batch

    def counting(*args, **kw):
        writes.append(len(kw["metrics"]))
        return real(*args, **kw)

    client.log_batch = counting  # the real write, counted
    return logger, writes


def history(logger, key: str) -> list[tuple[int, float, int]]:
    return [(m.step, m.value, m.timestamp) for m in logger.experiment.get_metric_history(logger.run_id, key)]


def now_ms() -> int:
    return int(time.time() * 1000)


def test_metrics_wait_in_memory_then_go_in_one_request_with_their_own_steps_and_times(tmp_path):
    logger, writes = logger_counting_writes(tmp_path, flush_every_s=3600)
    logger.log_metrics({"train/loss": 0.5}, step=0)
    assert writes == [1], "the first call writes at once: the run shows up in the UI with its first metric"
    windows = {}
    for step in range(1, 5):
        before = now_ms()
        logger.log_metrics({"train/loss": float(step), "lr-AdamW": 0.1 * step}, step=step)
        windows[step] = (before, now_ms())
        time.sleep(0.02)
    assert writes == [1] and [s for s, _, _ in history(logger, "train/loss")] == [0], "kept in memory"
    assert len(logger.pending) == 4
    logger.finalize("success")
    assert writes == [1, 8], "the four calls' eight metrics in one request"
    rows = history(logger, "train/loss")
    assert [(s, v) for s, v, _ in rows] == [(0, 0.5), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    for step, _, stamp in rows[1:]:
        lo, hi = windows[step]
        assert lo <= stamp <= hi, f"step {step} carries the time it was logged, not the time it was written"
    assert [(s, v) for s, v, _ in history(logger, "lr-AdamW")] == [(s, 0.1 * s) for s in range(1, 5)]
    assert logger.experiment.get_run(logger.run_id).info.status == "FINISHED"


def test_a_call_later_than_flush_every_s_after_the_last_write_writes_at_once(tmp_path):
    logger, writes = logger_counting_writes(tmp_path, flush_every_s=0.3)
    logger.log_metrics({"a": 1.0}, step=0)
    logger.log_metrics({"a": 2.0}, step=1)
    assert writes == [1]
    time.sleep(0.35)
    logger.log_metrics({"a": 3.0}, step=2)
    assert writes == [1, 2] and [s for s, _, _ in history(logger, "a")] == [0, 1, 2]

    every_call, writes0 = logger_counting_writes(tmp_path / "0", flush_every_s=0)
    for step in range(3):
        every_call.log_metrics({"a": float(step)}, step=step)
    assert writes0 == [1, 1, 1], "flush_every_s=0 writes every call, as Lightning's own logger"


def test_a_checkpoint_writes_what_was_kept(tmp_path):
    """So a resume from that checkpoint finds every earlier step in the store, even after a SIGKILL."""
    logger, writes = logger_counting_writes(tmp_path, flush_every_s=3600)
    for step in range(3):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    assert writes == [1]
    logger.after_save_checkpoint(ModelCheckpoint(dirpath=tmp_path / "ckpt"))
    assert writes == [1, 2] and not logger.pending
    assert [s for s, _, _ in history(logger, "train/loss")] == [0, 1, 2]
    # Lightning logs the checkpointed step's own metrics after saving, then calls save(): they go out then
    logger.log_metrics({"train/loss": 3.0}, step=3)
    assert writes == [1, 2]
    logger.save()
    assert writes == [1, 2, 1] and [s for s, _, _ in history(logger, "train/loss")] == [0, 1, 2, 3]
    logger.log_metrics({"train/loss": 4.0}, step=4)
    logger.save()
    assert writes == [1, 2, 1], "without a checkpoint, save() leaves the metrics to flush_every_s"


def test_metrics_kept_while_the_store_is_unreachable_keep_their_times_and_replay(tmp_path):
    logger, writes = logger_counting_writes(tmp_path, flush_every_s=3600)
    logger.log_metrics({"train/loss": 0.0}, step=0)
    stamps = {}
    for step in range(1, 4):
        stamps[step] = now_ms()
        logger.log_metrics({"train/loss": float(step)}, step=step)
        time.sleep(0.01)

    def unreachable(*args, **kwargs):
        raise ConnectionError("the store went away")

    logger.experiment.log_batch = unreachable
    with pytest.warns(UserWarning) as caught:
        logger.finalize("success")
    text = " ".join(str(w.message) for w in caught)
    assert "did not take the metrics of steps [1, 2, 3]" in text and "is still unreachable" in text
    rows = [json.loads(line) for line in logger.unsent_path.read_text().splitlines()]
    assert [(r["step"], r["metrics"]) for r in rows] == [(s, {"train/loss": float(s)}) for s in (1, 2, 3)]
    assert tracking.replay_unsent(logger.unsent_path, f"sqlite:///{tmp_path}/mlflow.db") == 3
    rows = history(logger, "train/loss")
    assert [s for s, _, _ in rows] == [0, 1, 2, 3]
    for step, _, stamp in rows[1:]:
        assert stamps[step] <= stamp < stamps[step] + 1000, "replayed with the time it was logged"


def test_flush_every_s_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="flush_every_s must be >= 0 seconds, got -1"):
        tracking.MLflowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", flush_every_s=-1)
