"""Task specs and the sources they read, normalised to ``{prompt, target, choices}`` examples.

Sources (``TaskSpec.source``):

* ``bigbench:<task>``: a BIG-bench JSON task, from the installed ``bigbench`` package or a
  ``bigbench_dir``. BIG-bench ships evaluation data only; the data module splits it.
* a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, read with ``datasets``;
  ``format: promptcblue`` (``input``, ``target``, ``task_type``, ``answer_choices``) and
  ``format: firefly`` (``kind``, ``input``, ``target``) are the CGC-LoRA paper's formats.
* ``hf:<dataset name>[:<config>]``: a Hugging Face Hub dataset (needs the network).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from datamodules.bigbench import read_bigbench
from datamodules.errors import DataError

Metric = Literal["accuracy", "exact_match", "f1", "rouge_l", "bleu"]
METRICS = ("accuracy", "exact_match", "f1", "rouge_l", "bleu")
FILE_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = ("auto", "columns", "bigbench", "promptcblue", "firefly")


@dataclass
class TaskSpec:
    """One task of the experiment."""

    name: str
    """Task name, used in metric names (``val/<name>/<metric>``)."""
    cluster: str
    """Task cluster: tasks of one cluster share one CGC-LoRA module set (the N of 1+N)."""
    source: str
    """``bigbench:<task>``, a local .json/.jsonl/.csv/.parquet path, or ``hf:<name>[:<config>]``."""
    format: Literal["auto", "columns", "bigbench", "promptcblue", "firefly"] = "auto"
    """Row format; ``auto`` picks ``bigbench`` for ``bigbench:`` sources, else ``columns``."""
    prompt: str = "{input}"
    """Prompt template over the row's fields, e.g. ``"Question: {question}\\nAnswer:"``."""
    target: str = "target"
    """Field holding the answer text."""
    choices: str | None = None
    """Field holding the answer choices (a list), for classification by choice likelihood."""
    metric: Metric = "accuracy"
    """``accuracy`` (choice likelihood when there are choices, else exact match of generated text),
    ``exact_match``, ``f1`` (token F1, for extraction), ``rouge_l`` or ``bleu`` (generation)."""
    weight: float | None = None
    """Sampling weight; overrides the data module's sampling rule for this task."""
    where: dict[str, str] = field(default_factory=dict)
    """Keep only rows whose fields equal these values, e.g. ``{task_type: cls}`` for a PromptCBLUE file."""
    split: str = "train"
    """Split to read from a ``hf:`` dataset."""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise DataError(f"task {self.name!r}: unknown metric {self.metric!r}; choose one of {METRICS}")
        if self.format not in FORMATS:
            raise DataError(f"task {self.name!r}: unknown format {self.format!r}; choose one of {FORMATS}")
        if self.weight is not None and self.weight <= 0:
            raise DataError(f"task {self.name!r}: weight must be positive, got {self.weight}")

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return "bigbench" if self.source.startswith("bigbench:") else "columns"


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


# ------------------------------------------------------------------------------------- local files


def is_local_file(source: str) -> bool:
    """Whether a task source names a local file (not ``bigbench:``, ``hf:`` or another scheme)."""
    return not source.startswith(("bigbench:", "hf:")) and not (
        ":" in source.split("/")[0] and not Path(source).exists()
    )


def check_file(path: str) -> str:
    """Check a local data file before anything reads it: it exists, has a known suffix and is not empty.

    Returns:
        Its ``datasets`` reader (``json``, ``csv`` or ``parquet``).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {path!r} does not exist")
    kind = FILE_SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"data file {path!r}: unsupported suffix {p.suffix!r}; use one of {sorted(FILE_SUFFIXES)}")
    size = p.stat().st_size
    if size == 0 or (size < 65536 and not p.read_bytes().strip()):  # datasets' readers end in a bare StopIteration
        raise DataError(f"data file {path!r} is empty: a task needs rows")
    return kind


def read_file(path: str) -> list[dict]:
    """Read a local .json/.jsonl/.csv/.parquet file through ``datasets``."""
    kind = check_file(path)
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # malformed JSON/CSV: name the file, keep the reader's reason
        if "corresponds to no data" in str(e):  # what datasets says of a CSV with a header and no rows
            raise DataError(f"data file {path!r} has no rows") from e
        raise DataError(f"data file {path!r} could not be read as {kind}: {type(e).__name__}: {e}") from e
    if len(ds) == 0:
        raise DataError(f"data file {path!r} has no rows")
    return ds.to_list()


def _row_place(origin: str, i: int) -> str:
    """Where row ``i`` (0-based, as read) of ``origin`` is in the file: its line, where lines can be counted."""
    path = Path(origin)
    if path.suffix == ".jsonl" and path.is_file():  # datasets skips blank lines: count the lines with text
        with path.open(encoding="utf-8", errors="replace") as f:
            lines = [n for n, line in enumerate(f, 1) if line.strip()]
        if i < len(lines):
            return f"line {lines[i]}"
    if path.suffix == ".csv":
        return f"line {i + 2}"  # after the header (a cell spanning lines would shift this)
    return f"row {i + 1}"


def read_hub(name: str, split: str) -> list[dict]:
    import datasets

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # offline, unknown name, gated: say which dataset failed
        raise DataError(f"could not load Hugging Face dataset {name!r} (split {split!r}): {e}") from e
    return ds.to_list()


# -------------------------------------------------------------------------------------- normalising


def load_task_rows(
    spec: TaskSpec, bigbench_dir: str | None = None, bigbench_cache: str = ".cache/bigbench"
) -> tuple[list[dict], str]:
    """Read one task's rows as ``{prompt, target, references, choices}``; errors name the file and the row.

    Returns:
        The examples and a description of where they came from.
    """
    fmt = spec.resolved_format
    if spec.source.startswith("bigbench:"):
        raw, path = read_bigbench(spec.source.split(":", 1)[1], bigbench_dir, bigbench_cache)
        origin = str(path)
        prompt, target, choices = spec.prompt, "target", "choices"
    elif spec.source.startswith("hf:"):
        raw, origin = read_hub(spec.source[3:], spec.split), spec.source
        prompt, target, choices = spec.prompt, spec.target, spec.choices
    elif not is_local_file(spec.source):
        raise DataError(
            f"task {spec.name!r}: unknown source {spec.source!r}; use bigbench:<task>, hf:<dataset>, "
            "or a path to a .json/.jsonl/.csv/.parquet file"
        )
    else:
        raw, origin = read_file(spec.source), spec.source
        prompt, target, choices = spec.prompt, spec.target, spec.choices
    if fmt == "promptcblue":
        prompt, target, choices = "{input}", "target", "answer_choices"
    elif fmt == "firefly":
        prompt, target, choices = "{input}", "target", None
    if fmt in ("promptcblue", "firefly") and spec.prompt != "{input}":
        prompt = spec.prompt  # a custom template over the same fields

    needed = _fields(prompt) + [target]
    rows = []
    for i, row in enumerate(raw):
        if any(str(row.get(k)) != str(v) for k, v in spec.where.items()):
            continue
        missing = [k for k in needed if k not in row or row[k] is None]
        if missing:
            raise DataError(
                f"task {spec.name!r}: {origin}, {_row_place(origin, i)}: missing or empty field(s) {missing}; "
                f"its fields with a value are {sorted(k for k, v in row.items() if v is not None)}"
            )
        ch = row.get(choices) if choices else None
        if isinstance(ch, str):  # PromptCBLUE stores choices as a list; CSV cells arrive as text
            ch = [c.strip() for c in ch.replace("，", ",").split(",") if c.strip()]
        refs = row.get("references") or [str(row[target])]
        rows.append(
            {
                "prompt": prompt.format(**row),
                "target": str(row[target]),
                "references": [str(r) for r in refs],
                "choices": [str(c) for c in ch] if ch else None,
            }
        )
    if not rows:
        where = f" matching {spec.where}" if spec.where else ""
        raise DataError(f"task {spec.name!r} has no examples{where} in {origin}")
    return rows, origin
