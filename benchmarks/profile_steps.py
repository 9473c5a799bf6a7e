r"""Where a training step's time goes, op by op: ``torch.profiler`` over N steps of a loop, for
:mod:`benchmarks.fit_loop`'s ``--profile N``.

A :class:`StepProfiler` runs one ``torch.profiler.profile`` (CPU, plus CUDA on a GPU; ``record_shapes``) over
N + 1 consecutive steps: :meth:`~StepProfiler.begin` before the first, :meth:`~StepProfiler.end_step` after
each (``prof.step()``, so each step is a ``ProfilerStep#k`` range in the trace). The first step is the
profiler's own warm-up (its schedule's ``warmup=1``: traced, then dropped, as its start-up costs would skew
it); the N after it are recorded. The window is continuous, so what runs between two steps (fetching the next
batch, Lightning's loop) is in it too, for both loops alike. The bare
loop calls the two itself; ``fit`` calls them from :class:`FitProfiler`, a callback placed after
``fit_loop.StepTimer`` so that each profiled step holds the same synchronisations as a timed one.

Per loop, :func:`summarise` reports per step: the wall time of the window, the device (kernel) time, the host
CPU time inside profiled ops, the count of ``aten::`` ops, of device kernels and of kernel launches, the
device -> host synchronisations (CUDA runtime sync calls and ``Memcpy DtoH`` copies; on any device the ops
that make the host wait for a value: ``aten::_local_scalar_dense`` is ``.item()``, ``aten::nonzero`` a boolean
index), what ``torch.compile`` ran (its regions, and CUDA graph launches on a GPU), the SDPA backend attention
went through, and the ops by self device time (self CPU time without a
GPU) with their input dtypes. On a GPU, the Python lines that made CUDA synchronise (``set_sync_debug_mode
("warn")`` over the recorded steps). :class:`DtypeProbe` records, on the warm-up step, the dtypes at the first
adapted layer: its base weight, its adapter weights, the hidden states entering it and what its adapter gets.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode

# CUDA runtime calls that block the host until the device catches up (cudaMemcpy without Async: a copy to
# pageable host memory)
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# ops that need a value on the host, so wait for the device on a GPU; they are recorded on a CPU too
HOST_VALUE_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::masked_select",
                  "aten::equal", "aten::is_nonzero")  # fmt: skip
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
ATTENTION_KERNELS = ("flash", "fmha", "attention", "sdpa")
# the profiler's range around each call of a torch.compile'd function ("Torch-Compiled Region: 0/0")
COMPILED_REGION = "Torch-Compiled Region"
TOP = 15
TORCH_DIR = str(Path(torch.__file__).parent)


class StepProfiler:
    """``torch.profiler`` over ``runs = steps + 1`` consecutive steps of one loop, the first the profiler's warm-up;
    :meth:`summarise` once they have run.

    Args:
        label: the loop's name (``fit``, ``bare``): the trace file's name.
        steps: the steps to record.
        cuda: profile CUDA kernels too.
        folder: where the Chrome trace goes (``<folder>/<label>.json``).
    """

    def __init__(self, label: str, steps: int, cuda: bool, folder: Path):
        self.label, self.steps, self.runs, self.cuda, self.folder = label, steps, steps + 1, cuda, folder
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
        self.prof = torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=True)
        self.done, self.active, self.wall_s = 0, False, 0.0
        self.sync_sites: Counter = Counter()
        self._warnings = None
        self.host_values: HostValueProbe | None = None

    def begin(self, compiled: bool = False) -> None:
        """Call before the first of the ``runs`` steps; ``compiled``: the loop runs ``torch.compile``'d code.

        A compiled loop gets no :class:`HostValueProbe`: once a function compiled by ``torch.compile`` has run
        under a ``TorchDispatchMode``, it runs eager for the rest of the process, so the recorded steps would
        profile the eager loop instead (seen on an H200: 18,600 eager ops a step, no compiled region)."""
        self.active = True
        self.host_values = None if compiled else HostValueProbe()
        if self.host_values is not None:
            self.host_values.__enter__()
        self.prof.start()

    def end_step(self) -> None:
        """Call after each of the ``runs`` steps."""
        self.done += 1
        if self.done == 1:  # the warm-up step: the recorded steps start here
            if self.host_values is not None:
                self.host_values.__exit__(None, None, None)
            if self.cuda:  # where the host waits: each synchronising CUDA call warns with the line that made it
                self._warnings = warnings.catch_warnings(record=True)
                self._caught = self._warnings.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            self.prof.step()
            self._t = time.perf_counter()
            return
        if self.done < self.runs:
            self.prof.step()
            return
        self.wall_s = time.perf_counter() - self._t
        self.prof.step()  # the last recorded step: the schedule's cycle ends, the trace is kept
        self.prof.stop()
        self.active = False
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)
            for w in self._caught:
                if "synchroniz" in str(w.message):
                    self.sync_sites[f"{'/'.join(Path(w.filename).parts[-2:])}:{w.lineno}"] += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.folder / f"{self.label}.json"))

    def summarise(self) -> dict:
        """Per-step figures of the profiled window (see the module docstring)."""
        return summarise(self.prof.events(), self.steps, self.wall_s, self.cuda) | {
            "steps": self.steps,
            "trace": str(self.folder / f"{self.label}.json"),
            "sync_sites": {site: n / self.steps for site, n in self.sync_sites.most_common(10)},
            # None: not probed (a compiled loop, see begin)
            "host_value_sites": None if self.host_values is None else dict(self.host_values.sites.most_common()),
        }


def summarise(events, steps: int, wall_s: float, cuda: bool) -> dict:
    """Per-step totals and the ops by self device time (self CPU time when not ``cuda``) of a profile's events."""
    host = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    # kernels, copies and sets only: the profiler also puts each user range (ProfilerStep#, Lightning's
    # "Optimizer.step", which holds the whole training step) on the device timeline, spanning the kernels in it
    device = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    names = Counter(e.name for e in host)
    ops = defaultdict(lambda: [0.0, 0, Counter()])  # name -> [self us, calls, input dtypes]
    host_us = Counter()  # name -> self host (CPU) us, which on a GPU is not what `ops` ranks by
    for e in host:
        if e.name.startswith("ProfilerStep"):  # the step's own range: its self time is time outside any op
            continue
        op = ops[e.name]
        op[0] += e.self_device_time_total if cuda else e.self_cpu_time_total
        op[1] += 1
        host_us[e.name] += e.self_cpu_time_total
        dtypes = ",".join(sorted({d for d in (getattr(e, "input_dtypes", None) or []) if d}))
        if dtypes:
            op[2][dtypes] += 1
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:TOP]
    kernels = Counter(e.name for e in device)
    attention = sorted({SDPA_OPS[n] for n in names if n in SDPA_OPS})
    if not attention:
        attention = ["no SDPA op (eager attention)"] if "aten::softmax" in names or "aten::_softmax" in names else []
    return {
        "wall_ms": wall_s * 1e3 / steps,
        "device_ms": sum(e.time_range.elapsed_us() for e in device) / 1e3 / steps if cuda else None,
        "host_ops_ms": sum(e.self_cpu_time_total for e in host if not e.name.startswith("ProfilerStep")) / 1e3 / steps,
        "aten_ops": sum(n for name, n in names.items() if name.startswith("aten::")) / steps,
        "kernels": len(device) / steps if cuda else None,
        "launches": sum(n for name, n in names.items() if "LaunchKernel" in name) / steps if cuda else None,
        "sync_calls": {n: names[n] / steps for n in SYNC_CALLS if names[n]},
        # what torch.compile ran: its regions (one per call of a compiled function) and CUDA graph replays
        "compiled_regions": sum(n for name, n in names.items() if name.startswith(COMPILED_REGION)) / steps,
        "graph_launches": names["cudaGraphLaunch"] / steps if cuda else None,
        "dtoh_copies": sum(n for name, n in kernels.items() if "DtoH" in name) / steps if cuda else None,
        "host_value_ops": {n: names[n] / steps for n in HOST_VALUE_OPS if names[n]},
        "attention": attention,
        "attention_kernels": sorted(k for k in kernels if any(s in k.lower() for s in ATTENTION_KERNELS))[:4],
        "top": [
            {"op": name, "ms": us / 1e3 / steps, "calls": calls / steps, "dtypes": d.most_common(1)[0][0] if d else ""}
            for name, (us, calls, d) in top
        ],
        "self_ms": {name: v[0] / 1e3 / steps for name, v in ops.items()},
        # on a GPU the host's side: which ops (and the adapters' own autograd nodes, named as their classes) the
        # host spends its time in, for a step the host, not the GPU, sets the pace of
        "host_top": [
            {"op": name, "ms": us / 1e3 / steps, "calls": ops[name][1] / steps} for name, us in host_us.most_common(TOP)
        ],
        "host_self_ms": {name: us / 1e3 / steps for name, us in host_us.items()},
    }


class DtypeProbe:
    """The dtypes at one adapted layer: its base weight and adapter weights now, and, on its first forward, the
    input it gets and the input its adapter's first trainable module gets.

    Args:
        name: the layer's name in the model.
        layer: an adapted layer: ours (``cgc_lightning.inject.AdaptedLayer``) or PEFT's ``LoraLayer``; both hold
            the frozen original as ``base_layer``.
    """

    def __init__(self, name: str, layer: torch.nn.Module):
        trainable = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        self.found = {
            "layer": name,
            "base weight": str(layer.base_layer.weight.dtype),
            "adapter weights": ", ".join(sorted({f"{n.split('.')[-1]} {p.dtype}" for n, p in trainable})),
        }
        # the adapter's input: the first of the layer's modules past its base layer to be called (our adapter;
        # PEFT's dropout, then lora_A)
        base = set(layer.base_layer.modules())
        adapter = [m for m in layer.modules() if m is not layer and m not in base]
        self.handles = [
            layer.register_forward_pre_hook(self._hook("hidden states in")),
            *(m.register_forward_pre_hook(self._hook("adapter input")) for m in adapter),
            layer.register_forward_hook(lambda m, args, out: self._record("layer output", m, out)),
        ]

    def _hook(self, key: str):
        return lambda module, args: self._record(key, module, args[0] if args else None)

    def _record(self, key: str, module: torch.nn.Module, x) -> None:
        if key in self.found or not isinstance(x, torch.Tensor):
            return
        kind = x.device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else "off"
        where = f" to {type(module).__name__}" if key == "adapter input" else ""
        self.found[key] = f"{x.dtype}{where} (autocast {autocast})"

    def remove(self) -> dict:
        for h in self.handles:
            h.remove()
        return self.found


class HostValueProbe(TorchDispatchMode):
    """Where the ops of :data:`HOST_VALUE_OPS` run from, on which device: the innermost Python frame outside torch,
    and the innermost of this repository's when that is another. Every op goes through Python under it, so it
    runs on the profiler's warm-up step only; ``sites`` maps ``(op, device, where)`` to a count."""

    root = Path(__file__).resolve().parent.parent

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"aten::{func.__name__.split('.')[0]}"
        if name in HOST_VALUE_OPS:
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            device = tensor.device.type if tensor is not None else "?"
            self.sites[(name, device, self.where())] += 1
        return func(*args, **(kwargs or {}))

    def where(self) -> str:
        frames = [f for f in traceback.extract_stack()[:-2] if not f.filename.startswith(TORCH_DIR)]
        if not frames:
            return "?"
        ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(self.root)]
        site = self.site(frames[-1])
        return site if not ours or ours[-1] is frames[-1] else f"{site} <- {self.site(ours[-1])}"

    def site(self, frame) -> str:
        path = Path(frame.filename).resolve()
        rel = path.relative_to(self.root) if path.is_relative_to(self.root) else Path(*path.parts[-3:])
        return f"{rel}:{frame.lineno} {frame.name}"


def first_peft_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The first of a PEFT model's LoRA layers, by name and module."""
    from peft.tuners.lora import LoraLayer

    return next((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


class FitProfiler(Callback):
    """Profile ``profiler.runs`` training steps of ``fit`` from batch ``start_at`` on (counting from 0), and probe
    the dtypes at the first adapted layer on the first of them. Place it after ``StepTimer``."""

    def __init__(self, profiler: StepProfiler, start_at: int):
        self.profiler, self.start_at, self.batches = profiler, start_at, 0
        self.probe: DtypeProbe | None = None
        self.dtypes: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batches == self.start_at:
            from cgc_lightning.inject import adapted_layers

            self.probe = DtypeProbe(*next(adapted_layers(pl_module.model)))
            self.profiler.begin(compiled=bool(getattr(pl_module, "_compiled", ())))
        self.batches += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.profiler.active:
            if self.probe is not None:
                self.dtypes, self.probe = self.probe.remove(), None
            self.profiler.end_step()


class PyProfiler(Callback):
    """``cProfile`` over ``steps`` whole training iterations of ``fit`` from batch ``start_at`` on (counting from 0):
    from that batch's start to the start of the batch ``steps`` later (or the end of training), so the hooks, the
    logging and the fetching between two steps are in it. ``stats``: a ``pstats.Stats`` once it has run."""

    def __init__(self, start_at: int, steps: int):
        self.start_at, self.steps, self.batches = start_at, steps, 0
        self.prof: cProfile.Profile | None = None
        self.stats: pstats.Stats | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batches == self.start_at + self.steps:
            self._stop()
        if self.batches == self.start_at:
            self.prof = cProfile.Profile()
            self.prof.enable()
        self.batches += 1

    def on_train_end(self, trainer, pl_module):
        self._stop()

    def _stop(self) -> None:
        if self.prof is not None:
            self.prof.disable()
            self.stats, self.prof = pstats.Stats(self.prof), None


def _where(func: tuple) -> str:
    """``file:line(name)`` of a pstats key, the file from its package folder (``lightning/pytorch/...``) on."""
    file, line, name = func
    parts = Path(file).parts
    for root in ("site-packages", "dist-packages"):
        if root in parts:
            parts = parts[parts.index(root) + 1 :]
            break
    else:
        parts = parts[-3:]
    return f"{'/'.join(parts)}:{line}({name})"


def report_python(stats: pstats.Stats, steps: int, path: Path, top: int = 25) -> Path:
    """Print ``stats`` per step: the functions by own time, then this repository's and Lightning's by cumulative
    time (where a step's Python goes, caller by caller); write them to ``path`` (``python -m pstats path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.dump_stats(str(path))
    rows = stats.stats  # func -> (primitive calls, calls, own s, cumulative s, callers)
    total = sum(r[2] for r in rows.values()) * 1e3 / steps
    print(
        f"fit under cProfile: {steps} whole iterations, {total:.1f} ms of Python-visible time a step (cProfile "
        f"slows Python; read the shares). Stats: {path}"
    )
    if sys.version_info >= (3, 12):  # cProfile on sys.monitoring, whose events come from every thread
        print(
            "  Python >= 3.12: the other threads' calls are in it too (the DataLoader's pin-memory thread), and a "
            "function's cumulative time can hold calls another thread made while it ran"
        )

    def table(items, column: int) -> None:  # column 2: own time, 3: cumulative
        for func, (_, calls, own, cum, _) in sorted(items, key=lambda kv: -kv[1][column])[:top]:
            ms = f"{own * 1e3 / steps:>7.2f} {cum * 1e3 / steps:>7.2f}"
            print(f"  {_where(func)[:92]:<92} {ms} {calls / steps:>7.0f}")

    print(f"  by own time, ms per step: {'':<66} {'own':>7} {'cum':>7} {'calls':>7}")
    table(rows.items(), 2)
    mine = ("cgc_lightning", "datamodules", "lightning/pytorch")
    print("  this repository's and Lightning's functions by cumulative time, ms per step:")
    table([kv for kv in rows.items() if any(m in kv[0][0] for m in mine)], 3)
    return path


def report(results: dict[str, dict], cuda: bool) -> None:
    """Print the loops' profiles side by side, then each loop's top ops and the ops that differ the most."""
    fit, bare = results["fit"], results["bare"]
    print(f"profile: {fit['steps']} steps of each loop after the timed ones and one more (torch.profiler; per step)")

    def row(label: str, key, fmt: str = "{:.1f}") -> None:
        def cell(r):
            v = key(r) if callable(key) else r[key]
            return "n/a" if v is None else fmt.format(v)

        a, b = key(fit) if callable(key) else fit[key], key(bare) if callable(key) else bare[key]
        ratio = f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else ""
        print(f"  {label:<46} {cell(fit):>12} {cell(bare):>12} {ratio:>10}")

    print(f"  {'':<46} {'fit':>12} {'bare':>12} {'fit / bare':>10}")
    row("wall ms (profiled, so slower than timed)", "wall_ms")
    row("device ms (CUDA kernel time)", "device_ms")
    row("device busy (device ms / wall ms)", lambda r: r["device_ms"] and r["device_ms"] / r["wall_ms"], "{:.0%}")
    row("host ms in profiled ops (CPU self time)", "host_ops_ms")
    row("aten ops", "aten_ops", "{:.0f}")
    row("device kernels", "kernels", "{:.0f}")
    row("kernel launches", "launches", "{:.0f}")
    row("CUDA sync calls (timers' own: ~2)", lambda r: sum(r["sync_calls"].values()) if cuda else None, "{:.0f}")
    row("Memcpy DtoH", "dtoh_copies", "{:.0f}")
    row("torch.compile regions", "compiled_regions", "{:.0f}")
    row("CUDA graph launches", "graph_launches", "{:.0f}")
    for op in HOST_VALUE_OPS:
        if op in fit["host_value_ops"] or op in bare["host_value_ops"]:
            row(f"{op} (host waits for a value)", lambda r, op=op: r["host_value_ops"].get(op, 0.0), "{:.0f}")
    for name, r in results.items():
        print(f"  {name}: attention {', '.join(r['attention']) or 'not seen'}", end="")
        print(f"; kernels {', '.join(k[:60] for k in r['attention_kernels'])}" if r["attention_kernels"] else "")
        print(f"  {name}: dtypes at {', '.join(f'{k}: {v}' for k, v in r['dtypes'].items())}")
        if r["sync_calls"]:
            print(f"  {name}: sync calls {', '.join(f'{k} {v:.0f}' for k, v in r['sync_calls'].items())}", end="")
            print(f"; made at {', '.join(f'{k} ({v:.0f})' for k, v in r['sync_sites'].items())}")
        print(f"  {name}: Chrome trace {r['trace']}")
    for name, r in results.items():
        print(f"{name}: ops that read a value on the host, by op, tensor device and call site (warm-up step)")
        if r["host_value_sites"] is None:
            print("  not probed: the loop is compiled (a dispatch mode would leave its compiled code unused)")
            continue
        for (op, device, where), n in r["host_value_sites"].items():
            print(f"  {n:>4} {op.removeprefix('aten::'):<20} {device:<5} {where}")
    what = "self device ms" if cuda else "self CPU ms"
    for name, r in results.items():
        print(f"{name}: top {TOP} ops by {what} per step")
        print(f"  {'op':<60} {'ms':>8} {'calls':>7}  input dtypes")
        for t in r["top"]:
            print(f"  {t['op'][:60]:<60} {t['ms']:>8.2f} {t['calls']:>7.0f}  {t['dtypes'][:40]}")
    print_diff(fit["self_ms"], bare["self_ms"], what)
    if cuda:  # the device tables above rank by GPU time; a host-bound step needs the host's side too
        for name, r in results.items():
            print(f"{name}: top {TOP} ops by self host ms per step")
            print(f"  {'op':<60} {'ms':>8} {'calls':>7}")
            for t in r["host_top"]:
                print(f"  {t['op'][:60]:<60} {t['ms']:>8.2f} {t['calls']:>7.0f}")
        print_diff(fit["host_self_ms"], bare["host_self_ms"], "self host ms")


def print_diff(fit: dict[str, float], bare: dict[str, float], what: str) -> None:
    """The ``TOP`` ops whose per-step ms (``name -> ms`` of each loop) differ the most between fit and bare."""
    diff = {op: fit.get(op, 0.0) - bare.get(op, 0.0) for op in {*fit, *bare}}
    print(f"fit - bare: the {TOP} ops whose {what} per step differ the most")
    for op, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:TOP]:
        print(f"  {op[:60]:<60} {d:>+8.2f}  (fit {fit.get(op, 0.0):.2f}, bare {bare.get(op, 0.0):.2f})")
