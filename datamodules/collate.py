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


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
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
    """

    def __init__(self, pad_id: int, task_cluster: list[int], eval_mode: bool = False):
        self.pad_id, self.eval_mode = pad_id, eval_mode
        self.task_cluster = torch.tensor(task_cluster, dtype=torch.long)

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        task_ids = torch.tensor([r["task_id"] for r in rows], dtype=torch.long)  # (B,)
        batch = {
            "input_ids": _pad(ids, self.pad_id),  # (B, L), right-padded
            "attention_mask": _pad([[1] * len(s) for s in ids], 0),
            "labels": _pad([r["labels"] for r in rows], IGNORE),
            "task_ids": task_ids,
            "cluster_ids": self.task_cluster[task_ids],
        }
        # where the loss reads the LM head (cgc_lightning.loss), found here on the host: no GPU sync for it
        batch["loss_positions"] = loss_positions(batch["labels"])
        if not self.eval_mode:
            return batch
        prompts = [r["prompt_ids"] for r in rows]
        batch["prompt_ids"] = _pad(prompts, self.pad_id, left=True)  # (B, P), left-padded for generate()
        batch["prompt_mask"] = _pad([[1] * len(p) for p in prompts], 0, left=True)
        batch["references"] = [list(r["references"]) for r in rows]
        batch["choices"] = [list(r.get("choices") or []) for r in rows]
        batch["example_ids"] = [int(r.get("example_id", -1)) for r in rows]
        batch["target_index"] = torch.tensor([r["target_index"] for r in rows], dtype=torch.long)
        # every (example, choice) pair as one sequence; its score is the choice tokens' log-likelihood
        pairs = [(i, p, c) for i, (p, r) in enumerate(zip(prompts, rows, strict=True)) for c in r["choice_ids"]]
        if pairs:
            seqs = [p + c for _, p, c in pairs]
            batch["choice_input_ids"] = _pad(seqs, self.pad_id)  # (N_pairs, L)
            batch["choice_mask"] = _pad([[1] * len(s) for s in seqs], 0)
            batch["choice_labels"] = _pad([[IGNORE] * len(p) + c for _, p, c in pairs], IGNORE)
            batch["choice_example"] = torch.tensor([i for i, _, _ in pairs], dtype=torch.long)  # (N_pairs,)
            # the choices alone, for scoring them on the prompt's KV cache (the prompt then runs once per example)
            batch["choice_ids"] = _pad([c for _, _, c in pairs], self.pad_id)  # (N_pairs, C), right-padded
            batch["choice_ids_mask"] = _pad([[1] * len(c) for _, _, c in pairs], 0)
        return batch
