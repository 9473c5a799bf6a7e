"""Which task each training example comes from: proportional, temperature-scaled or uniform.

    p_t  ∝  w_t * n_t              proportional
    p_t  ∝  w_t * n_t^(1/T)        temperature (T > 1 flattens towards uniform; T = 1 is proportional)
    p_t  ∝  w_t                    uniform

with n_t the task's training examples and w_t its optional weight (1 by default). Within a task,
examples come in a fresh random order each pass, so none repeats before all were seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

RULES = ("proportional", "temperature", "uniform")


def task_probabilities(
    sizes: Sequence[int],
    rule: str = "proportional",
    temperature: float = 2.0,
    weights: Sequence[float | None] | None = None,
) -> torch.Tensor:
    """Sampling probability of each task, ``(n_tasks,)``."""
    if rule not in RULES:
        raise ValueError(f"unknown sampling rule {rule!r}; choose one of {RULES}")
    n = torch.tensor(sizes, dtype=torch.float64)
    if rule == "proportional":
        p = n.clone()
    elif rule == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        p = n ** (1.0 / temperature)
    else:
        p = torch.ones_like(n)
    if weights is not None:
        p = p * torch.tensor([1.0 if w is None else float(w) for w in weights], dtype=torch.float64)
    return p / p.sum()


class MultiTaskSampler(DistributedSampler):
    """Yields indices into the concatenation of the tasks' training sets, this rank's share of them.

    One global order per epoch (the same on every rank); rank ``r`` of ``R`` takes its positions
    ``r, r + R, r + 2R, ...``, as ``DistributedSampler`` would. It shards itself (it is a
    ``DistributedSampler``, so Lightning does not wrap it) because resuming must skip the draws that all
    ranks together consumed, ``R`` times one rank's, which a wrapper around a single-rank sampler cannot do.

    Args:
        sizes: training examples per task, in concatenation order.
        probs: probability of each task.
        num_samples: indices per epoch, over all ranks.
        seed: base seed; epoch ``e`` uses ``seed + e``, so runs repeat exactly.
        num_replicas: ranks sharing the epoch.
        rank: this rank.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        probs: torch.Tensor,
        num_samples: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):  # no DistributedSampler.__init__: it wants a dataset and an initialised process group
        self.sizes, self.probs, self.total, self.seed = list(sizes), probs, num_samples, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = -(-num_samples // num_replicas)  # per rank; the last draws wrap around, as DDP pads
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, n: int) -> None:
        """Leave out the first ``n`` draws of the global order of the next pass only: resuming mid-epoch after
        ``n`` samples consumed by all ranks together."""
        self._skip = n

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        tasks = torch.multinomial(self.probs, self.total, replacement=True, generator=g).tolist()
        orders = [torch.randperm(n, generator=g).tolist() for n in self.sizes]
        cursor = [0] * len(self.sizes)
        drawn = []  # the global order: every rank draws it all (cheap), then keeps its share
        for t in tasks:
            if cursor[t] == self.sizes[t]:  # task exhausted: a new pass in a new order
                orders[t], cursor[t] = torch.randperm(self.sizes[t], generator=g).tolist(), 0
            drawn.append(self.offsets[t] + orders[t][cursor[t]])
            cursor[t] += 1
        drawn += drawn[: self.num_samples * self.num_replicas - len(drawn)]  # equal shares, as DDP pads
        skip, self._skip = self._skip, 0
        yield from drawn[skip + self.rank :: self.num_replicas]


class EvalShardSampler(DistributedSampler):
    """Rank ``r`` of ``R`` evaluates examples ``r, r + R, ...`` of one task, each example exactly once.

    ``DistributedSampler``, which Lightning would otherwise put on evaluation loaders under DDP, pads the
    ranks' shares to equal length by repeating examples, so a task's metric and loss would count some
    examples twice. Evaluation has no collective per batch (the metrics and losses are gathered once, at the
    end of the epoch), so ranks may run different numbers of batches, and a rank may have none of a task.
    """

    def __init__(self, size: int, num_replicas: int, rank: int):  # no DistributedSampler.__init__ (see above)
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.num_samples = len(range(rank, size, num_replicas))
        self.shuffle, self.epoch = False, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))


class PackedBatchSampler:
    """Batches of examples that fill ``rows`` rows of ``max_length`` tokens (``data.packing``).

    Examples come in ``sampler``'s order; each goes into the first row with room (first fit), and the batch is
    handed out when the next example fits in none of its rows, which then starts the next batch. A batch thus
    holds as many examples as fit, whatever their tasks, and the order of examples is the sampler's: a run
    resumed at a batch boundary (``examples_done``) packs the same batches as an uninterrupted one.

    Args:
        sampler: the example order (:class:`MultiTaskSampler`).
        lengths: tokens of each example, by dataset index.
        rows: rows per batch (``data.batch_size``).
        max_length: tokens per row.
    """

    def __init__(self, sampler, lengths: list[int], rows: int, max_length: int):
        self.sampler, self.lengths, self.rows, self.max_length = sampler, lengths, rows, max_length
        self.examples_done: list[int] = []  # examples handed out up to and including each batch of this epoch

    def __iter__(self):
        self.examples_done = []
        batch: list[int] = []
        free = [self.max_length] * self.rows
        total = 0
        for i in self.sampler:
            n = min(self.lengths[i], self.max_length)
            row = next((k for k, f in enumerate(free) if f >= n), None)
            if row is None:
                total += len(batch)
                self.examples_done.append(total)
                yield batch
                batch, free, row = [], [self.max_length] * self.rows, 0
            free[row] -= n
            batch.append(i)
        if batch:
            self.examples_done.append(total + len(batch))
            yield batch
