"""``python -m cgc_lightning grid``: the command line of :mod:`cgc_lightning.grid`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cgc_lightning.grid.config import _cli_value, expand, get_key, load, short_names
from cgc_lightning.grid.schedule import emit, run_grid, run_point, visible_gpus
from cgc_lightning.grid.store import open_store, parent_run
from cgc_lightning.grid.summary import report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cgc_lightning grid",
        # the first paragraph of the package's docstring (cgc_lightning/grid/__init__.py, imported before this module)
        description=sys.modules[__package__].__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="grid config (YAML), e.g. experiments/grids/tiny.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the expanded points and their count; run nothing")
    p.add_argument("--jobs", type=int, default=1, help="points run at once, each in its own process (default 1)")
    p.add_argument(
        "--gpus",
        help="GPU ids to place points on, by free memory and each point's measured peak (default: every visible GPU)",
    )
    p.add_argument(
        "--jobs-per-gpu",
        type=int,
        help="at most this many points per GPU, in place of the measured memory (lower it after an out-of-memory)",
    )
    p.add_argument("--summary", action="store_true", help="only summarise the grid's existing runs")
    p.add_argument("--emit", choices=["shell", "slurm"], help="print one command per unfinished point, for a scheduler")
    p.add_argument("--point", help="run this one point (by id) in this process")
    p.add_argument("--parent", help="the grid's parent run (default: the newest parent run of this grid's name)")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: the base config's, $MLFLOW_TRACKING_URI, or sqlite:///mlruns/mlflow.db)",
    )
    p.add_argument("--out", help="also write the summary files into this folder")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs_per_gpu is not None and args.jobs_per_gpu < 1:
        p.error(f"--jobs-per-gpu must be at least 1, got {args.jobs_per_gpu}")
    cfg, base, base_path = load(args.config)
    points, notes = expand(cfg, base)
    if not points:
        raise SystemExit(f"grid {cfg.name}: no points ({'; '.join(notes) or 'empty axes'})")
    if args.dry_run:
        short = short_names(points)
        fixed = [f"--{k}={_cli_value(v)}" for k, v in cfg.overrides.items()]
        print(f"grid {cfg.name}: base {base_path}" + (f", fixed overrides {' '.join(fixed)}" if fixed else ""))
        for i, pt in enumerate(points, 1):
            axis_args = [a if len(a) <= 100 else f"{a[:80]}... ({len(a)} chars)" for a in pt.args if a not in fixed]
            print(f"[{i}/{len(points)}] point {pt.id} {pt.label(short)}\n    {' '.join(axis_args)}")
        print(f"{len(points)} point(s)" + "".join(f"; {n}" for n in notes))
        return 0
    store = open_store(cfg, base, args.tracking_uri)
    if args.point:
        byid = {pt.id: pt for pt in points}
        if args.point not in byid:
            raise SystemExit(f"grid {cfg.name}: no point {args.point!r}; its points are {sorted(byid)}")
        parent = parent_run(store, cfg, args.parent)
        outcome = run_point(cfg, byid[args.point], base_path, store, parent)
        print(f"point {args.point}: {outcome}")
        return 3 if outcome.startswith("busy") else 0
    parent = parent_run(store, cfg, args.parent)
    client = store.client
    client.set_tag(parent, "grid.points", str(len(points)))
    client.set_tag(parent, "grid.axes", ",".join(short_names(points)))
    if args.emit:
        print(emit(args.emit, args.config, cfg, points, store, parent), end="")
        return 0
    if args.summary:
        report(cfg, points, store, parent, Path(args.out) if args.out else None)
        return 0
    client.log_text(parent, Path(args.config).read_text(), "grid.yaml")
    client.update_run(parent, status="RUNNING")
    gpus = visible_gpus(args.gpus)
    if all(get_key(pt.config, "trainer.accelerator") == "cpu" for pt in points):
        gpus = []  # placing CPU points by GPU memory would only hold them back
    if gpus:
        per_gpu = f"at most {args.jobs_per_gpu}" if args.jobs_per_gpu else "as many as fit in free memory"
        notes.append(f"GPU(s) {','.join(gpus)}, {per_gpu} per GPU")
    elif args.jobs_per_gpu:
        notes.append("no GPUs: --jobs-per-gpu has nothing to do")
    print(
        f"grid {cfg.name}: {len(points)} point(s), parent run {parent}, {args.jobs} at a time"
        + "".join(f"; {n}" for n in notes)
    )
    ok = False
    try:
        ok = run_grid(
            args.config, cfg, points, store, parent, jobs=args.jobs, gpus=gpus, jobs_per_gpu=args.jobs_per_gpu
        )
        report(cfg, points, store, parent, Path(args.out) if args.out else None)
    except KeyboardInterrupt:
        client.set_terminated(parent, "KILLED")
        return 130
    client.set_terminated(parent, "FINISHED" if ok else "FAILED")
    return 0 if ok else 1
