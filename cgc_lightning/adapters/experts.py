r"""Stacked LoRA experts: the one product every method in this package is built from.

    delta(x_b) = s * sum_{k < K} w_{b,k} B_{e(b,k)} A_{e(b,k)} x_b

A method decides, for each sample ``b``, which ``K`` of its ``E`` experts the sample sees
(``e(b, k)``) and with what weight (``w_{b,k}``, per sample or per token). Experts are stacked:

    lora_A: (E, r, d_in)     A_e, as in LoRA
    lora_B: (E, r, d_out)    B_e stored transposed, so concat_e B_e^T is a view, not a copy

and the mixture is two batched matrix products whatever E, K, or the mix of tasks in the batch:

    x (B, T, d_in) -> [A_sel] -> z (B, T, K*r) -> * w -> [B_sel] -> (B, T, d_out)

Everything here imports only torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def check_rank(r: int) -> None:
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}")


class StackedExperts(nn.Module):
    """``E`` LoRA pairs held as two tensors with a leading expert axis.

    Args:
        num_experts: ``E``.
        in_features: ``d_in`` of the wrapped layer.
        out_features: ``d_out`` of the wrapped layer.
        r: rank of every expert.
    """

    def __init__(self, *, num_experts: int, in_features: int, out_features: int, r: int, dtype=None, device=None):
        super().__init__()
        check_rank(r)
        if num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {num_experts}")
        self.num_experts, self.r = num_experts, r
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, r, out_features, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # kaiming_uniform(a=sqrt(5)) per expert, as nn.Linear and PEFT do; on the stacked tensor
        # torch would take fan_in = r * d_in, so the bound is written out. B = 0 keeps the model unchanged.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, weight: torch.Tensor | None = None):
        """Mix the experts, unscaled.

        Args:
            x: ``(B, T, d_in)``.
            index: ``(B, K)`` expert ids each sample sees, or ``None`` for all ``E`` experts (``K = E``).
            weight: ``(B, T, K)`` per token or ``(B, 1, K)`` per sample, or ``None`` for weight 1.

        Returns:
            ``(B, T, d_out)``: ``sum_k w_{b,t,k} B_{e(b,k)} A_{e(b,k)} x_{b,t}``.
        """
        n, T, d_in = x.shape
        E, r, d_out = self.num_experts, self.r, self.out_features
        if index is None:
            K = E
            z = x @ self.lora_A.reshape(E * r, d_in).t()  # (B, T, E*r)
            B_cat = self.lora_B.reshape(E * r, d_out)  # (E*r, d_out), a view
        else:
            K = index.shape[1]
            A_sel = self.lora_A[index].reshape(n, K * r, d_in)  # (B, K*r, d_in)
            z = torch.bmm(x, A_sel.transpose(1, 2))  # (B, T, K*r)
            B_cat = self.lora_B[index].reshape(n, K * r, d_out)  # (B, K*r, d_out)
        if weight is not None:
            z = (z.view(n, T, K, r) * weight.unsqueeze(-1)).view(n, T, K * r)  # (B, T, K, r) -> (B, T, K*r)
        return z @ B_cat  # (B, T, d_out)


class Adapter(nn.Module):
    """Base of every method: stacked experts, a scaling, input dropout, and a routing rule.

    A subclass implements :meth:`route` (which experts each sample sees, with what weight) and, when
    its update for a task is a constant matrix, :meth:`task_route` (the same for one task, no input
    needed), which is what merging and PEFT export are built on.
    """

    #: True when a task's whole update is a constant ``dW_t``, so it can be merged and exported.
    mergeable: bool = True
    #: False only for methods that treat every sample alike (joint LoRA).
    needs_task_ids: bool = True

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        r: int,
        num_experts: int,
        scaling: float,
        dropout: float = 0.0,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.experts = StackedExperts(
            num_experts=num_experts, in_features=in_features, out_features=out_features, r=r, dtype=dtype, device=device
        )
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def route(self, x: torch.Tensor, task_ids: torch.Tensor | None, cluster_ids: torch.Tensor | None):
        """Return ``(index (B, K) | None, weight (B, T|1, K) | None)`` for the batch ``x: (B, T, d_in)``."""
        raise NotImplementedError

    def task_route(self, task: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return ``(index (K,) | None, weight (K,) | None)``: the experts task ``task`` uses and their weights."""
        raise NotImplementedError(f"{type(self).__name__} has no constant per-task update")

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None, cluster_ids: torch.Tensor | None):
        """x: (B, T, d_in); task_ids, cluster_ids: (B,) or None. Returns the update (B, T, d_out)."""
        index, weight = self.route(x, task_ids, cluster_ids)
        return self.scaling * self.experts(self.dropout(x), index, weight)

    def task_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``task``'s update as one LoRA pair, gate weights and scaling folded into ``B'``.

        Returns:
            ``A': (K*r, d_in)`` and ``B': (d_out, K*r)`` with ``B' @ A' = s * sum_k w_k B_k A_k = dW_t``.
        """
        index, weight = self.task_route(task)
        A, B = self.experts.lora_A, self.experts.lora_B  # (E, r, d_in), (E, r, d_out)
        if index is not None:
            A, B = A[index], B[index]  # (K, r, d_in), (K, r, d_out)
        if weight is not None:
            B = B * weight.to(B.dtype)[:, None, None]
        K, r, d_in = A.shape
        return A.reshape(K * r, d_in), (self.scaling * B).reshape(K * r, -1).t()

    def delta_weight(self, task: int) -> torch.Tensor:
        """``dW_t: (d_out, d_in)``, the constant update of task ``task``."""
        A, B = self.task_factors(task)
        return B @ A


def require_task_ids(task_ids: torch.Tensor | None, method: str) -> torch.Tensor:
    if task_ids is None:
        raise RuntimeError(
            f"{method} needs per-sample task ids, and none are set: call the model inside "
            "`with cgc_lightning.routing.route(model, task_ids=...):`"
        )
    return task_ids
