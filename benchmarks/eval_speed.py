r"""Evaluation time: one ``validate``/``test`` pass over every task, batches mixing tasks against one loader per task.

Builds the model and data as ``python -m cgc_lightning fit --config <config>`` does (``--set`` dotted
overrides as on that command line), then times the evaluation loop of the chosen split twice, side by side
in one process after an untimed warm-up pass:

* ``mixed``: ``data.eval_mix_tasks: true`` (the default), one loader whose batches hold rows of any tasks,
  grouped by how they are scored (answer choices, or generation) and by length;
* ``per_task``: one loader per task, the tasks one after another (``data.eval_mix_tasks: false``).

Generated rows come in batches of ``data.generate_batch_size`` (default: ``data.eval_batch_size``),
choice-scored ones in batches of ``data.eval_batch_size``; the header prints both. Both passes stop generating
once every row of a batch has ended its first line (or reached EOS, or ``model.max_new_tokens``). Each pass is
CUDA-synchronised at its start and end; the time of each kind of batch is summed from synchronised batch
boundaries. The per-task scores of the two passes are printed side by side: they must agree (only the
batches' make-up differs).

    python -m benchmarks.eval_speed --config experiments/studies/bigbench13.yaml --split test \
        --set data.test_fraction=0.45 --set data.max_test_examples=150 --set model.max_new_tokens=40 \
        --set data.generate_batch_size=256                                                              # GPU
    python -m benchmarks.eval_speed --config experiments/studies/bigbench13.yaml --split test \
        --tasks sports_understanding,anachronisms,causal_judgment,date_understanding,navigate,temporal_sequences,\
colored_objects,object_counting,word_unscrambling,auto_categorization,tense ...             # issue 15's 7 + 4 mix
    python -m benchmarks.eval_speed --config experiments/tiny.yaml                                      # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

from benchmarks.fit_loop import build_cli


class KindTimer(Callback):
    """Seconds and examples per kind of evaluation batch (choice, text), from synchronised batch boundaries."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = defaultdict(float)
        self.examples: dict[str, int] = defaultdict(int)
        self._start = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _batch_start(self, *args, **kwargs) -> None:
        self._start = self._now()

    def _batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs) -> None:
        self.seconds[batch["kind"]] += self._now() - self._start
        self.examples[batch["kind"]] += len(batch["references"])

    on_validation_batch_start = on_test_batch_start = _batch_start
    on_validation_batch_end = on_test_batch_end = _batch_end


def task_subset(config: str, names: str) -> list[str]:
    """``--data.tasks`` and ``--data.clusters`` overrides that keep only the config's tasks named in ``names``
    (comma-separated), in the config's order, and the clusters they are in."""
    tasks = ((yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}).get("tasks") or []
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {t.get("name") for t in tasks})
    if unknown:
        raise SystemExit(
            f"--tasks: {', '.join(unknown)} not among {config}'s data.tasks "
            f"({', '.join(str(t.get('name')) for t in tasks)})"
        )
    kept = [t for t in tasks if t.get("name") in wanted]
    clusters = list(dict.fromkeys(t["cluster"] for t in kept if t.get("cluster")))
    return [f"--data.tasks={json.dumps(kept)}", *([f"--data.clusters={json.dumps(clusters)}"] if clusters else [])]


def build(args, store: Path):
    subset = task_subset(args.config, args.tasks) if args.tasks else []
    return build_cli(args.config, [*subset, *(f"--{kv}" for kv in args.set)], store, "eval-benchmark")


def one_pass(cli, split: str, mix: bool, cuda: bool) -> dict:
    cli.datamodule.eval_mix_tasks = mix
    timer = KindTimer(cuda)
    cli.trainer.callbacks.append(timer)
    try:
        start = timer._now()
        run = cli.trainer.validate if split == "val" else cli.trainer.test
        run(cli.model, datamodule=cli.datamodule, verbose=False)
        seconds = timer._now() - start
    finally:
        cli.trainer.callbacks.remove(timer)
    scores = {task: float(value) for task, _, value, _ in cli.model.results[split]}
    # rows of the CLI's results table: (task, metric, value, loss)
    return {"seconds": seconds, "kinds": dict(timer.seconds), "examples": dict(timer.examples), "scores": scores}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment config, as for `fit --config`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--split", choices=["val", "test"], default="val", help="which split to evaluate")
    p.add_argument("--tasks", default="", metavar="NAME,...", help="only these of the config's tasks (default: all)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        cli = build(args, Path(tmp))
        cli.datamodule.setup(args.split if args.split == "test" else "validate")
        counts = cli.datamodule.example_counts()
        one_pass(cli, args.split, True, cuda)  # warm-up: CUDA context, kernels, the line-end table
        result = {"mixed": one_pass(cli, args.split, True, cuda), "per_task": one_pass(cli, args.split, False, cuda)}
    device = torch.cuda.get_device_name() if cuda else "cpu"
    dm = cli.datamodule
    metrics = dm.task_metrics
    n_choice = sum(m == "accuracy" for m in metrics)
    total = sum(c[args.split] for c in counts.values())
    generate = dm.eval_batch_size if dm.generate_batch_size is None else dm.generate_batch_size
    print(
        f"evaluation of {args.split}: {args.config} {' '.join(args.set)}; {len(metrics)} tasks ({n_choice} scored "
        f"by answer choice, {len(metrics) - n_choice} by generation), {total} examples, "
        f"eval_batch_size={dm.eval_batch_size}, generate_batch_size={generate}, "
        f"max_new_tokens={cli.model.max_new_tokens}, precision={cli.trainer.precision}, device={device}"
    )
    print(f"{'batches':<9} {'seconds':>8} {'examples/s':>11} {'choice s':>9} {'generation s':>13} {'x mixed':>8}")
    for name, r in result.items():
        print(
            f"{name:<9} {r['seconds']:>8.2f} {total / r['seconds']:>11,.0f} {r['kinds'].get('choice', 0):>9.2f} "
            f"{r['kinds'].get('text', 0):>13.2f} {r['seconds'] / result['mixed']['seconds']:>8.2f}"
        )
    print("per-task scores (mixed | per-task), and examples:")
    for task, score in result["mixed"]["scores"].items():
        print(f"  {task:<28} {score:.4f} | {result['per_task']['scores'][task]:.4f}   {counts[task][args.split]}")
    return result


if __name__ == "__main__":
    main()
