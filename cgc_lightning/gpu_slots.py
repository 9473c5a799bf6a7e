r"""Where a grid's next point runs: GPUs shared by free memory, several points per GPU when they fit.

The rule (``GpuSlots.choose``), for the next point to start::

    a GPU with none of our points             takes it, whatever the estimate (one point per GPU at least)
    --jobs-per-gpu K                          a GPU with fewer than K of our points takes it; no memory gating
    otherwise, until one point's peak is known nothing joins a GPU that has a point (the first runs alone)
    then, with n of our points on the GPU     room = min(cap - n * est, free now);  it takes the point if room >= est
                                              est = max(peak reported) * 1.15 + 1.5 GiB   (context, fragmentation)

``cap`` is the GPU's free memory the last time none of our points ran on it, so points that have started but
not yet reached their peak are charged their whole estimate; ``free now`` (``nvidia-smi``) catches other
users of the GPU. Of the GPUs that take the point, the one with the most room wins (with ``--jobs-per-gpu``:
the fewest points, then the most free memory); when none does, the point waits for one to end.

The peak is measured in each point's own process: ``PeakMemoryReport`` (added to the point's ``fit`` and
``test`` when ``$CGC_GRID_MEMORY_FILE`` is set) writes ``torch.cuda.max_memory_reserved()`` there, and marks
it settled once the point has taken optimizer steps and run a validation loop (or ended fit), the moments
when activations, optimizer state and generation have all been allocated.

A point that dies of CUDA out-of-memory after sharing its GPU is retried once: with a larger estimate, or
(under ``--jobs-per-gpu``, which has none) alone on a GPU. ``oom_advice`` says what to change.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.callbacks import Callback

MEMORY_FILE_ENV = "CGC_GRID_MEMORY_FILE"
REPORT_CALLBACK = "cgc_lightning.gpu_slots.PeakMemoryReport"
GIB = 2**30
HEADROOM = 1.15
"""A point's estimate is the largest peak seen times this..."""
MARGIN = int(1.5 * GIB)
"""...plus this: the CUDA context and cuBLAS/NCCL buffers (outside PyTorch's allocator) and fragmentation."""
OOM_RAISE = 1.25
"""After an out-of-memory among points sharing a GPU, the estimate is at least this times what it was."""
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory as ``nvidia-smi`` reports it, in bytes."""

    free: int
    total: int


def query_gpus(ids: list[str]) -> dict[str, GpuMemory | None]:
    """``{id: memory}`` of each GPU id (an ``nvidia-smi`` index or UUID); ``None`` where it cannot be told (no
    ``nvidia-smi``, a MIG instance). The one place that asks the driver: tests replace it."""
    cmd = ["nvidia-smi", "--query-gpu=index,uuid,memory.free,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return dict.fromkeys(ids)
    found = {}
    for line in out.splitlines():
        parts = [s.strip() for s in line.split(",")]
        if len(parts) != 4 or not (parts[2].isdigit() and parts[3].isdigit()):
            continue  # "[N/A]" and the like
        mem = GpuMemory(free=int(parts[2]) * 2**20, total=int(parts[3]) * 2**20)  # MiB
        found[parts[0]] = found[parts[1]] = mem
    return {g: found.get(g) for g in ids}


@dataclass
class Placed:
    """One running point, as the placement sees it."""

    gpu: str
    alone: bool = False
    """It must have its GPU to itself (a retry after an out-of-memory under ``--jobs-per-gpu``)."""
    estimate: int | None = None
    """The estimate in force when it started."""
    others: int = 0
    """The most other points that shared its GPU while it ran."""
    peak: int = 0
    """The peak memory it reported (bytes), 0 until it reports."""


class GpuSlots:
    """Which GPU the next point goes to, from our points on each GPU, their memory estimate and the free memory.

    Args:
        gpus: GPU ids, in order of preference when all else is equal.
        jobs_per_gpu: at most this many points per GPU, in place of the memory estimate.
        headroom, margin: the estimate is ``max(peak) * headroom + margin``.
    """

    def __init__(
        self, gpus: list[str], *, jobs_per_gpu: int | None = None, headroom: float = HEADROOM, margin: int = MARGIN
    ):
        if not gpus:
            raise ValueError("GpuSlots needs at least one GPU id")
        if jobs_per_gpu is not None and jobs_per_gpu < 1:
            raise ValueError(f"--jobs-per-gpu must be at least 1, got {jobs_per_gpu}")
        self.gpus, self.jobs_per_gpu, self.headroom, self.margin = list(gpus), jobs_per_gpu, headroom, margin
        self.running: dict[str, Placed] = {}
        self.peak = 0
        """The largest peak memory any point reported (bytes)."""
        self.known = False
        """Some point's peak is settled: points may now share a GPU."""
        self.floor = 0
        """The estimate is at least this (raised by out-of-memory errors)."""
        self.cap: dict[str, int] = {}
        """``{gpu: free bytes}`` the last time none of our points ran on it."""

    @property
    def estimate(self) -> int | None:
        """Memory one point needs (bytes); None until a peak is known (and with ``jobs_per_gpu``)."""
        if self.jobs_per_gpu is not None or not (self.known or self.floor):
            return None
        return max(int(self.peak * self.headroom) + self.margin, self.floor)

    def on(self, gpu: str) -> list[Placed]:
        return [p for p in self.running.values() if p.gpu == gpu]

    def observe(self, memory: dict[str, GpuMemory | None]) -> None:
        """Note each GPU's free memory where none of our points runs: what our points may share out there."""
        for g, mem in memory.items():
            if mem is not None and g in self.gpus and not self.on(g):
                self.cap[g] = mem.free

    def room(self, gpu: str, memory: GpuMemory | None) -> int | None:
        """Bytes a new point could still claim on ``gpu``; None without memory figures or an estimate."""
        est = self.estimate
        if memory is None or est is None:
            return None
        return min(self.cap.get(gpu, memory.free) - len(self.on(gpu)) * est, memory.free)

    def choose(self, memory: dict[str, GpuMemory | None], *, alone: bool = False) -> str | None:
        """The GPU for the next point, or None when it has to wait for a running point to end."""
        self.observe(memory)
        options = []
        for order, g in enumerate(self.gpus):
            here, mem = self.on(g), memory.get(g)
            free = mem.free if mem is not None else 0
            if any(p.alone for p in here):
                continue
            if not here:
                options.append(((0, -free) if self.jobs_per_gpu is not None else (-free,), order, g))
            elif alone:
                continue
            elif self.jobs_per_gpu is not None:
                if len(here) < self.jobs_per_gpu:
                    options.append(((len(here), -free), order, g))
            else:
                room, est = self.room(g, mem), self.estimate
                if room is not None and est is not None and room >= est:
                    options.append(((-room,), order, g))
        return min(options)[2] if options else None

    def start(self, key: str, gpu: str, *, alone: bool = False) -> None:
        self.running[key] = Placed(gpu, alone=alone, estimate=self.estimate)
        here = self.on(gpu)
        for p in here:
            p.others = max(p.others, len(here) - 1)

    def report(self, key: str, peak: int, settled: bool) -> None:
        """A point's peak memory so far; ``settled`` once it has been through the steps that allocate most."""
        if key in self.running:
            self.running[key].peak = max(self.running[key].peak, peak)
        self.peak = max(self.peak, peak)
        self.known = self.known or (settled and peak > 0)

    def end(self, key: str, *, out_of_memory: bool = False) -> Placed:
        """The point's process ended; after an out-of-memory among several points, raise the estimate."""
        placed = self.running.pop(key)
        if out_of_memory and placed.others and self.jobs_per_gpu is None:
            used = placed.estimate or self.estimate or int(max(placed.peak, self.peak) * self.headroom) + self.margin
            self.floor = max(self.floor, int(used * OOM_RAISE))
        return placed

    def where(self, gpu: str, memory: GpuMemory | None) -> str:
        """How ``gpu`` stands, for the log: ``GPU 0 (3 points there, est 19.1 GiB each, 80.0 GiB free)``."""
        here = self.on(gpu)
        n = f"{len(here)} point{'s' if len(here) != 1 else ''} there"
        free = f"{gib(memory.free)} free" if memory is not None else "free memory unknown"
        if any(p.alone for p in here):
            how = "alone: retried after running out of memory"
        elif self.jobs_per_gpu is not None:
            how = f"at most {self.jobs_per_gpu} by --jobs-per-gpu"
        elif self.estimate is not None:
            how = f"est {gib(self.estimate)} each"
        else:
            how = "more join once a point's peak memory is known"
        return f"GPU {gpu} ({n}, {how}, {free})"

    def waiting(self, memory: dict[str, GpuMemory | None]) -> str:
        """Why no GPU takes the next point, for the log."""
        if self.jobs_per_gpu is None and self.estimate is None:
            return "waiting for a point's peak GPU memory before putting a second point on a GPU"
        if self.jobs_per_gpu is None and all(memory.get(g) is None for g in self.gpus):
            return "waiting: no GPU memory figures (nvidia-smi), so one point per GPU; --jobs-per-gpu K shares them"
        return "waiting for room: " + "; ".join(self.where(g, memory.get(g)) for g in self.gpus)


def is_out_of_memory(log_text: str) -> bool:
    return any(m in log_text for m in OOM_MARKERS)


def oom_advice(label: str, placed: Placed, *, jobs_per_gpu: int | None, retrying: str | None) -> str:
    """What to say when a point died of CUDA out-of-memory, naming the fix.

    Args:
        label: the point, as the log names it.
        placed: where it ran, with how many other points at most, and its reported peak.
        jobs_per_gpu: the ``--jobs-per-gpu`` in force, if any.
        retrying: how it is being retried (e.g. ``"alone on a GPU"``), or None when it is not.
    """
    peak = f", its peak {gib(placed.peak)} so far" if placed.peak else ""
    if not placed.others:
        return (
            f"point {label} ran out of GPU memory alone on GPU {placed.gpu}{peak}: one point does not fit one GPU; "
            "shrink data.batch_size (data.eval_batch_size or data.generate_batch_size if it died in validation or "
            "test), enable model.gradient_checkpointing, or lower data.max_length"
        )
    fewer = max(1, min(jobs_per_gpu or placed.others + 1, placed.others + 1) - 1)
    head = (
        f"point {label} ran out of GPU memory on GPU {placed.gpu} with {placed.others} other "
        f"point{'s' if placed.others != 1 else ''} there{peak}"
    )
    fix = (
        f"rerun with --jobs-per-gpu {fewer} (or lower --jobs), or shrink data.batch_size / enable "
        "model.gradient_checkpointing"
    )
    return f"{head}; retrying it once {retrying}; if it runs out again, {fix}" if retrying else f"{head}; {fix}"


def read_report(path: Path) -> tuple[int, bool] | None:
    """``(peak bytes, settled)`` from a point's memory file, or None before it wrote one."""
    try:
        data = json.loads(path.read_text())
        return int(data["peak"]), bool(data["settled"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _peak_reserved() -> int:
    import torch

    # a host-side read of the caching allocator's counters: safe from any moment of training
    return torch.cuda.max_memory_reserved() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0


class PeakMemoryReport(Callback):
    """Writes this process's peak reserved GPU memory to a file, for the grid scheduler to pack points by.

    The peak counts as settled once fit has taken ``settle_steps`` optimizer steps and run a validation loop
    (sanity check included), or ended: by then activations, optimizer state and generation are allocated.

    Args:
        path: the file; default ``$CGC_GRID_MEMORY_FILE`` (nothing is written without either).
        settle_steps: optimizer steps before the peak may settle.
        every_n_steps: after settling, write every this many training batches.
    """

    def __init__(self, path: str | None = None, settle_steps: int = 2, every_n_steps: int = 10):
        self.path = path or os.environ.get(MEMORY_FILE_ENV)
        self.settle_steps, self.every_n_steps = settle_steps, every_n_steps
        self.validated = self.settled = False

    def write(self, settled: bool = False) -> int:
        """Write the peak so far (bytes) and return it; 0 without CUDA."""
        peak = _peak_reserved()
        if not self.path or not peak:
            return peak
        self.settled = self.settled or settled
        tmp = Path(f"{self.path}.tmp")
        tmp.write_text(json.dumps({"peak": peak, "settled": self.settled}))
        tmp.replace(self.path)  # the scheduler never reads half a file
        return peak

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.settled or batch_idx % self.every_n_steps == 0:
            self.write(self.validated and trainer.global_step >= self.settle_steps)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validated = True
        self.write(trainer.global_step >= self.settle_steps)

    def on_fit_end(self, trainer, pl_module) -> None:
        peak = self.write(settled=True)
        if peak and trainer.logger is not None:  # beside the point's metrics: grids compare memory too
            trainer.logger.log_metrics({"system/gpu_peak_memory_gib": peak / GIB}, step=trainer.global_step)

    def on_test_end(self, trainer, pl_module) -> None:
        self.write(settled=True)
