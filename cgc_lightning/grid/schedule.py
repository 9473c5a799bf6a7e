"""Running a grid's points: one point in this process (:func:`run_point`), every unfinished point in processes of
their own, placed on GPUs by ``gpu_slots`` (:func:`run_grid`), or their commands for a scheduler (:func:`emit`)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgc_lightning.driver import start_logged
from cgc_lightning.grid.config import GridConfig, Point, point_run_name, short_names
from cgc_lightning.grid.store import (
    GPU_TAG,
    NAME_TAG,
    OWNER_TAG,
    PARENT_TAG,
    POINT_TAG,
    ROLE_TAG,
    STAGE_TAG,
    Store,
    child_runs,
    finished,
    new_run,
    stage_runs,
)


def _owner_alive(run) -> bool:
    """Whether the process that owns the point's run is alive on this host, whatever the run's status: between
    its ``fit`` (which ends the run FINISHED) and its ``test``, a point is unfinished but not interrupted."""
    host, _, pid = run.data.tags.get(OWNER_TAG, "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False  # on another host we cannot tell: an unfinished run there counts as interrupted
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def run_point(cfg: GridConfig, point: Point, base_path: str, store: Store, parent_id: str) -> str:
    """Bring one point to finished, in this process (:func:`cgc_lightning.driver.fit_and_test`): ``fit`` (resumed
    from ``last.ckpt`` if any), then ``test``."""
    from cgc_lightning import chain, driver, gpu_slots

    client = store.client
    run = child_runs(store, parent_id, point.id).get(point.id)
    if finished(run):
        return "skipped"
    if run is not None and _owner_alive(run):
        return f"busy (pid {run.data.tags[OWNER_TAG]})"
    plan = "restart"
    if run is not None:
        plan = driver.resume_plan(run.data.tags.get(STAGE_TAG), store.checkpoints(run))
    if run is None or plan == "restart":  # nothing to continue from: start over in a clean run
        tags = {PARENT_TAG: parent_id, NAME_TAG: cfg.name, POINT_TAG: point.id, ROLE_TAG: "point"}
        tags |= {f"grid.{k}": v for k, v in point.names.items()}
        # the axis values are tags; the fit logs every value once as a param under its stable name (adapter.r, seed)
        fresh = client.get_run(new_run(store, point_run_name(cfg, point), tags))
        if run is not None:  # a MoDULA point's earlier stages stay, under the new run, to be continued
            for child in stage_runs(store, run.info.run_id):
                client.set_tag(child.info.run_id, PARENT_TAG, fresh.info.run_id)
            client.delete_run(run.info.run_id)
        run = fresh
    run_id, ckpts = run.info.run_id, store.checkpoints(run)
    # placed on a GPU by the grid: report the peak memory, by which the grid packs points onto GPUs
    peak_report = (
        [f"--trainer.callbacks+={gpu_slots.REPORT_CALLBACK}"] if os.environ.get(gpu_slots.MEMORY_FILE_ENV) else []
    )
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, OWNER_TAG, f"{socket.gethostname()}:{os.getpid()}")
    if peak_report and os.environ.get("CUDA_VISIBLE_DEVICES"):  # the GPU the grid placed this point on
        client.set_tag(run_id, GPU_TAG, os.environ["CUDA_VISIBLE_DEVICES"])
    args = [
        "--config",
        base_path,
        *point.args,
        f"--trainer.logger.init_args.tracking_uri={store.tracking_uri}",
        "--trainer.enable_progress_bar=false",
        *peak_report,
    ]

    def stage_run(stage: str) -> chain.StageRun:  # a MoDULA point's earlier stages: runs nested under the point's
        found = [r for r in stage_runs(store, run_id) if r.data.tags.get(chain.STAGE_RUN_TAG) == stage]
        if found:  # an interrupted chain: the stage finished, or continues from its last checkpoint, in its run
            child, folder = found[0], store.checkpoints(found[0])
            if child.info.status == "FINISHED" and chain.best_checkpoint(folder) is not None:
                return chain.StageRun(child.info.run_id, folder, "done")
            if zipfile.is_zipfile(folder / "last.ckpt"):
                client.update_run(child.info.run_id, status="RUNNING")
                return chain.StageRun(child.info.run_id, folder, "resume")
            client.delete_run(child.info.run_id)  # nothing to continue from
        tags = {PARENT_TAG: run_id, chain.STAGE_RUN_TAG: stage, ROLE_TAG: "modula_stage"}
        child = client.get_run(new_run(store, point_run_name(cfg, point, f"stage={stage}"), tags))
        return chain.StageRun(child.info.run_id, store.checkpoints(child))

    modula = chain.is_chain(point.config)  # its three stages, the last one into this point's run
    try:
        driver.fit_and_test(
            args,
            what=f"point {point.id}",
            run_id=run_id,
            folder=ckpts,
            resume=plan == "resume",
            test_only=plan == "test",
            chained=driver.Chain.of(point.config, cfg.modula_stages, stage_run) if modula else None,
            on_step=lambda step: client.set_tag(run_id, STAGE_TAG, step),
        )
    except BaseException as e:
        client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return "resumed and finished" if plan == "resume" else "finished"


# ------------------------------------------------------------------------------------------ runner


def visible_gpus(arg: str | None) -> list[str]:
    """GPU ids to hand out: ``--gpus``, else ``$CUDA_VISIBLE_DEVICES``, else what ``nvidia-smi -L`` lists."""
    if arg:
        return [g.strip() for g in arg.split(",") if g.strip()]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def point_command(config_path: str, point: Point, parent_id: str, tracking_uri: str) -> list[str]:
    """The command that brings one point to finished in a process of its own (``grid --point``)."""
    from cgc_lightning.driver import child_command

    args = ["--config", config_path, "--point", point.id, "--parent", parent_id, "--tracking-uri", tracking_uri]
    return child_command("grid", *args)


@dataclass
class _Job:
    """A point's process, while it runs."""

    proc: subprocess.Popen
    index: int
    point: Point
    started: float
    log: Any
    log_from: int
    """The log's size when this attempt started: what it wrote comes after."""
    memory_file: Path | None = None
    """Where the point reports its peak GPU memory (``gpu_slots.PeakMemoryReport``)."""


def run_grid(
    config_path: str,
    cfg: GridConfig,
    points: list[Point],
    store: Store,
    parent_id: str,
    *,
    jobs: int,
    gpus: list[str],
    jobs_per_gpu: int | None = None,
) -> bool:
    """Run every unfinished point, at most ``jobs`` processes at a time; True when all points are finished.

    With ``gpus``, each point goes to the GPU ``gpu_slots.GpuSlots`` picks (by free memory and the points' measured
    peak, or at most ``jobs_per_gpu`` per GPU) and waits while none has room; one that runs out of memory next to
    other points is retried once.
    """
    short = short_names(points)
    runs = child_runs(store, parent_id)
    pending: list[tuple[int, Point]] = []
    for i, p in enumerate(points, 1):
        if finished(runs.get(p.id)):
            print(f"[{i}/{len(points)}] point {p.id} {p.label(short)} skipped (finished: run {runs[p.id].info.run_id})")
        else:
            pending.append((i, p))
    logs = Path(store.checkpoint_dir) / "grids" / cfg.name
    logs.mkdir(parents=True, exist_ok=True)
    slots = None
    if gpus:
        from cgc_lightning import gpu_slots

        slots = gpu_slots.GpuSlots(gpus, jobs_per_gpu=jobs_per_gpu)
    memory: dict = {}
    asked = -1e9  # when the GPUs' memory was last queried
    running: dict[str, _Job] = {}
    retried: set[str] = set()  # points already retried after running out of GPU memory
    failed = 0
    said_wait = False

    def name(i: int, p: Point) -> str:
        return f"[{i}/{len(points)}] point {p.id} {p.label(short)}"

    def start(i: int, p: Point, gpu: str | None) -> _Job:
        env = dict(os.environ)
        # N processes that each spin one thread per core on the same cores slow each other down manyfold
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        memory_file = None
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's device k is nvidia-smi's index k
            memory_file = logs / f"{p.id}.gpu_memory.json"
            memory_file.unlink(missing_ok=True)
            env[gpu_slots.MEMORY_FILE_ENV] = str(memory_file)
        proc, log = start_logged(
            point_command(config_path, p, parent_id, store.tracking_uri), logs / f"{p.id}.log", env
        )
        return _Job(proc, i, p, time.perf_counter(), log, log.tell(), memory_file)

    def end(job: _Job) -> None:
        nonlocal failed
        i, p = job.index, job.point
        took = time.perf_counter() - job.started
        text = Path(job.log.name).read_bytes()[job.log_from :].decode(errors="replace")
        code = job.proc.returncode
        oom, placed, peak = False, None, None
        if slots is not None:
            peak = gpu_slots.read_report(job.memory_file)
            if peak is not None:  # a point that finished has been through every allocation it makes
                slots.report(p.id, peak[0], peak[1] or code == 0)
            oom = code != 0 and gpu_slots.is_out_of_memory(text)
            placed = slots.end(p.id, out_of_memory=oom)
        retry = oom and placed.others and p.id not in retried
        if oom:
            how = (
                "alone on a GPU"
                if jobs_per_gpu is not None
                else f"with a larger memory estimate ({gpu_slots.gib(slots.estimate or 0)} per point)"
            )
            advice = gpu_slots.oom_advice(
                f"{p.id} {p.label(short)}", placed, jobs_per_gpu=jobs_per_gpu, retrying=how if retry else None
            )
        if code == 0:
            memory = f", peak {gpu_slots.gib(peak[0])} of GPU memory" if peak is not None else ""
            print(f"{name(i, p)} finished ({took:.0f} s{memory})", flush=True)
        elif retry:
            retried.add(p.id)
            pending.insert(0, (i, p))
            print(f"[{i}/{len(points)}] {advice} ({took:.0f} s; log {job.log.name})", flush=True)
        else:
            failed += 1
            tail = "\n    ".join(text.splitlines()[-15:])
            print(f"{name(i, p)} failed (exit {code}, {took:.0f} s); log {job.log.name}:\n    {tail}", flush=True)
            if oom:
                print(f"[{i}/{len(points)}] {advice}", flush=True)
        run = child_runs(store, parent_id, p.id).get(p.id)
        if run is not None:
            store.client.log_artifact(run.info.run_id, job.log.name, "grid_logs")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while pending or running:
            if slots is not None and pending and len(running) < jobs and time.perf_counter() - asked > 2:
                memory, asked = gpu_slots.query_gpus(gpus), time.perf_counter()
            # first come, first placed: a point that waits for room holds back the ones behind it
            while pending and len(running) < jobs:
                i, p = pending[0]
                gpu = None
                if slots is not None:
                    gpu = slots.choose(memory, alone=p.id in retried and jobs_per_gpu is not None)
                    if gpu is None:
                        if not said_wait:
                            print(f"{name(i, p)} {slots.waiting(memory)}", flush=True)
                            said_wait = True
                        break
                    slots.start(p.id, gpu, alone=p.id in retried and jobs_per_gpu is not None)
                pending.pop(0)
                running[p.id] = start(i, p, gpu)
                said_wait = False
                where = f" on {slots.where(gpu, memory.get(gpu))}" if slots is not None else ""
                print(f"{name(i, p)} running{where}", flush=True)
            time.sleep(0.5)
            for job in list(running.values()):
                if slots is not None and (peak := gpu_slots.read_report(job.memory_file)) is not None:
                    slots.report(job.point.id, *peak)
                if job.proc.poll() is None:
                    continue
                job.log.close()
                del running[job.point.id]
                end(job)
                asked, said_wait = -1e9, False  # a GPU has freed up: look again
    except KeyboardInterrupt:
        for job in running.values():
            job.proc.terminate()
        for job in running.values():
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    runs = child_runs(store, parent_id)
    return failed == 0 and all(finished(runs.get(p.id)) for p in points)


def emit(kind: str, config_path: str, cfg: GridConfig, points: list[Point], store: Store, parent_id: str) -> str:
    """One command per unfinished point, for a scheduler: ``shell`` lines, or a ``slurm`` array job script."""
    runs = child_runs(store, parent_id)
    todo = [p for p in points if not finished(runs.get(p.id))]
    cwd = shlex.quote(str(Path.cwd()))
    if kind == "shell":
        return "".join(
            f"cd {cwd} && {shlex.join(point_command(config_path, p, parent_id, store.tracking_uri))}\n" for p in todo
        )
    if not todo:
        return "# every point of this grid is finished\n"
    cmd = point_command(config_path, todo[0], parent_id, store.tracking_uri)
    cmd[cmd.index("--point") + 1] = "@POINT@"
    line = shlex.join(cmd).replace("@POINT@", '"${POINTS[$SLURM_ARRAY_TASK_ID]}"')
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name=grid-{cfg.name}",
            f"#SBATCH --array=0-{len(todo) - 1}",
            "#SBATCH --gres=gpu:1",
            f"# {len(todo)} unfinished point(s) of grid {cfg.name!r}; parent run {parent_id}",
            f"POINTS=({' '.join(p.id for p in todo)})",
            f"cd {cwd}",
            f"exec {line}",
            "",
        ]
    )
