"""Tokenise examples and pad them into batches; every batch carries task and cluster ids.

A training example is ``prompt + target + eos`` with the prompt masked out of the labels
(``-100``), so the loss counts target tokens only. An evaluation example also keeps the prompt
alone (left-padded, for generation), its reference answers, and its answer choices tokenised
(for classification by choice likelihood).
"""

from __future__ import annotations

import torch

from cgc_lightning.loss import loss_positions

IGNORE = -100


def encode(
    tokenizer, rows: list[dict], task_id: int, max_length: int, target_prefix: str = " "
) -> tuple[list[dict], int]:
    """Tokenise one task's rows.

    The whole target is kept when it fits; the prompt is cut from the left to make room, because
    the end of a prompt (the question) matters more than its start (instructions, context).

    Returns:
        The encoded rows and how many targets had to be truncated.
    """
    eos = tokenizer.eos_token_id
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=True)["input_ids"]
    targets = tokenizer([target_prefix + r["target"] for r in rows], add_special_tokens=False)["input_ids"]
    out, truncated = [], 0
    for row, p, t in zip(rows, prompts, targets, strict=True):
        t = t + [eos]
        if len(t) > max_length - 1:  # keep at least one prompt token to condition on
            t, truncated = t[: max_length - 1], truncated + 1
        p = p[-(max_length - len(t)) :]
        choice_ids, target_index = [], -1
        if row.get("choices"):
            choice_ids = tokenizer([target_prefix + c for c in row["choices"]], add_special_tokens=False)["input_ids"]
            choice_ids = [c[: max_length - len(p)] for c in choice_ids]
            target_index = row["choices"].index(row["target"])
        out.append(
            {
                "input_ids": p + t,
                "labels": [IGNORE] * len(p) + t,
                "prompt_ids": p,
                "task_id": task_id,
                "target_index": target_index,
                "choice_ids": choice_ids,
                "references": row.get("references") or [row["target"]],
                "choices": list(row.get("choices") or []),
                "example_id": int(row.get("example_id", -1)),  # the row's place in its source file
            }
        )
    return out, truncated


def padded_width(longest: int, multiple: int = 1, cap: int | None = None) -> int:
    """The width a batch whose longest sequence has ``longest`` tokens is padded to: ``longest`` rounded up to a
    ``multiple``, but not past ``cap`` (``max_length``) where ``longest`` fits under it.

    A GPU builds kernel plans for each new sequence length (cuDNN attention takes 50 to 80 ms per new length
    in each direction on an H200), so batches of many different lengths keep paying for new plans; rounding
    bounds the lengths a run meets to ``max_length / multiple``."""
    width = -(-longest // multiple) * multiple
    return min(width, max(longest, cap)) if cap is not None else width


def _pad(seqs: list[list[int]], value: int, left: bool = False, multiple: int = 1, cap: int | None = None):
    width = padded_width(max(len(s) for s in seqs), multiple, cap)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if left:
                out[i, width - len(s) :] = torch.tensor(s)
            else:
                out[i, : len(s)] = torch.tensor(s)
    return out


class Collator:
    """Pads a list of encoded examples into a batch.

    Args:
        pad_id: the tokenizer's padding id.
        task_cluster: cluster id of each task id.
        eval_mode: also build the generation and choice-scoring tensors.
        choices: in ``eval_mode``, build the choice-scoring tensors (not needed for a batch scored by generation).
        pad_to_multiple_of: pad every sequence tensor's width up to a multiple of this (:func:`padded_width`).
        max_length: the width rounding does not go past (where the longest sequence fits under it).
    """

    def __init__(
        self,
        pad_id: int,
        task_cluster: list[int],
        eval_mode: bool = False,
        choices: bool = True,
        pad_to_multiple_of: int = 1,
        max_length: int | None = None,
    ):
        self.pad_id, self.eval_mode, self.choices = pad_id, eval_mode, choices
        self.task_cluster = torch.tensor(task_cluster, dtype=torch.long)
        self.multiple, self.cap = pad_to_multiple_of, max_length

    def _pad(self, seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        return _pad(seqs, value, left, self.multiple, self.cap)

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        task_ids = torch.tensor([r["task_id"] for r in rows], dtype=torch.long)  # (B,)
        batch = {
            "input_ids": self._pad(ids, self.pad_id),  # (B, L), right-padded
            "attention_mask": self._pad([[1] * len(s) for s in ids], 0),
            "labels": self._pad([r["labels"] for r in rows], IGNORE),
            "task_ids": task_ids,
            "cluster_ids": self.task_cluster[task_ids],
        }
        # where the loss reads the LM head (cgc_lightning.loss), found here on the host: no GPU sync for it
        batch["loss_positions"] = loss_positions(batch["labels"])
        if not self.eval_mode:
            return batch
        prompts = [r["prompt_ids"] for r in rows]
        batch["prompt_ids"] = self._pad(prompts, self.pad_id, left=True)  # (B, P), left-padded for generate()
        batch["prompt_mask"] = self._pad([[1] * len(p) for p in prompts], 0, left=True)
        batch["references"] = [list(r["references"]) for r in rows]
        batch["choices"] = [list(r.get("choices") or []) for r in rows]
        batch["example_ids"] = [int(r.get("example_id", -1)) for r in rows]
        batch["target_index"] = torch.tensor([r["target_index"] for r in rows], dtype=torch.long)
        # every (example, choice) pair as one sequence; its score is the choice tokens' log-likelihood
        pairs = [(i, p, c) for i, (p, r) in enumerate(zip(prompts, rows, strict=True)) for c in r["choice_ids"]]
        if pairs and self.choices:
            seqs = [p + c for _, p, c in pairs]
            batch["choice_input_ids"] = self._pad(seqs, self.pad_id)  # (N_pairs, L)
            batch["choice_mask"] = self._pad([[1] * len(s) for s in seqs], 0)
            batch["choice_labels"] = self._pad([[IGNORE] * len(p) + c for _, p, c in pairs], IGNORE)
            batch["choice_example"] = torch.tensor([i for i, _, _ in pairs], dtype=torch.long)  # (N_pairs,)
            # the choices alone, for scoring them on the prompt's KV cache (the prompt then runs once per example)
            # never rounded up: a few tokens each, scored after the prompt
            batch["choice_ids"] = _pad([c for _, _, c in pairs], self.pad_id)  # (N_pairs, C), right-padded
            batch["choice_ids_mask"] = _pad([[1] * len(c) for _, _, c in pairs], 0)
        return batch


# ---------------------------------------------------------------------------------------------- evaluation


def eval_kind(row: dict, task_metrics: list[str]) -> str:
    """How an evaluation example is scored: ``"choice"`` (likeliest answer choice) or ``"text"`` (generation)."""
    return "choice" if task_metrics[row["task_id"]] == "accuracy" and row["choice_ids"] else "text"


def eval_batches(
    rows: list[dict],
    task_metrics: list[str],
    batch_size: int,
    by_length: bool = True,
    generate_batch_size: int | None = None,
) -> list[dict]:
    """Evaluation batches of ``rows`` (of any tasks), each of one kind: ``[{"kind": ..., "rows": [...]}, ...]``.

    Choice-scored batches hold ``batch_size`` rows, generated ones ``generate_batch_size`` (default:
    ``batch_size``): generation runs one forward per new token per batch, so fewer, larger batches of it pay
    off where a choice batch's one forward does not. The last batch of each kind may be smaller.

    Choice-scored examples come first, then generated ones. With ``by_length`` each kind is ordered so that a
    batch's rows cost about the same, whatever their tasks: choice rows longest first (prompt plus longest
    choice), generated rows by answer length, then prompt length, longest first, since a batch generates until
    its last row has ended its line (the reference answer's length only orders the rows: each row's prediction
    is the same in any batch). The longest batch comes first, so one that does not fit in memory fails at
    once. Without ``by_length`` the rows keep their order.
    """
    sizes = {"choice": batch_size, "text": batch_size if generate_batch_size is None else generate_batch_size}
    batches = []
    for kind, size in sizes.items():
        part = [r for r in rows if eval_kind(r, task_metrics) == kind]
        if by_length and kind == "choice":  # a choice is scored after its prompt: the longest choice counts too
            part.sort(key=lambda r: -len(r["prompt_ids"]) - max(map(len, r["choice_ids"])))
        elif by_length:
            part.sort(key=lambda r: (len(r["prompt_ids"]) - len(r["input_ids"]), -len(r["prompt_ids"])))
        batches += [{"kind": kind, "rows": part[i : i + size]} for i in range(0, len(part), size)]
    return batches


def group_rows(batch: dict) -> dict[int, list[int]]:
    """``batch["task_rows"]`` (``{task id: [row, ...]}``), built from ``task_ids`` (one host sync) and stored, with
    ``task_index``, when the batch did not come from :class:`EvalCollator` (a loader of one's own)."""
    if "task_rows" not in batch:
        ids = batch["task_ids"]
        rows: dict[int, list[int]] = {}
        for i, t in enumerate(ids.tolist()):
            rows.setdefault(t, []).append(i)
        batch["task_rows"] = rows
        batch["task_index"] = {t: torch.tensor(r, dtype=torch.long, device=ids.device) for t, r in rows.items()}
    return batch["task_rows"]


class EvalCollator:
    """Pads one item of :func:`eval_batches` into a batch (:class:`Collator` in eval mode) that also carries its
    ``kind``, ``task_rows``: ``{task id: [row, ...]}`` (host lists) and ``task_index``: the same as tensors, which
    travel to the device with the batch, so a task's rows are picked there without a copy or a sync."""

    def __init__(self, pad_id: int, task_cluster: list[int]):
        self.with_choices = Collator(pad_id, task_cluster, eval_mode=True)
        self.without = Collator(pad_id, task_cluster, eval_mode=True, choices=False)

    def __call__(self, item: dict) -> dict:
        rows = item["rows"]
        batch = (self.with_choices if item["kind"] == "choice" else self.without)(rows)
        batch["kind"] = item["kind"]
        task_rows: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            task_rows.setdefault(r["task_id"], []).append(i)
        batch["task_rows"] = task_rows
        batch["task_index"] = {t: torch.tensor(rows, dtype=torch.long) for t, rows in task_rows.items()}
        return batch


# ------------------------------------------------------------------------------------------------- packing


def first_fit(lengths: list[int], rows: int, max_length: int) -> list[int] | None:
    """The row of each item when ``lengths`` are placed in order, each into the first of ``rows`` rows of
    ``max_length`` tokens with room for it; ``None`` when one does not fit anywhere."""
    free, place = [max_length] * rows, []
    for n in lengths:
        row = next((k for k, f in enumerate(free) if f >= n), None)
        if row is None:
            return None
        free[row] -= n
        place.append(row)
    return place


class PackingCollator:
    """Packs a batch's examples (of any tasks) into at most ``rows`` rows of ``max_length`` tokens.

    The examples go into rows in order, each into the first row with room (:func:`first_fit`, as
    :class:`~datamodules.sampling.PackedBatchSampler` chose them). Each row is its examples end to end,
    padded at the end to the longest row (rounded up to ``pad_to_multiple_of``, not past ``max_length``). The
    batch carries, instead of an attention mask:

    * ``position_ids (R, L)``, restarting at 0 with each example: Hugging Face models then attend within each
      example only (a block-diagonal causal mask for eager and SDPA attention, varlen kernels for flash
      attention), so an example sees exactly what it would see alone;
    * ``task_ids`` and ``cluster_ids (R, L)``, one per token, which route each token to its own task's experts
      and assign each token's loss to its task.

    The first token of every example is a prompt token (the encoder keeps at least one), so no loss is taken
    across an example boundary.
    """

    def __init__(self, pad_id: int, task_cluster: list[int], max_length: int, rows: int, pad_to_multiple_of: int = 1):
        self.pad_id, self.max_length, self.rows, self.multiple = pad_id, max_length, rows, pad_to_multiple_of
        self.task_cluster = torch.tensor(task_cluster, dtype=torch.long)
        # one padded row per example (diagnostic probes)
        self.unpacked = Collator(pad_id, task_cluster, pad_to_multiple_of=pad_to_multiple_of, max_length=max_length)

    def __call__(self, examples: list[dict]) -> dict:
        place = first_fit([len(e["input_ids"]) for e in examples], self.rows, self.max_length)
        if place is None:
            raise ValueError(f"{len(examples)} examples do not fit into {self.rows} rows of {self.max_length} tokens")
        used = max(place) + 1
        parts: list[dict[str, list[int]]] = [{"ids": [], "labels": [], "pos": [], "task": []} for _ in range(used)]
        for e, row in zip(examples, place, strict=True):
            n, p = len(e["input_ids"]), parts[row]
            p["ids"] += e["input_ids"]
            p["labels"] += e["labels"]
            p["pos"] += list(range(n))
            p["task"] += [e["task_id"]] * n
        width = padded_width(max(len(p["ids"]) for p in parts), self.multiple, self.max_length)
        for p in parts:  # the tail: padding as one more segment (its own positions), no loss, the last task's experts
            k = width - len(p["ids"])
            p["ids"] += [self.pad_id] * k
            p["labels"] += [IGNORE] * k
            p["pos"] += list(range(k))
            p["task"] += [p["task"][-1]] * k
        task_ids = torch.tensor([p["task"] for p in parts], dtype=torch.long)  # (R, L)
        batch = {
            "input_ids": torch.tensor([p["ids"] for p in parts], dtype=torch.long),
            "attention_mask": None,
            "position_ids": torch.tensor([p["pos"] for p in parts], dtype=torch.long),
            "labels": torch.tensor([p["labels"] for p in parts], dtype=torch.long),
            "task_ids": task_ids,
            "cluster_ids": self.task_cluster[task_ids],
            "n_examples": len(examples),
            "n_tokens": sum(len(e["input_ids"]) for e in examples),  # without the padding at the rows' ends
        }
        batch["loss_positions"] = loss_positions(batch["labels"])
        return batch
