"""MLflow: where runs go, and what each run records.

Unless ``MLFLOW_TRACKING_URI`` or the config says otherwise, runs go to ``sqlite:///mlruns/mlflow.db``
(MLflow 3 refuses a plain file store) with artifacts under ``mlruns/artifacts``. Each run records:

* params under stable names: ``method``, ``adapter.*``, ``model.*``, ``data.*``, ``optim.*``, ``trainer.*``, ``seed``;
* tags ``method``, ``clusters``, ``tasks``, ``seed``, ``git_commit``;
* the full resolved config as ``config.yaml``;
* a name that says what it is, ``<method> seed=<seed> <suffix>`` unless one is given (:func:`unique_run_name`);
* the best adapter (by the checkpoint monitor) as ``best_adapter/``, reloadable with
  :func:`cgc_lightning.export.load_adapter`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow import MlflowClient

from cgc_lightning.config import COMMON_FIELDS
from cgc_lightning.mlflow_env import DEFAULT_STORE, DEFAULT_URI, default_tracking_uri, quiet_downloads  # noqa: F401

#: The seed of a config that names none (``seed_everything_default`` of ``cli.main``).
DEFAULT_SEED = 42


def unique_run_name(*parts: object) -> str:
    """``parts`` joined by spaces, then 6 hex characters that tell apart runs of one config and seed.

    The suffix comes from ``os.urandom`` (``secrets``), never from ``random``, numpy or torch: naming a run neither
    draws from the training's seeded generators nor depends on them. MLflow's own generator draws its names from
    ``random``, which ``seed_everything`` has seeded, so every run of one seed got the same name; this project's
    runs are therefore always created with a name.
    """
    return " ".join([*(str(p) for p in parts if p not in (None, "")), secrets.token_hex(3)])


def seed_text(seed: object) -> str:
    """``seed=<seed>`` for a run name; ``seed_everything: true`` draws the seed when ``fit`` starts."""
    return "seed=random" if seed is True else "seed=none" if seed is False else f"seed={seed}"


LOCKED_RETRIES = 8
#: Seconds between attempts to reach a tracking store that stopped answering mid-run.
UNSENT_RETRY_S = 30.0


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the URI in the message, when an MLflow tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(
            f"MLflow tracking server {uri} does not answer ({getattr(e, 'reason', e)}). Start it, or point "
            f"MLFLOW_TRACKING_URI / trainer.logger.init_args.tracking_uri elsewhere (unset, runs go to {DEFAULT_URI})"
        ) from None


#: MLflow's limit on the metrics of one ``log_batch`` request.
MAX_METRICS_PER_WRITE = 1000


class Logged(NamedTuple):
    """One ``log_metrics`` call: its metrics, step, and when it was made (ms since the epoch, as MLflow keeps it)."""

    metrics: dict
    step: int | None
    timestamp: int


class WriteError(RuntimeError):
    """A store write failed; ``left`` holds the entries not written (the failed request's and those after it)."""

    def __init__(self, message: str, left: list[Logged]):
        super().__init__(message)
        self.left = left


def _batches(entries: list[Logged], limit: int):
    """Consecutive groups of entries of at most ``limit`` metrics each (an entry is never split)."""
    group, size = [], 0
    for e in entries:
        if group and size + len(e.metrics) > limit:
            yield group
            group, size = [], 0
        group.append(e)
        size += len(e.metrics)
    if group:
        yield group


def _metric_key(key: str) -> str:
    """``key`` with the characters MLflow refuses dropped, as Lightning's own logger does."""
    clean = re.sub("[^a-zA-Z0-9_/. -]+", "", key)
    if clean != key:
        warnings.warn(
            f"MLflow only allows '_', '/', '.' and ' ' in metric names: {key!r} is logged as {clean!r}", stacklevel=3
        )
    return clean


def write_logged(client: MlflowClient, run_id: str, entries: list[Logged]) -> None:
    """``log_batch`` the entries to run ``run_id``, each metric with its own step and time, in requests of at most
    1,000 metrics; a failed request raises :class:`WriteError` naming the entries it and those after it held."""
    from mlflow.entities import Metric

    done = 0
    for group in _batches(entries, MAX_METRICS_PER_WRITE):
        metrics = [
            Metric(key=_metric_key(k), value=v, timestamp=e.timestamp, step=e.step or 0)
            for e in group
            for k, v in e.metrics.items()
            if not isinstance(v, str)
        ]
        try:
            client.log_batch(run_id=run_id, metrics=metrics)
        except Exception as err:
            raise WriteError(str(err), entries[done:]) from err
        done += len(group)


def replay_unsent(path: str | Path, tracking_uri: str | None = None) -> int:
    """Send the metrics a run kept during a tracking outage (``unsent_metrics.jsonl``) to its run; return the count.

    The file sits at ``<checkpoint_dir>/<experiment id>/<run id>/unsent_metrics.jsonl``.
    """
    path = Path(path)
    now = int(time.time() * 1000)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # each with the time the run logged it (files written before 2026-12-02 have none)
    entries = [Logged(row["metrics"], row["step"], row.get("timestamp", now)) for row in rows]
    write_logged(LockRetryingClient(tracking_uri or default_tracking_uri()), path.parent.name, entries)
    path.unlink()
    return sum(len(e.metrics) for e in entries)


def retry_when_locked(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, tried again (with backoff) while a SQLite store says "database is locked".

    MLflow's SQLite store already waits up to 20 s for the lock (``PRAGMA busy_timeout``); this covers
    the rarer case of a writer starved for longer, e.g. many grid points logging to one file at once.
    A failed write was rolled back as a whole, so trying it again cannot log anything twice.
    """
    for attempt in range(LOCKED_RETRIES):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == LOCKED_RETRIES - 1 or "database is locked" not in str(e):
                raise
            time.sleep(min(0.1 * 2**attempt, 5.0) * (1 + random.random()))


class LockRetryingClient(MlflowClient):
    """An ``MlflowClient`` whose run writes go through :func:`retry_when_locked`."""

    def create_run(self, *args, **kwargs):
        return retry_when_locked(super().create_run, *args, **kwargs)

    def update_run(self, *args, **kwargs):
        return retry_when_locked(super().update_run, *args, **kwargs)

    def set_terminated(self, *args, **kwargs):
        return retry_when_locked(super().set_terminated, *args, **kwargs)

    def log_batch(self, *args, **kwargs):
        return retry_when_locked(super().log_batch, *args, **kwargs)

    def log_metric(self, *args, **kwargs):
        return retry_when_locked(super().log_metric, *args, **kwargs)

    def log_param(self, *args, **kwargs):
        return retry_when_locked(super().log_param, *args, **kwargs)

    def set_tag(self, *args, **kwargs):
        return retry_when_locked(super().set_tag, *args, **kwargs)


class MLflowLogger(MLFlowLogger):
    """Lightning's MLflow logger with this project's defaults.

    Args:
        experiment_name: MLflow experiment.
        run_name: MLflow run name; default ``<method> seed=<seed> <suffix>``, set by :class:`MLflowConfigCallback`
            from the config (``run <suffix>`` where no config callback runs, e.g. ``fast_dev_run``).
        tracking_uri: default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns/mlflow.db``.
        tags: extra run tags.
        artifact_location: for a new experiment; default ``mlruns/artifacts`` with the default store.
        run_id: continue this run instead of starting one (``test``/``validate`` of a trained run).
        checkpoint_dir: checkpoints go to ``<checkpoint_dir>/<experiment id>/<run id>/checkpoints``.
        resume: ``fit`` resumed into ``run_id`` (set by the CLI): steps the run logged before its crash are not
            logged again.
        flush_every_s: metrics are kept in memory and written to the store in one request at most this often
            (``0``: one request per call, as Lightning's own logger). A store write costs milliseconds (a SQLite
            commit, or a round trip to a server), so writing every logging step, plus the learning-rate monitor's
            separate call, slows a fast training loop. What is kept is written at every checkpoint (so a resume
            from it finds every earlier step in the store), at the end of the run, and when the run fails; a process
            killed with SIGKILL loses at most this many seconds of metrics, which a resume from its last checkpoint
            logs again.
    """

    def __init__(
        self,
        experiment_name: str = "cgc-lightning",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
        artifact_location: str | None = None,
        run_id: str | None = None,
        checkpoint_dir: str = "outputs",
        resume: bool = False,
        flush_every_s: float = 2.0,
    ):
        if not flush_every_s >= 0:
            raise ValueError(f"trainer.logger.init_args.flush_every_s must be >= 0 seconds, got {flush_every_s!r}")
        tracking_uri = tracking_uri or default_tracking_uri()
        if tracking_uri.startswith(("http://", "https://")):
            # MLflow's own retries would hold the training loop for minutes per log call during an outage;
            # with these few, a call gives up in seconds and its metrics are kept for later (see `_send`)
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        if tracking_uri == DEFAULT_URI:
            Path(DEFAULT_STORE).mkdir(exist_ok=True)
            artifact_location = artifact_location or (Path(DEFAULT_STORE) / "artifacts").resolve().as_uri()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=tags,
            artifact_location=artifact_location,
            run_id=run_id,
            log_model=False,
        )
        self.checkpoint_dir = checkpoint_dir
        # named by `describe` (or, failing that, `experiment`) unless the name was given or the run exists already
        self._default_name = run_name is None and run_id is None
        self._mlflow_client = LockRetryingClient(tracking_uri)  # many processes may share one SQLite store
        self.resume = resume
        self._logged_until: dict[str, int] = {}  # resumed run: last step already in the store, per metric
        self.final_status: str | None = None  # set by RunGuard: KILLED after Ctrl-C, rather than FAILED
        self.unsent: list[Logged] = []  # metrics the store did not take (an outage), in order
        self._next_retry = 0.0
        self.flush_every_s = float(flush_every_s)
        self.pending: list[Logged] = []  # logged, not yet written (see flush_every_s)
        self._last_write = -math.inf
        self._write_at_save = False  # a checkpoint was saved: write at the logger connector's next save()

    @property
    def save_dir(self) -> str:
        return self.checkpoint_dir

    def describe(self, description: str) -> None:
        """Name the run ``<description> <suffix>``, unless its name was given or it continues an existing run."""
        if not self._default_name or rank_zero_only.rank != 0:
            return
        self._default_name = False
        self._run_name = unique_run_name(description)
        if self._initialized:  # created already (under the placeholder name): rename it
            self._mlflow_client.set_tag(self._run_id, "mlflow.runName", self._run_name)

    @property
    def experiment(self):
        if self._default_name and self._run_name is None and not self._initialized:
            # the config callback names the run before it is created; whatever creates it earlier must not leave the
            # name to MLflow's generator (seeded by `seed_everything`: one name for every run of a seed)
            self._run_name = unique_run_name("run")
        client = MLFlowLogger.experiment.fget(self)
        if not getattr(self, "_kind_marked", False) and self._experiment_id is not None:
            self._kind_marked = True
            mark_experiment_kind(client, self._experiment_id)
        return client

    @rank_zero_only  # as MLFlowLogger's own: other ranks have no run (callbacks call this on every rank)
    def log_metrics(self, metrics, step=None) -> None:
        if self.resume and step is not None:
            # steps between the checkpoint and the crash were logged already, with the same values (the
            # resume is exact): keep the history free of repeats by not logging them again
            metrics = {k: v for k, v in metrics.items() if step > self._last_logged_step(k)}
        if not metrics:
            return
        self.pending.append(Logged(dict(metrics), step, int(time.time() * 1000)))
        if time.monotonic() - self._last_write >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Write the metrics kept in memory to the store, in as few requests as it takes (1,000 metrics each)."""
        entries, self.pending = self.pending, []
        if entries:
            self._last_write = time.monotonic()
            self._send(entries)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        # every step up to the checkpoint is in the store before a crash can lose it: what was logged so far now,
        # and the checkpointed step's own metrics, which Lightning logs after saving, at its next `save()`
        self.flush()
        self._write_at_save = True
        super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def save(self) -> None:
        # Lightning's logger connector calls this right after each of its own `log_metrics` calls
        super().save()
        if self._write_at_save:
            self._write_at_save = False
            self.flush()

    def _send(self, entries: list[Logged]) -> None:
        """Write, or keep for later while the store is unreachable: an outage must not end the training."""
        if self.unsent and (time.monotonic() < self._next_retry or not self.flush_unsent()):
            self._keep(entries)
            return
        try:
            self._write(entries)
        except WriteError as e:
            if not self.unsent:
                steps = sorted({entry.step for entry in e.left if entry.step is not None})
                warnings.warn(
                    f"MLflow tracking store {self._tracking_uri} did not take the metrics of steps {steps} ({e}). "
                    f"Training goes on; metrics are kept and sent when the store is back, and written to "
                    f"{self.unsent_path} until then",
                    stacklevel=2,
                )
            self._keep(e.left)

    def _write(self, entries: list[Logged]) -> None:
        write_logged(self.experiment, self.run_id, entries)

    @property
    def unsent_path(self) -> Path:
        """Where metrics the store did not take are written (JSON lines), beside the run's checkpoints."""
        return Path(self.checkpoint_dir) / str(self._experiment_id) / str(self._run_id) / "unsent_metrics.jsonl"

    def _keep(self, entries: list[Logged]) -> None:
        entries = [Logged({k: float(v) for k, v in e.metrics.items()}, e.step, e.timestamp) for e in entries]
        self.unsent += entries
        self._next_retry = time.monotonic() + UNSENT_RETRY_S
        self.unsent_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.unsent_path, "a") as fh:
            for e in entries:
                fh.write(json.dumps({"step": e.step, "metrics": e.metrics, "timestamp": e.timestamp}) + "\n")

    def flush_unsent(self) -> bool:
        """Send the kept metrics; ``True`` when none are left."""
        try:
            self._write(self.unsent)
        except WriteError as e:
            self.unsent = list(e.left)
            self._next_retry = time.monotonic() + UNSENT_RETRY_S
            return False
        self.unsent = []
        self.unsent_path.unlink(missing_ok=True)
        return True

    def finalize(self, status: str = "success") -> None:
        if status == "failed" and self.final_status:
            status = self.final_status
        self.flush()
        if self.unsent and not self.flush_unsent():
            warnings.warn(
                f"MLflow tracking store {self._tracking_uri} is still unreachable: {len(self.unsent)} metric logs of "
                f"run {self._run_id} were not sent. They are in {self.unsent_path}; send them with "
                f"`python -m cgc_lightning.tracking {self.unsent_path}` once the store is back",
                stacklevel=2,
            )
        try:
            super().finalize(status)
        except Exception as e:
            warnings.warn(f"could not mark MLflow run {self._run_id} {status}: {e}", stacklevel=2)

    def _last_logged_step(self, key: str) -> int:
        if key not in self._logged_until:
            history = self.experiment.get_metric_history(self.run_id, key.replace("@", "/"))
            self._logged_until[key] = max((m.step for m in history), default=-1)
        return self._logged_until[key]


#: MLflow 3's UI opens an experiment on the page its kind names; without the tag it guesses, and opens the
#: GenAI overview, which is empty for training runs. This kind opens the runs table.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def mark_experiment_kind(client, experiment_id: str) -> None:
    """Tag the experiment as model training (unless it has a kind), so the MLflow UI opens on its runs."""
    try:
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except Exception as e:  # a read-only or older store: the UI only opens on another page
        warnings.warn(f"could not tag experiment {experiment_id} with its kind: {e}", stacklevel=2)


def mlflow_logger(trainer: Trainer) -> MLFlowLogger | None:
    for lg in trainer.loggers:
        if isinstance(lg, MLFlowLogger):
            return lg
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value, default=str)[:500]
    elif value is not None:
        out[prefix] = value


def run_params(config: dict) -> dict:
    """Stable param names from the resolved config (the method's hyperparameters under ``adapter.*``)."""
    model = config.get("model", {}) or {}
    model = model.get("init_args", model)
    params: dict = {}
    adapter = dict(model.get("adapter") or {})
    from cgc_lightning.methods import method_names, method_spec

    name = adapter.get("method", "cgc_lora")
    used = set(COMMON_FIELDS).union(method_spec(name).fields if name in method_names() else ())
    _flatten("adapter", {k: v for k, v in adapter.items() if k in used}, params)  # only what the method reads
    _flatten("model", model.get("model") or {}, params)
    for k in ("lr", "weight_decay", "warmup_ratio", "schedule", "gradient_checkpointing"):
        if k in model:
            params[f"optim.{k}" if k != "gradient_checkpointing" else "model.gradient_checkpointing"] = model[k]
    if "compile" in model:  # one column whatever its form: false, true, or "mode=reduce-overhead"
        value = model["compile"]
        params["model.compile"] = (
            ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or True if isinstance(value, dict) else value
        )
    data = config.get("data", {}) or {}
    data = data.get("init_args", data)
    _flatten("data", {k: v for k, v in data.items() if k not in ("tasks", "tokenizer")}, params)
    trainer = config.get("trainer", {}) or {}
    for k in (
        "max_epochs",
        "max_steps",
        "precision",
        "accumulate_grad_batches",
        "val_check_interval",
        "gradient_clip_val",
        "devices",
        "strategy",
    ):
        if trainer.get(k) is not None:
            params[f"trainer.{k}"] = trainer[k]
    params["method"] = params.pop("adapter.method", "cgc_lora")  # one column for the method, not two
    params["seed"] = config.get("seed_everything")
    return {k: str(v) for k, v in params.items() if v is not None}


class MLflowConfigCallback(SaveConfigCallback):
    """Record the resolved config, params and tags on the MLflow run (replaces writing config.yaml to disk)."""

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if isinstance(logger, MLflowLogger) and not self.already_saved:
            # the config is known here, before anything logs: the run is named after what it trains
            # (seed_everything: true is the seed LightningCLI drew by now)
            method = run_params(self.config.as_dict())["method"]
            fn = getattr(stage, "value", stage)  # a TrainerFn enum or its string
            seed = seed_text(self.config.get("seed_everything"))
            logger.describe(f"{method} {seed}" if fn == "fit" else f"{method} {seed} {fn}")
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None or trainer.global_rank != 0:
            return
        text = self.parser.dump(self.config, skip_none=False)
        client, run_id = logger.experiment, logger.run_id
        stage = getattr(stage, "value", stage)  # a TrainerFn enum or its string
        client.log_text(run_id, text, "config.yaml" if stage == "fit" else f"config_{stage}.yaml")
        import yaml

        config = yaml.safe_load(text)
        existing = client.get_run(run_id).data.params
        params = {k: v for k, v in run_params(config).items() if k not in existing}
        if params:
            logger.log_hyperparams(params)
        layout = getattr(pl_module, "layout", None)
        tags = {
            "method": params.get("method", existing.get("method", "")),
            "seed": str(config.get("seed_everything")),
            "git_commit": git_commit(),
        }
        if layout is not None:
            clusters = {
                c: [t for t, tc in zip(layout.tasks, layout.task_cluster, strict=True) if tc == i]
                for i, c in enumerate(layout.clusters)
            }
            tags["clusters"] = json.dumps(clusters)[:5000]
            tags["tasks"] = ",".join(layout.tasks)[:5000]
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        report = getattr(pl_module, "param_report", None)
        if report is not None and "params.trainable" not in existing:
            logger.log_hyperparams({"params.trainable": report.trainable, "params.total": report.total})


class BestAdapterArtifact(Callback):
    """At the end of ``fit``, log the best checkpoint's adapter as the run artifact ``best_adapter/``."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = mlflow_logger(trainer)
        ckpt = trainer.checkpoint_callback
        if logger is None or trainer.global_rank != 0:
            return
        from cgc_lightning.export import save_adapter

        best, last = getattr(ckpt, "best_model_path", ""), getattr(ckpt, "last_model_path", "")
        path = best or last
        state = None
        # which weights best_adapter/ holds, as a tag: a run that never validated has no best checkpoint
        source = "best checkpoint" if best else "last checkpoint" if last else "final weights (no checkpoint)"
        if path and not Path(path).is_file():
            source = f"final weights ({path} is gone)"
        if source != "best checkpoint":
            monitor = getattr(ckpt, "monitor", None)
            warnings.warn(f"best_adapter/ holds the {source}: there is no best checkpoint by {monitor}", stacklevel=2)
        if path and Path(path).is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            state = {k.removeprefix("model."): v for k, v in state.items()}
            score = getattr(ckpt, "best_model_score", None)
            if score is not None:
                logger.log_metrics({f"best/{ckpt.monitor}": float(score)})
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(
                pl_module.model,
                Path(tmp) / "best_adapter",
                base_model=pl_module.model_spec.name_or_path,
                state_dict=state,
            )
            try:
                logger.experiment.set_tag(logger.run_id, "best_adapter.source", source)
                logger.experiment.log_artifacts(logger.run_id, str(Path(tmp) / "best_adapter"), "best_adapter")
            except Exception as e:  # the store is unreachable: keep the adapter beside the checkpoints instead
                keep = logger.unsent_path.parent / "best_adapter" if isinstance(logger, MLflowLogger) else None
                if keep is None:
                    raise
                shutil.copytree(Path(tmp) / "best_adapter", keep, dirs_exist_ok=True)
                warnings.warn(f"could not log best_adapter/ to MLflow ({e}); it is in {keep}", stacklevel=2)


if __name__ == "__main__":  # python -m cgc_lightning.tracking <unsent_metrics.jsonl> [tracking uri]
    import sys

    print(f"sent {replay_unsent(*sys.argv[1:3])} metric values")
