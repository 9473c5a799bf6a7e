"""Bad inputs are refused cleanly: one fault each in the config, the data, the model or a checkpoint of the tiny
experiment, run through the real CLI (``python -m cgc_lightning``) in a fresh working directory.

Every case checks that the CLI
* exits with a non-zero code, without a Python traceback;
* says what is wrong, naming the key, the value or the file (the words in ``expected``);
* wrote nothing: no MLflow run in ``mlruns/`` and no checkpoint under ``outputs/``.

The time each case took to fail is printed and collected into a table at the end of the module (not asserted:
it shows which faults are caught while parsing and which only after the model or the data loaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # one CLI process per case, 7-15 s each on a CPU

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"
QA = 1  # index of the task read from a local file (tests/fixtures/data/qa.jsonl) in tiny.yaml's data.tasks

#: Sets up one fault in a working directory and returns the CLI's arguments (after ``python -m cgc_lightning``).
Fault = Callable[[Path], list[str]]

#: ``(case, exit code, seconds to fail)`` of every case run, for the table printed at the end of the module.
TIMINGS: list[tuple[str, int, float]] = []


# ------------------------------------------------------------------------------------------------ the faults


def overrides(*args: str, subcommand: str = "fit") -> Fault:
    """The tiny config as it is, with these command-line overrides."""
    return lambda work: [subcommand, "--config", "experiments/tiny.yaml", *args]


def edited(changes: dict[str, object], *args: str) -> Fault:
    """A copy of the tiny config (``bad.yaml``) with ``{"dotted.key": value}`` changes; list items by index."""

    def fault(work: Path) -> list[str]:
        cfg = yaml.safe_load(TINY.read_text())
        for key, value in changes.items():
            *parents, last = key.split(".")
            node = cfg
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        (work / "bad.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        return ["fit", "--config", "bad.yaml", *args]

    return fault


def raw_config(text: str) -> Fault:
    """The tiny config with ``text`` appended to its YAML source, unparsed (``bad.yaml``)."""

    def fault(work: Path) -> list[str]:
        (work / "bad.yaml").write_text(TINY.read_text() + text)
        return ["fit", "--config", "bad.yaml"]

    return fault


def qa_file(name: str, content: str, **task: object) -> Fault:
    """The ``qa`` task reads ``data/<name>`` holding ``content`` (and takes these task fields)."""

    def fault(work: Path) -> list[str]:
        (work / "data").mkdir()
        (work / "data" / name).write_text(content)
        changes = {f"data.tasks.{QA}.source": f"data/{name}"}
        changes |= {f"data.tasks.{QA}.{k}": v for k, v in task.items()}
        return edited(changes)(work)

    return fault


def qa_rows(n: int = 12) -> str:
    return "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(n))


def gguf_file(content: bytes) -> Fault:
    """A local folder holding ``tiny.gguf`` with these bytes, as ``model.model``."""

    def fault(work: Path) -> list[str]:
        (work / "gguf").mkdir()
        (work / "gguf" / "tiny.gguf").write_bytes(content)
        return overrides("--model.model.name_or_path=./gguf", "--model.model.gguf_file=tiny.gguf")(work)

    return fault


GGUF_V3 = b"GGUF" + (3).to_bytes(4, "little")
#: magic, version 3, one tensor, one metadata entry whose 20-byte key stops after 8 bytes: a cut download
GGUF_CUT = GGUF_V3 + (1).to_bytes(8, "little") * 2 + (20).to_bytes(8, "little") + b"general."


def truncated_safetensors(work: Path) -> list[str]:
    """A local model folder (the fixture's config and tokenizer) whose model.safetensors was cut short."""
    folder = work / "model"
    folder.mkdir()
    for f in (ROOT / "tests" / "fixtures" / "tiny-llama").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tensor = {"dtype": "F32", "shape": [400, 32], "data_offsets": [0, 400 * 32 * 4]}
    header = json.dumps({"model.embed_tokens.weight": tensor}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(1000))
    return overrides("--model.model.name_or_path=./model", "--model.model.random_init=false")(work)


def garbage_checkpoint(work: Path) -> list[str]:
    """256 bytes that are not a zip archive nor a pickle, as ``validate --ckpt_path``."""
    (work / "bad.ckpt").write_bytes(bytes(range(256)))
    return overrides("--ckpt_path=bad.ckpt", subcommand="validate")(work)


# ------------------------------------------------------------------------------------------------- the cases


CASES = [
    # ---- model.adapter: AdapterConfig.__post_init__, inject_adapters
    pytest.param(
        overrides("--model.adapter.r=0"), ["model.adapter: r must be a positive integer, got r=0"], id="adapter-r-0"
    ),
    pytest.param(
        overrides("--model.adapter.num_shared=0", "--model.adapter.num_specific=0"),
        ["model.adapter: cgc_lora needs", "num_shared=0, num_specific=0"],
        id="adapter-no-experts",
    ),
    pytest.param(
        overrides("--model.adapter.method=lora2"),
        ["model.adapter: unknown method 'lora2'; choose one of ('cgc_lora', "],
        id="adapter-method-unknown",
    ),
    pytest.param(
        overrides("--model.adapter.dropout=-0.1"),
        ["model.adapter: dropout must be in [0, 1), got -0.1"],
        id="adapter-dropout-negative",
    ),
    pytest.param(
        overrides("--model.adapter.dropout=1.0"),
        ["model.adapter: dropout must be in [0, 1), got 1.0"],
        id="adapter-dropout-1",
    ),
    pytest.param(
        overrides("--model.adapter.alpha=0"),
        ["model.adapter: alpha must be positive, got alpha=0.0"],
        id="adapter-alpha-0",
    ),
    pytest.param(
        overrides("--model.adapter.target_modules=[no_such_proj]"),
        ["no module matched target_modules ['no_such_proj']", "q_proj"],
        id="adapter-target-modules-match-nothing",
    ),
    pytest.param(
        overrides("--model.adapter.target_modules=[re:.*mlp]"),
        ["target_modules matched layers that are not nn.Linear", "model.layers.0.mlp (LlamaMLP)"],
        id="adapter-target-modules-not-linear",
    ),
    pytest.param(
        overrides("--model.adapter.method=moelora", "--model.adapter.split_rank=true", "--model.adapter.r=5"),
        ["model.adapter: split_rank needs r divisible by num_experts, got r=5, num_experts=8"],
        id="adapter-split-rank-indivisible",
    ),
    pytest.param(
        overrides("--model.adapter.stage=universal"),
        ["model.adapter: stage 'universal' is a MoDULA setting; method 'cgc_lora'"],
        id="adapter-stage-without-modula",
    ),
    pytest.param(
        overrides("--model.adapter.init_adapter=./no/adapter"),
        ["error: init_adapter ./no/adapter does not exist"],
        id="adapter-init-adapter-missing",
    ),
    # ---- callbacks
    pytest.param(
        overrides("--resume_checkpoint.min_interval_s=-5"),
        ["resume_checkpoint.min_interval_s must be >= 0 seconds, got -5"],
        id="resume-interval-negative",
    ),
    # ---- optimizer and loss: MultiTaskLoRAModule.__init__
    pytest.param(overrides("--model.lr=-0.001"), ["model: lr must be positive, got lr=-0.001"], id="lr-negative"),
    pytest.param(overrides("--model.lr=0"), ["model: lr must be positive, got lr=0.0"], id="lr-0"),
    pytest.param(
        overrides("--model.weight_decay=-0.1"),
        ["model: weight_decay must be >= 0, got weight_decay=-0.1"],
        id="weight-decay-negative",
    ),
    pytest.param(
        overrides("--model.betas=[0.9,1.5]"),
        ["model: betas must be two numbers in [0, 1), got betas=[0.9, 1.5]"],
        id="betas-above-1",
    ),
    pytest.param(
        overrides("--model.warmup_ratio=1.5"),
        ["model: warmup_ratio must be in [0, 1), got warmup_ratio=1.5"],
        id="warmup-ratio-above-1",
    ),
    pytest.param(
        overrides("--model.loss_chunk_size=0"),
        ["model.loss_chunk_size must be a positive number", "got 0"],
        id="loss-chunk-size-0",
    ),
    pytest.param(
        overrides("--model.loss_chunk_size=-4"),
        ["model.loss_chunk_size must be a positive number", "got -4"],
        id="loss-chunk-size-negative",
    ),
    pytest.param(
        overrides("--model.schedule=exp"), ['Parser key "model.schedule"', "Got value: exp"], id="schedule-unknown"
    ),
    pytest.param(
        overrides("--model.compile={foo: 1}"),
        ["model.compile: unknown torch.compile argument(s) ['foo']"],
        id="compile-unknown-argument",
    ),
    # ---- data files: check_file at instantiation, load_task_rows in prepare_data
    pytest.param(
        edited({f"data.tasks.{QA}.source": "data/nope.jsonl"}),
        ["data file 'data/nope.jsonl' does not exist"],
        id="data-file-missing",
    ),
    pytest.param(
        qa_file("qa.txt", qa_rows()),
        ["data file 'data/qa.txt': unsupported suffix '.txt'"],
        id="data-file-suffix-unknown",
    ),
    pytest.param(qa_file("qa.jsonl", ""), ["data file 'data/qa.jsonl' is empty"], id="jsonl-empty"),
    pytest.param(qa_file("qa.jsonl", "\n\n   \n\n"), ["data file 'data/qa.jsonl' is empty"], id="jsonl-blank-lines"),
    pytest.param(
        qa_file("qa.csv", "question,answer\n"),
        ["data file 'data/qa.csv' has no rows"],
        id="csv-header-only",
    ),
    pytest.param(
        qa_file("qa.jsonl", qa_rows(6) + '{"question": "What is 7 + 1?", "answer": \n' + qa_rows(5)),
        ["data file 'data/qa.jsonl' could not be read as json"],
        id="jsonl-broken-line",
    ),
    pytest.param(
        qa_file("qa.jsonl", qa_rows(6) + json.dumps({"question": "What is 7 + 1?"}) + "\n" + qa_rows(5)),
        ["task 'qa'", "data/qa.jsonl, line 7", "missing or empty field(s) ['answer']"],
        id="jsonl-row-without-target",
    ),
    pytest.param(
        qa_file("qa.jsonl", qa_rows(2)),
        ["task 'qa' has 2 examples: too few for a train/val/test split"],
        id="jsonl-too-few-rows",
    ),
    pytest.param(
        edited({f"data.tasks.{QA}.source": "s3://bucket/qa.jsonl"}),
        ["task 'qa': unknown source 's3://bucket/qa.jsonl'"],
        id="source-scheme-unknown",
    ),
    pytest.param(
        edited({"data.tasks.0.source": "bigbench:no_such_task"}),
        ["no BIG-bench task 'no_such_task'", "tests/fixtures/data/bigbench/no_such_task/task.json"],
        id="bigbench-task-missing",
    ),
    # ---- data config: TaskSpec and MultiTaskDataModule.__init__
    pytest.param(
        edited({f"data.tasks.{QA}.metric": "accuracy_top5"}),
        ['Parser key "data.tasks"', "metric", "Got value: accuracy_top5"],
        id="task-metric-unknown",
    ),
    pytest.param(
        edited({f"data.tasks.{QA}.promt": "{question}"}),
        ['Parser key "data.tasks"', "'promt' is not accepted"],
        id="task-key-misspelt",
    ),
    pytest.param(
        edited({f"data.tasks.{QA}.weight": 0}),
        ["data.tasks: task 'qa': weight must be positive, got 0.0"],
        id="task-weight-0",
    ),
    pytest.param(
        edited({"data.tasks.2.cluster": "math"}),
        ["data: task(s) ['count'] are in no declared cluster; data.clusters is ['judge', 'count']"],
        id="task-cluster-undeclared",
    ),
    pytest.param(
        edited({"data.clusters": ["judge", "count", "extra"]}),
        ["data: cluster(s) ['extra'] have no tasks"],
        id="cluster-without-tasks",
    ),
    pytest.param(edited({"data.tasks.2.name": "qa"}), ["data: task 'qa' is listed 2 times"], id="task-name-repeated"),
    pytest.param(edited({"data.tasks": []}), ["data.tasks is empty"], id="tasks-empty"),
    pytest.param(
        overrides("--data.batch_size=0"),
        ["data.batch_size must be >= 1, got 0"],
        id="batch-size-0",
    ),
    pytest.param(
        overrides("--data.generate_batch_size=0"),
        ["data.generate_batch_size must be >= 1, got 0"],
        id="generate-batch-size-0",
    ),
    pytest.param(
        overrides("--data.max_length=2"),
        ["data.max_length=2 truncates every target"],
        id="max-length-2",
    ),
    pytest.param(
        overrides("--data.sampling=zipf"), ['Parser key "data.sampling"', "Got value: zipf"], id="sampling-unknown"
    ),
    pytest.param(
        overrides("--data.sampling=temperature", "--data.temperature=0"),
        ["temperature must be positive, got 0.0"],
        id="temperature-0",
    ),
    pytest.param(
        overrides("--data.val_fraction=0"),
        ["data: val_fraction and test_fraction must be in (0, 1)", "got 0.0 and 0.1"],
        id="val-fraction-0",
    ),
    # ---- the model: hf.resolve_location, _convert_gguf, check_safetensors
    pytest.param(
        overrides("--model.model.name_or_path=./models/missing"),
        ["model path './models/missing' does not exist"],
        id="model-path-missing",
    ),
    pytest.param(
        overrides("--model.model.name_or_path=tests/fixtures/tiny-lama"),
        ["could not load model 'tests/fixtures/tiny-lama'", "It is not a local folder"],
        id="model-path-misspelt",
    ),
    pytest.param(
        overrides("--model.model.gguf_file=nope.gguf"),
        ["GGUF file 'nope.gguf' not found in tests/fixtures/tiny-llama"],
        id="gguf-file-missing",
    ),
    pytest.param(
        gguf_file(GGUF_V3 + bytes(24)),
        ["gguf/tiny.gguf (32 bytes) could not be read", "truncated or corrupt"],
        id="gguf-no-metadata",
    ),
    pytest.param(
        gguf_file(GGUF_CUT),
        ["gguf/tiny.gguf", "truncated or corrupt"],
        id="gguf-cut-in-its-header",
    ),
    pytest.param(
        truncated_safetensors,
        ["model/model.safetensors is truncated or corrupt", "its tensors need 51,303 bytes, the file has 1,103"],
        id="safetensors-truncated",
    ),
    # ---- the config file
    pytest.param(
        raw_config("trainer: [unclosed\n"),
        ["bad.yaml, line 41, column 1: expected ',' or ']'", "flow sequence that starts at line 40, column 10"],
        id="yaml-syntax-error",
    ),
    pytest.param(
        raw_config("optimiser: {lr: 0.1}\n"), ["does not accept option 'optimiser.lr'"], id="top-level-key-unknown"
    ),
    pytest.param(
        lambda work: ["fit", "--config", "experiments/nope.yaml"],
        ['Parser key "config": File does not exist', "experiments/nope.yaml"],
        id="config-file-missing",
    ),
    # ---- checkpoints
    pytest.param(
        overrides("--ckpt_path=last"),
        ["--ckpt_path last: no last.ckpt of experiment 'tiny'"],
        id="fit-ckpt-last-without-a-run",
    ),
    pytest.param(
        overrides("--ckpt_path=outputs/missing.ckpt", subcommand="validate"),
        ["ckpt_path: outputs/missing.ckpt does not exist"],
        id="validate-ckpt-missing",
    ),
    pytest.param(
        garbage_checkpoint,
        ["bad.ckpt"],
        id="validate-ckpt-not-a-checkpoint",
    ),
    # ---- the trainer and callbacks
    pytest.param(
        overrides("--trainer.max_steps=-5"),
        ["max_steps", "-5"],
        id="max-steps-negative",
    ),
    pytest.param(
        overrides("--trainer.val_check_interval=0"),
        ["val_check_interval", "0"],
        id="val-check-interval-0",
    ),
    pytest.param(
        overrides("--checkpoint.monitor=val/nosuch/accuracy"),
        ["ModelCheckpoint monitors 'val/nosuch/accuracy', but task 'nosuch' is not in the data"],
        id="checkpoint-monitor-unknown-task",
    ),
]


# ------------------------------------------------------------------------------------------------ the checks


def run_cli(work: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m cgc_lightning <args>`` in ``work``, without MLflow settings; the process and its seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    return proc, time.perf_counter() - start


def mlflow_runs(work: Path) -> list:
    """Every MLflow run in the working directory's default store (none when the store was never created)."""
    db = work / "mlruns" / "mlflow.db"
    if not db.exists():
        return []
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


@pytest.fixture(scope="module")
def timings(request):
    """Collects each case's time to fail; prints them as one table when the module is done (past output capture)."""
    yield TIMINGS
    if not TIMINGS:
        return
    width = max(len(case) for case, _, _ in TIMINGS)
    lines = ["", "bad inputs: time to fail", f"{'case':<{width}}  exit  seconds"]
    lines += [f"{case:<{width}}  {code:>4}  {seconds:>7.1f}" for case, code, seconds in TIMINGS]
    lines.append(f"{f'total ({len(TIMINGS)} cases)':<{width}}        {sum(s for _, _, s in TIMINGS):>7.1f}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print("\n".join(lines))
    else:
        with capture.global_and_fixture_disabled():
            print("\n".join(lines))


@pytest.mark.parametrize("fault, expected", CASES)
def test_a_bad_input_is_refused_naming_it_and_nothing_is_written(tmp_path, request, timings, fault, expected):
    """A non-zero exit without a traceback, a message with the ``expected`` words, no MLflow run, no checkpoint."""
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    proc, seconds = run_cli(tmp_path, fault(tmp_path))
    case = request.node.callspec.id
    timings.append((case, proc.returncode, seconds))
    print(f"{case}: exit {proc.returncode} after {seconds:.1f} s")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "Traceback (most recent call last)" not in output, output[-3000:]
    missing = [words for words in expected if words not in output]
    assert not missing, f"{missing} not in:\n{output[-3000:]}"
    runs = mlflow_runs(tmp_path)
    assert not runs, f"no MLflow run, found {[(r.info.run_name, r.info.status) for r in runs]}"
    assert not list(tmp_path.glob("outputs/**/*.ckpt")), "no checkpoint"
