"""Grid points on GPUs: placement by free memory and measured peak, --jobs-per-gpu, out-of-memory retry and advice.

No GPU is needed: the memory query (``gpu_slots.query_gpus``) is replaced by fixed figures, and the point processes
by short scripts that record where they ran and report a peak as ``PeakMemoryReport`` would.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cgc_lightning import gpu_slots, grid
from cgc_lightning.gpu_slots import GIB, GpuMemory, GpuSlots, Placed, oom_advice

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "experiments" / "tiny.yaml").read_text())
PEAK = 10 * GIB
EST = int(PEAK * 1.15) + int(1.5 * GIB)  # the documented estimate: peak * 1.15 + 1.5 GiB


def mem(free_gib: float, total_gib: float = 141) -> GpuMemory:
    return GpuMemory(free=int(free_gib * GIB), total=int(total_gib * GIB))


def fill(slots: GpuSlots, memory: dict, limit: int = 100) -> list[str]:
    """Start points (``p0``, ``p1``, ..., the lowest name not running) until none fits; the GPU each went to."""
    placed = []
    while (g := slots.choose(memory)) is not None and len(placed) < limit:
        slots.start(next(f"p{k}" for k in range(limit + len(slots.running)) if f"p{k}" not in slots.running), g)
        placed.append(g)
    return placed


def known(slots: GpuSlots, peak: int = PEAK) -> GpuSlots:
    slots.report("finished-earlier", peak, settled=True)
    return slots


# ------------------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("free_gib", [13, 30, 40, 80, 139.5])
def test_as_many_points_per_gpu_as_fit_never_more(free_gib):
    """Placing one by one fills a GPU to exactly floor(free / estimate) points, and at least one."""
    slots = known(GpuSlots(["0"]))
    assert slots.estimate == EST
    placed = fill(slots, {"0": mem(free_gib)})
    assert len(placed) == max(1, math.floor(free_gib * GIB / EST))


def test_an_empty_gpu_takes_a_point_whatever_the_estimate():
    slots = known(GpuSlots(["0"]))
    assert fill(slots, {"0": mem(5)}) == ["0"], "one point, though 5 GiB is less than its estimate"
    assert fill(GpuSlots(["0"]), {"0": None}) == ["0"], "and without memory figures"


def test_the_first_point_runs_alone_until_its_peak_is_settled():
    slots = GpuSlots(["0"])
    memory = {"0": mem(140)}
    slots.start("first", slots.choose(memory))
    assert slots.choose(memory) is None and slots.estimate is None
    slots.report("first", 2 * GIB, settled=False)  # weights loaded, no step taken yet
    assert slots.choose(memory) is None
    slots.report("first", PEAK, settled=True)
    assert slots.estimate == EST and slots.choose(memory) == "0"
    slots.report("first", 30 * GIB, settled=True)  # a larger peak later (validation): the estimate follows
    assert slots.estimate == int(30 * GIB * 1.15) + int(1.5 * GIB)


def test_points_that_started_are_charged_their_whole_estimate():
    """Free memory right after a start has not yet dropped; the GPU's capacity, not its free memory, counts."""
    slots = known(GpuSlots(["0"]))
    assert fill(slots, {"0": mem(40)}) == ["0", "0", "0"]
    slots.end("p2")
    # two points still loading (free memory barely moved): the third fits again, a fourth does not
    assert fill(slots, {"0": mem(39)}) == ["0"]


def test_free_memory_now_limits_too():
    """Another process taking memory on the GPU leaves room for fewer of ours."""
    slots = known(GpuSlots(["0"]))
    slots.start("a", slots.choose({"0": mem(80)}))
    assert slots.choose({"0": mem(12)}) is None  # 80 GiB when it was empty, 12 GiB free now
    assert slots.choose({"0": mem(60)}) == "0"


def test_two_gpus_one_point_each_first_then_by_room():
    slots = GpuSlots(["0", "1"])
    memory = {"0": mem(40), "1": mem(80)}
    first = fill(slots, memory)
    assert sorted(first) == ["0", "1"], "one per GPU before any peak is known"
    slots.report("p0", PEAK, settled=True)
    more = fill(slots, memory)
    want = {"0": math.floor(40 * GIB / EST), "1": math.floor(80 * GIB / EST)}
    assert {g: (first + more).count(g) for g in "01"} == want
    assert more[0] == "1", "the GPU with the most room first"


def test_jobs_per_gpu_caps_each_gpu_and_spreads_without_memory_figures():
    slots = GpuSlots(["0", "1"], jobs_per_gpu=2)
    assert slots.estimate is None
    placed = fill(slots, {"0": None, "1": None})
    assert placed == ["0", "1", "0", "1"]
    slots.end("p0")
    assert fill(slots, {"0": None, "1": None}) == ["0"]
    big = GpuSlots(["0"], jobs_per_gpu=8)
    assert len(fill(big, {"0": mem(5)})) == 8, "no memory gating under --jobs-per-gpu"


def test_waiting_when_full_and_placing_again_when_a_point_ends():
    slots = known(GpuSlots(["0"]))
    memory = {"0": mem(30)}
    assert fill(slots, memory) == ["0", "0"]
    assert slots.choose(memory) is None
    assert slots.waiting(memory) == "waiting for room: GPU 0 (2 points there, est 13.0 GiB each, 30.0 GiB free)"
    slots.end("p0")
    assert slots.choose(memory) == "0"


def test_without_memory_figures_one_point_per_gpu():
    slots = known(GpuSlots(["0", "1"]))
    memory = {"0": None, "1": None}
    assert sorted(fill(slots, memory)) == ["0", "1"]
    assert "nvidia-smi" in slots.waiting(memory) and "--jobs-per-gpu" in slots.waiting(memory)


def test_out_of_memory_among_several_raises_the_estimate_not_alone():
    slots = known(GpuSlots(["0"]))
    fill(slots, {"0": mem(40)})
    before = slots.estimate
    slots.end("p0", out_of_memory=True)
    assert slots.estimate == int(before * gpu_slots.OOM_RAISE)
    slots.end("p1", out_of_memory=True)  # a second victim of the same crowding: raised once, not twice
    assert slots.estimate == int(before * gpu_slots.OOM_RAISE)
    alone = known(GpuSlots(["0"]))
    alone.start("a", "0")
    alone.end("a", out_of_memory=True)
    assert alone.estimate == EST


def test_a_retry_under_jobs_per_gpu_waits_for_an_empty_gpu_and_keeps_it():
    slots = GpuSlots(["0", "1"], jobs_per_gpu=3)
    memory = {"0": None, "1": None}
    slots.start("a", "0")
    slots.start("b", "1")
    assert slots.choose(memory, alone=True) is None
    slots.end("b")
    assert slots.choose(memory, alone=True) == "1"
    slots.start("retry", "1", alone=True)
    assert fill(slots, memory) == ["0", "0"], "nothing joins the retry"
    assert "alone" in slots.where("1", None)


def test_neighbours_are_counted_over_a_points_life():
    slots = GpuSlots(["0"], jobs_per_gpu=4)
    slots.start("a", "0")
    slots.start("b", "0")
    slots.start("c", "0")
    slots.end("b")
    assert slots.end("a").others == 2 and slots.end("c").others == 2


def test_where_says_how_the_gpu_is_shared():
    slots = known(GpuSlots(["0"]))
    fill(slots, {"0": mem(80)}, limit=3)
    assert slots.where("0", mem(41)) == "GPU 0 (3 points there, est 13.0 GiB each, 41.0 GiB free)"
    fresh = GpuSlots(["0"])
    fresh.start("a", "0")
    assert "once a point's peak memory is known" in fresh.where("0", mem(140))
    capped = GpuSlots(["0"], jobs_per_gpu=4)
    capped.start("a", "0")
    assert capped.where("0", None) == "GPU 0 (1 point there, at most 4 by --jobs-per-gpu, free memory unknown)"


def test_bad_jobs_per_gpu_and_no_gpus_are_errors():
    with pytest.raises(ValueError, match="--jobs-per-gpu must be at least 1"):
        GpuSlots(["0"], jobs_per_gpu=0)
    with pytest.raises(ValueError, match="at least one GPU"):
        GpuSlots([])


# ----------------------------------------------------------------------------------- out of memory


def test_out_of_memory_advice_names_the_fix():
    shared = oom_advice("abc r=8", Placed("0", others=5, peak=20 * GIB), jobs_per_gpu=None, retrying=None)
    assert shared == (
        "point abc r=8 ran out of GPU memory on GPU 0 with 5 other points there, its peak 20.0 GiB so far; "
        "rerun with --jobs-per-gpu 5 (or lower --jobs), or shrink data.batch_size / enable model.gradient_checkpointing"
    )
    retry = oom_advice("abc", Placed("1", others=1), jobs_per_gpu=None, retrying="with a larger memory estimate")
    assert "with 1 other point there; retrying it once with a larger memory estimate; if it runs out again, " in retry
    assert "--jobs-per-gpu 1 " in retry
    capped = oom_advice("abc", Placed("0", others=3), jobs_per_gpu=4, retrying=None)
    assert "--jobs-per-gpu 3 " in capped
    alone = oom_advice("abc", Placed("0"), jobs_per_gpu=None, retrying=None)
    assert alone.startswith("point abc ran out of GPU memory alone on GPU 0: one point does not fit one GPU; ")
    assert all(k in alone for k in ("data.batch_size", "model.gradient_checkpointing", "data.max_length"))
    assert "--jobs-per-gpu" not in alone


def test_out_of_memory_is_recognised_in_a_log():
    torch_oom = (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
        "139.81 GiB of which 1.06 GiB is free."
    )
    assert gpu_slots.is_out_of_memory("Traceback ...\n" + torch_oom)
    assert gpu_slots.is_out_of_memory("RuntimeError: CUDA error: out of memory")
    assert not gpu_slots.is_out_of_memory("ValueError: data.batch_size must be positive")


# ------------------------------------------------------------------------------------- measuring


def test_query_gpus_maps_indices_and_uuids(monkeypatch):
    out = "0, GPU-aaa, 81000, 81559\n1, GPU-bbb, [N/A], 81559\n"
    monkeypatch.setattr(gpu_slots.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=out))
    got = gpu_slots.query_gpus(["0", "GPU-aaa", "1", "MIG-ccc"])
    assert got["0"] == got["GPU-aaa"] == GpuMemory(free=81000 * 2**20, total=81559 * 2**20)
    assert got["1"] is None and got["MIG-ccc"] is None

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(gpu_slots.subprocess, "run", missing)
    assert gpu_slots.query_gpus(["0"]) == {"0": None}


def test_peak_report_settles_after_steps_and_a_validation(tmp_path, monkeypatch):
    path = tmp_path / "mem.json"
    peaks = iter(range(1, 100))
    monkeypatch.setattr(gpu_slots, "_peak_reserved", lambda: next(peaks) * GIB)
    cb = gpu_slots.PeakMemoryReport(str(path), settle_steps=2, every_n_steps=10)
    trainer = SimpleNamespace(global_step=0)
    cb.on_validation_end(trainer, None)  # the sanity check
    assert gpu_slots.read_report(path) == (1 * GIB, False)
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert gpu_slots.read_report(path) == (2 * GIB, False), "one optimizer step: optimizer state may still come"
    trainer.global_step = 2
    cb.on_train_batch_end(trainer, None, None, None, 1)
    assert gpu_slots.read_report(path) == (3 * GIB, True)
    cb.on_train_batch_end(trainer, None, None, None, 5)
    assert gpu_slots.read_report(path) == (3 * GIB, True), "settled: written every 10 batches"
    cb.on_train_batch_end(trainer, None, None, None, 10)
    assert gpu_slots.read_report(path) == (4 * GIB, True)
    assert json.loads(path.read_text()) == {"peak": 4 * GIB, "settled": True}

    no_val = gpu_slots.PeakMemoryReport(str(tmp_path / "b.json"))
    no_val.on_train_batch_end(SimpleNamespace(global_step=5), None, None, None, 4)
    assert gpu_slots.read_report(tmp_path / "b.json")[1] is False, "no validation yet"
    logged = []
    trainer.logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((metrics, step)))
    no_val.on_fit_end(trainer, None)
    assert gpu_slots.read_report(tmp_path / "b.json")[1] is True
    assert logged == [({"system/gpu_peak_memory_gib": 6.0}, 2)], "the peak goes to the run as well"


def test_no_report_without_cuda_or_a_path(tmp_path, monkeypatch):
    monkeypatch.delenv(gpu_slots.MEMORY_FILE_ENV, raising=False)
    gpu_slots.PeakMemoryReport().on_fit_end(None, None)  # no path: nothing to write, nothing raised
    path = tmp_path / "m.json"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # as on a CPU machine, also on a GPU one
    gpu_slots.PeakMemoryReport(str(path)).on_fit_end(None, None)  # no CUDA memory to report
    assert not path.exists() and gpu_slots.read_report(path) is None


# ----------------------------------------------------------------------------------------- run_grid

# A stand-in for a point's process: records its GPU and lifetime, reports PEAK as settled after 0.3 s, runs
# `secs`; with `oom` it dies of CUDA out-of-memory on its first attempt (or on every attempt with `always`).
POINT = """
import json, os, sys, time
t0 = time.time()
out, pid, secs, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
attempt = len([f for f in os.listdir(out) if f.startswith(pid + ".")])
time.sleep(0.3)
with open(os.environ["CGC_GRID_MEMORY_FILE"], "w") as f:
    json.dump({"peak": PEAK, "settled": True}, f)
oom = mode == "always" or (mode == "oom" and attempt == 0)
time.sleep(1.0 if oom else secs)
rec = [os.environ["CUDA_VISIBLE_DEVICES"], os.environ["CUDA_DEVICE_ORDER"], t0, time.time()]
open(os.path.join(out, f"{pid}.{attempt}"), "w").write(json.dumps(rec))
if oom:
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.")
    sys.exit(1)
""".replace("PEAK", str(PEAK))


def _grid(tmp_path, monkeypatch, n: int, memory: dict, modes: dict[int, str] | None = None, secs: float = 3.0):
    monkeypatch.chdir(tmp_path)
    points, _ = grid.expand(grid.GridConfig(base="unused", axes={"seed_everything": list(range(1, n + 1))}), TINY)
    cfg = grid.GridConfig(base="unused", name="gpus", experiment_name="gpus")
    store = grid.open_store(cfg, TINY, f"sqlite:///{tmp_path}/mlflow.db")
    parent = grid.parent_run(store, cfg)
    out = tmp_path / "out"
    out.mkdir()
    mode = {p.id: (modes or {}).get(k, "ok") for k, p in enumerate(points)}
    monkeypatch.setattr(
        grid.schedule,
        "point_command",
        lambda _c, p, _p, _u: [sys.executable, "-c", POINT, str(out), p.id, str(secs), mode[p.id]],
    )
    monkeypatch.setattr(gpu_slots, "query_gpus", lambda ids: {g: memory.get(g) for g in ids})
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    return cfg, points, store, parent, out


def _spans(out: Path, point_id: str) -> list[tuple[str, float, float]]:
    got = []
    for f in sorted(out.glob(f"{point_id}.*")):
        gpu, order, a, b = json.loads(f.read_text())
        assert order == "PCI_BUS_ID", "CUDA numbers the GPUs as nvidia-smi does"
        got.append((gpu, a, b))
    return got


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    return max(sum(a <= t < b for a, b in spans) for t, _ in spans)


def test_run_grid_packs_points_by_measured_peak(tmp_path, monkeypatch, capsys):
    """7 points, --jobs 7, GPUs with room for 3 and 2: first one each, then as many as fit, never more."""
    memory = {"0": mem(40), "1": mem(28)}
    cfg, points, store, parent, out = _grid(tmp_path, monkeypatch, 7, memory)
    grid.run_grid("g.yaml", cfg, points, store, parent, jobs=7, gpus=["0", "1"])
    spans = {p.id: _spans(out, p.id)[0] for p in points}
    fits = {g: math.floor(m.free / EST) for g, m in memory.items()}
    assert fits == {"0": 3, "1": 2}
    for g in "01":
        on = sorted((a, b) for gpu, a, b in spans.values() if gpu == g)
        assert _most_at_once(on) == fits[g], f"GPU {g}: several points, as many as fit"
        # the first on each GPU reported its peak 0.3 s in; nothing joined it before
        assert all(a >= on[0][0] + 0.3 for a, _ in on[1:])
    log = capsys.readouterr().out
    assert "running on GPU 0 (1 point there, more join once a point's peak memory is known, 40.0 GiB free)" in log
    assert "running on GPU 0 (2 points there, est 13.0 GiB each, 40.0 GiB free)" in log
    assert "waiting for room: GPU 0 (3 points there" in log


def test_run_grid_retries_a_point_that_ran_out_of_memory_beside_another(tmp_path, monkeypatch, capsys):
    """--jobs-per-gpu 2: the first point dies of out-of-memory next to the second, and is retried alone."""
    cfg, points, store, parent, out = _grid(tmp_path, monkeypatch, 3, {"0": None}, modes={0: "oom"}, secs=1.5)
    grid.run_grid("g.yaml", cfg, points, store, parent, jobs=3, gpus=["0"], jobs_per_gpu=2)
    first, retry = _spans(out, points[0].id)
    others = [_spans(out, p.id)[0] for p in points[1:]]
    assert _most_at_once([first[1:], others[0][1:]]) == 2, "two at once, as --jobs-per-gpu 2 allows"
    assert all(b <= retry[1] or a >= retry[2] for _, a, b in others), "the retry had the GPU to itself"
    log = capsys.readouterr().out
    assert (
        f"point {points[0].id} seed_everything=1 ran out of GPU memory on GPU 0 with 1 other point there, its peak "
        "10.0 GiB so far; retrying it once alone on a GPU; if it runs out again, rerun with --jobs-per-gpu 1" in log
    )
    assert "failed (exit" not in log


def test_run_grid_names_the_fix_when_one_point_does_not_fit_a_gpu(tmp_path, monkeypatch, capsys):
    cfg, points, store, parent, out = _grid(tmp_path, monkeypatch, 1, {"0": mem(80)}, modes={0: "always"})
    assert not grid.run_grid("g.yaml", cfg, points, store, parent, jobs=4, gpus=["0"])
    assert len(_spans(out, points[0].id)) == 1, "alone on its GPU: not retried"
    log = capsys.readouterr().out
    assert "failed (exit 1" in log and "ran out of GPU memory alone on GPU 0, its peak 10.0 GiB so far" in log
    assert "shrink data.batch_size" in log


@pytest.mark.slow
def test_a_point_placed_on_a_gpu_reports_its_peak_from_fit_and_test(tmp_path, monkeypatch):
    """``run_point`` under the grid's memory file adds ``PeakMemoryReport`` to fit and test; it settles at the first
    validation after two steps."""
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    monkeypatch.chdir(tmp_path)
    written, write = [], gpu_slots.PeakMemoryReport.write
    monkeypatch.setattr(gpu_slots, "_peak_reserved", lambda: 3 * GIB)  # no CUDA here
    monkeypatch.setattr(
        gpu_slots.PeakMemoryReport, "write", lambda self, settled=False: written.append(settled) or write(self, settled)
    )
    monkeypatch.setenv(gpu_slots.MEMORY_FILE_ENV, str(tmp_path / "mem.json"))
    cfg, base, base_path = grid.load("experiments/grids/tiny.yaml")  # 4 steps, validation every 2
    points, _ = grid.expand(cfg, base)
    store = grid.open_store(cfg, base, f"sqlite:///{tmp_path}/mlflow.db")
    parent = grid.parent_run(store, cfg)
    assert grid.run_point(cfg, points[0], base_path, store, parent) == "finished"
    # batches 1 and 2, validation at step 2 (settled: quiet until batch 10), validation at step 4, fit end, test end
    assert written == [False, False, True, True, True, True]
    assert gpu_slots.read_report(tmp_path / "mem.json") == (3 * GIB, True)


def test_grid_help_names_jobs_per_gpu(capsys):
    with pytest.raises(SystemExit):
        grid.main(["--help"])
    assert "--jobs-per-gpu" in capsys.readouterr().out
