r"""Plain LoRA, the reference, and the two baselines built from it.

joint_lora (one LoRA for every task of every cluster, the "integrated model"):

    h = W0 x + s B A x

independent_lora (one LoRA per task, the "multiple independent models"); sample b uses only its
task's pair, so one batch may mix tasks and no parameter is shared:

    h_b = W0 x_b + s B_{t(b)} A_{t(b)} x_b

s = alpha / r, or alpha / sqrt(r) with rslora.
"""

from __future__ import annotations

import math

import torch

from cgc_lightning.adapters.experts import Adapter, check_rank, per_batch, require_task_ids, spread_weights


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    check_rank(r)
    return alpha / math.sqrt(r) if rslora else alpha / r


class JointLoRA(Adapter):
    """One LoRA pair shared by every sample: ``h = W0 x + s B A x``."""

    needs_task_ids = False

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__(
            in_features=in_features,
            out_features=out_features,
            r=r,
            num_experts=1,
            scaling=lora_scaling(alpha, r, rslora),
            dropout=dropout,
            dtype=dtype,
            device=device,
        )

    def route(self, x, task_ids, cluster_ids):
        return None, None  # the single expert, weight 1

    def task_route(self, task):
        return None, None


class IndependentLoRA(Adapter):
    """One LoRA pair per task, picked per sample: ``h_b = W0 x_b + s B_{t(b)} A_{t(b)} x_b``.

    Args:
        num_tasks: number of tasks; expert ``t`` belongs to task ``t``.
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        num_tasks: int,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__(
            in_features=in_features,
            out_features=out_features,
            r=r,
            num_experts=num_tasks,
            scaling=lora_scaling(alpha, r, rslora),
            dropout=dropout,
            dtype=dtype,
            device=device,
        )

    def route(self, x, task_ids, cluster_ids):
        task_ids = require_task_ids(task_ids, "independent_lora")
        return task_ids[:, None], None  # (B, 1): each sample sees its own task's pair

    def route_dense(self, x, task_ids, cluster_ids, cache=None):
        task_ids = require_task_ids(task_ids, "independent_lora")
        E = self.experts.num_experts
        # one-hot (B, 1, E), a constant of the batch: built by the first layer, reused by the others
        weight = per_batch(
            cache,
            task_ids,
            ("independent_lora", E, x.dtype, x.device),
            lambda: spread_weights(None, task_ids[:, None], E, x.dtype),
        )
        return weight, None

    def task_route(self, task):
        return torch.tensor([task], device=self.experts.lora_A.device), None
