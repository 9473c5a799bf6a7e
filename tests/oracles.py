"""Reference computations the tests hold the fused adapter paths against; the package never calls them.

A per-task gate (MOELoRA's, CGC-LoRA's with ``gate_input: task``) is one softmax per task. The production
forward runs it inside :class:`~cgc_lightning.adapters.experts.GatedMixture`, where a sample's weights are
``spread @ softmax(logits)``. The reference here is the plain form of the same function: every task's gate
written out over all ``E`` experts as a table ``(n_tasks, E)`` (0 for the experts a task does not see), of
which :class:`~cgc_lightning.adapters.experts.DenseMixture` gives sample ``b`` row ``t(b)``.
"""

from __future__ import annotations

import torch

from cgc_lightning.adapters import CGCLoRA, MoELoRA
from cgc_lightning.adapters.experts import DenseMixture, apply_mixture, require_task_ids


def dense_task_table(adapter: MoELoRA | CGCLoRA, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every task's gate weights over all ``E`` experts, and the row of each sample.

    Args:
        adapter: a MOELoRA layer, or a CGC-LoRA layer with ``gate_input='task'``.
        task_ids: ``(B,)``.

    Returns:
        ``(table (n_tasks, E), rows (B,))``: sample ``b`` mixes the experts with ``table[rows[b]]``.
    """
    if isinstance(adapter, MoELoRA):
        return adapter.gate.table(), require_task_ids(task_ids, "moelora")  # (n_tasks, E)
    if isinstance(adapter, CGCLoRA) and adapter.gate_input == "task":
        task_ids = require_task_ids(task_ids, "cgc_lora")
        # The logits of the experts a task does not see are -inf, so the softmax gives them exactly 0
        # and the others softmax(G_t).
        G = adapter.task_gate.gate_logits  # (n_tasks, S+P)
        logits = G.new_full((G.shape[0], adapter.experts.num_experts), float("-inf")).scatter(1, adapter.visible, G)
        return torch.softmax(logits, dim=-1), task_ids  # (n_tasks, E), (B,)
    raise TypeError(f"{type(adapter).__name__} has no per-task gate table")


def dense_task_table_forward(
    adapter: MoELoRA | CGCLoRA, x: torch.Tensor, task_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The layer's update through :func:`dense_task_table` and ``DenseMixture``: ``(B, T, d_in) -> (B, T, d_out)``."""
    table, rows = dense_task_table(adapter, task_ids)
    A, B = adapter.experts.lora_A, adapter.experts.lora_B  # (E, r, d_in), (E, r, d_out)
    return apply_mixture(DenseMixture, adapter.dropout(x), A, B, table, rows, out, adapter.scaling)
