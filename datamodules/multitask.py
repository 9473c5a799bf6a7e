"""The multi-task data module: task specs in, multi-task training batches and evaluation batches out."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import ConcatDataset, DataLoader

from cgc_lightning.cache import build_once
from cgc_lightning.hf import ModelSpec, load_tokenizer
from datamodules.bigbench import task_file
from datamodules.collate import Collator, EvalCollator, PackingCollator, encode, eval_batches
from datamodules.errors import DataError
from datamodules.sampling import EvalShardSampler, MultiTaskSampler, PackedBatchSampler, task_probabilities
from datamodules.tasks import TaskSpec, check_file, is_local_file, load_task_rows

log = logging.getLogger(__name__)
MIN_LENGTH = 2
"""Shortest ``max_length``: one prompt token and one answer token."""
CACHE_VERSION = 2  # 2: rows carry example_id and choice texts
SPLITS = ("train", "val", "test")


def split_rows(rows: list, task: str, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list]:
    """Deterministic, seeded train/val/test split of one task (BIG-bench ships evaluation data only)."""
    n = len(rows)
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise DataError(
            f"task {task!r} has {n} examples: too few for a train/val/test split "
            f"({val_fraction:.0%} val, {test_fraction:.0%} test, at least one each)"
        )
    order = list(range(n))
    random.Random(f"{seed}:{task}").shuffle(order)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return {"train": [rows[i] for i in train], "val": [rows[i] for i in val], "test": [rows[i] for i in test]}


def loader_options(num_workers: int | str, device: str, cpus: int | None = None) -> dict:
    """DataLoader options for a loader feeding ``device`` (``cuda``, ``cpu``, ...).

    ``num_workers="auto"``: 2 workers for a GPU (fewer when the machine has fewer spare cores), 0 otherwise. Batches
    are pinned for a GPU, so that Lightning's non-blocking copy to the device is asynchronous.
    """
    cuda = device == "cuda"
    if num_workers == "auto":
        cpus = (os.cpu_count() or 1) if cpus is None else cpus
        num_workers = max(0, min(2, cpus - 1)) if cuda else 0
    if num_workers > 0:
        # workers are forked after the tokenizer has run: with the variable unset, the Rust tokenizer warns in
        # every worker that it turns its parallelism off. The workers only collate, so nothing else changes.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return {"num_workers": num_workers, "pin_memory": cuda, "persistent_workers": num_workers > 0}


class MultiTaskDataModule(L.LightningDataModule):
    """Builds loaders for many tasks grouped into clusters.

    Training batches mix tasks by the sampling rule and carry ``task_ids`` and ``cluster_ids``;
    validation and test have one loader per task, so every metric is per task. Tokenised data is
    cached under ``cache_dir``, keyed by everything that shapes it.

    Args:
        tasks: the task specs.
        clusters: cluster names in cluster-id order; defaults to the order they first appear in ``tasks``.
            A listed cluster with no task, or a task whose cluster is not listed, is an error.
        tokenizer: the model whose tokenizer to use (linked from ``model.model`` by the CLI).
        batch_size: training batch size: examples per step, or with ``packing`` rows per step.
        eval_batch_size: validation/test batch size (of rows scored by answer choice, and of generated ones
            unless ``generate_batch_size`` is set).
        generate_batch_size: validation/test/predict batch size of rows whose answer is generated; default:
            ``eval_batch_size``. Generation runs one forward per new token per batch, so fewer, larger batches of
            it are faster where a step is bound by the host (small models); the answers are the same in any batch.
        max_length: longest tokenised example (prompt + target).
        sampling: ``proportional``, ``temperature`` or ``uniform``.
        temperature: ``T`` of the temperature rule.
        val_fraction: share of each task held out for validation.
        test_fraction: share of each task held out for test.
        max_train_examples: cap per task on training examples (after the split).
        max_eval_examples: cap per task on validation and test examples.
        max_test_examples: cap per task on test examples; default: ``max_eval_examples``. A study can then
            validate often on a few examples and test once on many.
        samples_per_epoch: training examples drawn per epoch; default: all tasks' training examples.
        seed: seed of the splits and the sampler.
        target_prefix: text put before the target (a space, for ``"...Answer:" + " yes"``).
        bigbench_dir: a folder of ``<task>/task.json`` files; default: the installed package or a fetched copy.
        cache_dir: where tokenised data (and fetched BIG-bench files) are cached.
        num_workers: DataLoader worker processes that collate batches off the main thread, or ``auto``: 2 when
            the trainer runs on a GPU, where the main thread's time is what issues the GPU's work (collating a
            batch there took 1.6 ms of a 60 to 100 ms step at 1B, docs/benchmarks.md), and 0 on a CPU, where
            workers would take cores from the step itself. Workers are kept for the whole run
            (``persistent_workers``), and on a GPU every loader pins its batches so that their copy to the device
            does not hold up the host.
        packing: pack training examples of any tasks into ``batch_size`` rows of ``max_length`` tokens, as
            many as fit (:class:`~datamodules.collate.PackingCollator`): no padding between examples, each
            example attending only to itself and each token routed to its own task's experts. A step then
            trains on more examples at about the cost of a padded batch of the same rows. One process only.
        pad_to_multiple_of: pad each training batch's width (padded or packed rows) up to a multiple of this many
            tokens, but not past ``max_length``. A GPU builds attention kernel plans for every new sequence length
            (cuDNN's take 50 to 80 ms each way on an H200), so training batches, which come in hundreds of
            lengths, kept paying for them; 64 bounds a run to ``max_length / 64`` lengths. ``1``: pad to the
            longest example only. Evaluation batches keep their exact widths: they are grouped by length, so
            their widths repeat already, and the extra padding would only add work (docs/benchmarks.md).
        eval_mix_tasks: evaluate all tasks in one loader whose batches mix tasks (grouped by how they are
            scored, answer choices or generation, and by length, so little is padded); each row is scored
            and routed as its own task. ``false``: one loader per task, the tasks one after another.
    """

    def __init__(
        self,
        tasks: list[TaskSpec],
        clusters: list[str] | None = None,
        tokenizer: ModelSpec | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        generate_batch_size: int | None = None,
        max_length: int = 256,
        sampling: Literal["proportional", "temperature", "uniform"] = "proportional",
        temperature: float = 2.0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        max_test_examples: int | None = None,
        samples_per_epoch: int | None = None,
        seed: int = 42,
        target_prefix: str = " ",
        bigbench_dir: str | None = None,
        cache_dir: str = ".cache/data",
        num_workers: int | Literal["auto"] = "auto",
        packing: bool = False,
        pad_to_multiple_of: int = 64,
        eval_mix_tasks: bool = True,
    ):
        super().__init__()
        self.packing, self.eval_mix_tasks, self.pad_to_multiple_of = packing, eval_mix_tasks, pad_to_multiple_of
        self._packed_sampler = None
        if not tasks:
            raise DataError("data.tasks is empty: list at least one task")
        self.tasks = [t if isinstance(t, TaskSpec) else TaskSpec(**t) for t in tasks]
        names = [t.name for t in self.tasks]
        for name in names:
            if names.count(name) > 1:
                where = [t.cluster for t in self.tasks if t.name == name]
                raise DataError(
                    f"task {name!r} is listed {names.count(name)} times (clusters {where}); "
                    "a task belongs to exactly one cluster"
                )
        seen = list(dict.fromkeys(t.cluster for t in self.tasks))
        self.clusters = list(clusters) if clusters else seen
        unknown = [t.name for t in self.tasks if t.cluster not in self.clusters]
        if unknown:
            raise DataError(f"task(s) {unknown} are in no declared cluster; data.clusters is {self.clusters}")
        empty = [c for c in self.clusters if c not in seen]
        if empty:
            raise DataError(f"cluster(s) {empty} have no tasks; remove them from data.clusters or assign tasks")
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise DataError(
                f"val_fraction and test_fraction must be in (0, 1) and sum below 1, got "
                f"{val_fraction} and {test_fraction}"
            )
        task_probabilities([1] * len(self.tasks), sampling, temperature)  # checks the rule early
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size}
        sizes["generate_batch_size"] = generate_batch_size  # None: eval_batch_size
        sizes["pad_to_multiple_of"] = pad_to_multiple_of
        for name, value in sizes.items():
            if value is not None and value < 1:
                raise DataError(f"data.{name} must be >= 1, got {value}")
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise DataError(f"data.num_workers must be 'auto' or a number >= 0, got {num_workers!r}")
        if max_length < MIN_LENGTH:
            raise DataError(
                f"data.max_length must be >= {MIN_LENGTH} (a prompt and its answer both need tokens), got {max_length}"
            )
        for t in self.tasks:  # here, before the CLI loads the model (the data module is instantiated first)
            if is_local_file(t.source):
                check_file(t.source)
            elif not t.source.startswith(("bigbench:", "hf:")):
                raise DataError(
                    f"task {t.name!r}: unknown source {t.source!r}; use bigbench:<task>, hf:<dataset>, "
                    "or a path to a .json/.jsonl/.csv/.parquet file"
                )
            elif t.source.startswith("bigbench:") and bigbench_dir:
                task_file(t.source.split(":", 1)[1], bigbench_dir)  # names a task that is not there
        self.tokenizer_spec = tokenizer
        self.batch_size, self.eval_batch_size, self.max_length = batch_size, eval_batch_size, max_length
        self.generate_batch_size = generate_batch_size
        self.sampling, self.temperature = sampling, temperature
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.max_test_examples = max_test_examples if max_test_examples is not None else max_eval_examples
        self.samples_per_epoch, self.seed, self.target_prefix = samples_per_epoch, seed, target_prefix
        self.bigbench_dir, self.cache_dir, self.num_workers = bigbench_dir, cache_dir, num_workers
        self.splits: dict[str, list] | None = None
        self.cache_hits = 0  # tasks read back from the tokenised cache (rather than tokenised again)
        self._tokenizer = None
        self._resume_samples = 0  # training samples of the current epoch all ranks saw before a resume

    # ------------------------------------------------------------------ what the model needs to know

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def task_clusters(self) -> list[str]:
        """Cluster name of each task, in task-id order."""
        return [t.cluster for t in self.tasks]

    @property
    def task_metrics(self) -> list[str]:
        return [t.metric for t in self.tasks]

    @property
    def task_cluster_ids(self) -> list[int]:
        return [self.clusters.index(t.cluster) for t in self.tasks]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_spec is None:
                raise DataError("data.tokenizer is not set (the CLI links it from model.model)")
            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    # ----------------------------------------------------------------------------- building the data

    def _cache_key(self, spec: TaskSpec, origin: str) -> str:
        tok = self.tokenizer
        stat = Path(origin).stat() if Path(origin).is_file() else None
        parts = {
            "v": CACHE_VERSION,
            "spec": asdict(spec),
            "origin": origin,
            "file": [stat.st_size, stat.st_mtime_ns] if stat else None,
            "tokenizer": [tok.name_or_path, len(tok), tok.eos_token_id],
            "max_length": self.max_length,
            "target_prefix": self.target_prefix,
            "seed": self.seed,
            "fractions": [self.val_fraction, self.test_fraction],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _build_task(self, task_id: int, spec: TaskSpec) -> dict[str, list]:
        import datasets

        rows, origin = load_task_rows(spec, self.bigbench_dir, str(Path(self.cache_dir).parent / "bigbench"))
        rows = [r | {"example_id": i} for i, r in enumerate(rows)]  # the row's place in its source: a stable id
        if spec.metric == "accuracy":
            for i, r in enumerate(rows):
                if r["choices"] and r["target"] not in r["choices"]:
                    raise DataError(
                        f"task {spec.name!r}: {origin}, row {i}: target {r['target']!r} is not one of "
                        f"its choices {r['choices']}"
                    )
        datasets.disable_progress_bars()
        cache = Path(self.cache_dir) / f"{spec.name}-{self._cache_key(spec, origin)}"
        out: dict[str, list] = {}

        def tokenise(tmp: Path) -> None:
            truncated = 0
            for split, rows_ in split_rows(rows, spec.name, self.seed, self.val_fraction, self.test_fraction).items():
                out[split], n_trunc = encode(self.tokenizer, rows_, task_id, self.max_length, self.target_prefix)
                truncated += n_trunc
            if truncated == len(rows):
                raise DataError(
                    f"task {spec.name!r}: data.max_length={self.max_length} truncates every target; raise max_length"
                )
            if truncated:
                log.warning(
                    "task %r: %d of %d targets are longer than max_length=%d and were truncated",
                    spec.name,
                    truncated,
                    len(rows),
                    self.max_length,
                )
            datasets.DatasetDict({s: datasets.Dataset.from_list(out[s]) for s in SPLITS}).save_to_disk(str(tmp))

        # one process tokenises and writes; any other (now or later) reads back what it wrote
        if not build_once(cache, tokenise, marker="dataset_dict.json"):
            self.cache_hits += 1
            dd = datasets.load_from_disk(str(cache))
            # the cache is the task's, wherever it stands in this config's list: its rows take this task id
            return {s: [r | {"task_id": task_id} for r in dd[s].to_list()] for s in SPLITS}
        log.info(
            "task %r: %s, tokenised and cached in %s", spec.name, ", ".join(f"{len(out[s])} {s}" for s in SPLITS), cache
        )
        return out

    def _build(self) -> dict[str, list]:
        if self.splits is None:
            per_task = [self._build_task(i, spec) for i, spec in enumerate(self.tasks)]
            self.splits = {}
            for s in SPLITS:
                cap = {"train": self.max_train_examples, "val": self.max_eval_examples}.get(s, self.max_test_examples)
                self.splits[s] = [rows[s][:cap] if cap else rows[s] for rows in per_task]
        return self.splits

    def prepare_data(self) -> None:
        self._build()  # downloads, reads, tokenises and caches; setup() then reuses the result

    def setup(self, stage: str | None = None) -> None:
        self._build()

    def example_counts(self) -> dict[str, dict[str, int]]:
        """``{task: {split: examples}}``, for logging."""
        splits = self._build()
        return {name: {s: len(splits[s][i]) for s in SPLITS} for i, name in enumerate(self.task_names)}

    # -------------------------------------------------------------------------------------- loaders

    def train_dataloader(self) -> DataLoader:
        train = self._build()["train"]
        sizes = [len(rows) for rows in train]
        probs = task_probabilities(sizes, self.sampling, self.temperature, [t.weight for t in self.tasks])
        trainer = getattr(self, "trainer", None)
        ranks, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = MultiTaskSampler(
            sizes, probs, self.samples_per_epoch or sum(sizes), seed=self.seed, num_replicas=ranks, rank=rank
        )
        if 0 < self._resume_samples < sampler.total:  # a checkpoint at the end of an epoch resumes at the next one
            sampler.skip_next(self._resume_samples)
            self._resume_samples = 0
        if self.packing:
            if ranks > 1:
                raise DataError(
                    "data.packing runs in one process for now; train with trainer.devices: 1, or without packing"
                )
            data = ConcatDataset(train)
            lengths = [len(r["input_ids"]) for rows in train for r in rows]
            self._packed_sampler = PackedBatchSampler(sampler, lengths, self.batch_size, self.max_length)
            collate = PackingCollator(
                self.tokenizer.pad_token_id,
                self.task_cluster_ids,
                self.max_length,
                self.batch_size,
                self.pad_to_multiple_of,
            )
            return DataLoader(data, batch_sampler=self._packed_sampler, collate_fn=collate, **self._loader_options())
        return DataLoader(
            ConcatDataset(train),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=Collator(
                self.tokenizer.pad_token_id,
                self.task_cluster_ids,
                pad_to_multiple_of=self.pad_to_multiple_of,
                max_length=self.max_length,
            ),
            **self._loader_options(),
        )

    def _loader_options(self) -> dict:
        """``num_workers``, ``pin_memory`` and ``persistent_workers`` of every loader, for the trainer's device."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device.type if trainer is not None else "cpu"
        return loader_options(self.num_workers, device)

    # ------------------------------------------------------------------------------ exact resume

    def state_dict(self) -> dict:
        """Where the training sampler is, saved in every checkpoint: the epoch and the batches each rank did in it."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        state = {
            "epoch": trainer.current_epoch,
            "batches_done": done,
            "batch_size": self.batch_size,
            "world_size": trainer.world_size,
        }
        if self.packing:  # batches hold as many examples as fit: count the examples, not the batches
            packed = self._packed_sampler.examples_done if self._packed_sampler is not None else []
            state["examples_done"] = packed[done - 1] if 0 < done <= len(packed) else 0
        return state

    def load_state_dict(self, state: dict) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn != "fit":
            return  # validate/test/predict of a checkpoint: the training order does not matter
        if state.get("batches_done"):
            if state.get("batch_size") != self.batch_size:
                raise DataError(
                    f"the checkpoint was written with data.batch_size={state.get('batch_size')}; resuming "
                    f"with {self.batch_size} would not continue the same sample order"
                )
            ranks = state.get("world_size", 1)
            now = trainer.world_size if trainer is not None else 1
            if ranks != now:
                raise DataError(
                    f"the checkpoint was written by {ranks} process(es) and this run has {now}: the sample order "
                    f"and the epoch's length per process would not continue; resume with {ranks} device(s) "
                    "(trainer.devices x trainer.num_nodes), or start a new run from the adapter "
                    "(model.adapter.init_adapter)"
                )
            if bool(state.get("examples_done") is not None) != self.packing:
                raise DataError(
                    f"the checkpoint was written with data.packing={not self.packing}; resuming with "
                    f"packing={self.packing} would not continue the same sample order"
                )
            # each of the ranks consumed batches_done batches of the one global order, interleaved
            self._resume_samples = state.get("examples_done") or state["batches_done"] * self.batch_size * ranks

    def _eval_loaders(self, split: str, mix: bool | None = None, generate_all: bool = False) -> list[DataLoader]:
        """Evaluation loaders of ``split``: one over all tasks (``mix``, default ``eval_mix_tasks``), else one per task.

        Each loader's items are whole batches (:func:`eval_batches`), so under DDP a rank takes whole batches,
        each batch on one rank only, and every example is scored exactly once. Choice-scored batches hold
        ``eval_batch_size`` rows, generated ones ``generate_batch_size``; with ``generate_all`` (predict, which
        generates every row's answer) every batch is of the generation size.
        """
        mix = self.eval_mix_tasks if mix is None else mix
        generate = self.eval_batch_size if self.generate_batch_size is None else self.generate_batch_size
        choice = generate if generate_all else self.eval_batch_size
        collate = EvalCollator(self.tokenizer.pad_token_id, self.task_cluster_ids)
        trainer = getattr(self, "trainer", None)
        ranks, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        per_task = self._build()[split]
        groups = [[r for rows in per_task for r in rows]] if mix else per_task
        options = self._loader_options()
        # one loader per task: workers only while each is read, not two per task kept for the whole run
        options["persistent_workers"] &= len(groups) == 1
        loaders = []
        for rows in groups:
            batches = eval_batches(rows, self.task_metrics, choice, by_length=mix, generate_batch_size=generate)
            loaders.append(
                DataLoader(
                    batches,
                    batch_size=None,  # the items are batches already
                    # several processes: each batch on one rank only (Lightning's sampler would repeat some)
                    sampler=EvalShardSampler(len(batches), ranks, rank) if ranks > 1 else None,
                    shuffle=False,
                    collate_fn=collate,
                    **options,
                )
            )
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        # predictions come back one list per task; predict_step generates every row's answer, choice tasks' too
        return self._eval_loaders("test", mix=False, generate_all=True)
