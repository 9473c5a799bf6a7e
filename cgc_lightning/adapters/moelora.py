r"""MOELoRA (Liu et al., 2023): E LoRA experts shared by all tasks, mixed by a task-motivated gate.

    w_t = softmax(W_g emb(t))                     (E,)   one gate for the model, or one per layer
    h   = W0 x + s * sum_e w_{t,e} B_e A_e x

The MOELoRA paper splits a total rank r across the experts (r_e = r / E, ``split_rank``); the
scaling stays s = alpha / r of the total rank, as in the paper's code, so that splitting the rank
does not also rescale the update.
"""

from __future__ import annotations

import torch
from torch import nn

from cgc_lightning.adapters.experts import Adapter, per_batch, require_task_ids, task_spread
from cgc_lightning.adapters.lora import lora_scaling


class TaskEmbeddingGate(nn.Module):
    """``w_t = softmax(W_g emb(t))`` over ``E`` experts.

    ``W_g`` starts at zero, so every task starts with a uniform mixture.

    Args:
        num_tasks: number of tasks.
        num_experts: ``E``.
        dim: task-embedding size.
    """

    def __init__(self, *, num_tasks: int, num_experts: int, dim: int, dtype=None, device=None):
        super().__init__()
        self.gate_task_emb = nn.Parameter(torch.randn(num_tasks, dim, dtype=dtype, device=device))  # (n_tasks, D)
        self.gate_W = nn.Parameter(torch.zeros(num_experts, dim, dtype=dtype, device=device))  # (E, D)

    def logits(self) -> torch.Tensor:
        """Every task's gate logits, ``W_g emb(t)``: ``(n_tasks, E)``."""
        return self.gate_task_emb @ self.gate_W.t()

    def table(self) -> torch.Tensor:
        """Every task's gate weights, ``(n_tasks, E)``."""
        return torch.softmax(self.logits(), dim=-1)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """task_ids: (B,) -> gate weights (B, E)."""
        return torch.softmax(self.gate_task_emb[task_ids] @ self.gate_W.t(), dim=-1)


class MoELoRA(Adapter):
    """E shared experts under a task-embedding gate.

    Args:
        num_tasks: number of tasks the gate knows.
        num_experts: ``E``.
        r: rank of each expert, or the total rank when ``split_rank``.
        split_rank: give each expert rank ``r // E`` (MOELoRA's setting).
        gate: a gate shared by every layer of the model; ``None`` builds one for this layer.
        gate_dim: task-embedding size of a per-layer gate.
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        num_tasks: int,
        num_experts: int,
        split_rank: bool = False,
        gate: TaskEmbeddingGate | None = None,
        gate_dim: int = 64,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype=None,
        device=None,
    ):
        if split_rank and r % num_experts:
            raise ValueError(f"split_rank needs r divisible by num_experts, got r={r}, num_experts={num_experts}")
        r_e = r // num_experts if split_rank else r
        super().__init__(
            in_features=in_features,
            out_features=out_features,
            r=r_e,
            num_experts=num_experts,
            scaling=lora_scaling(alpha, r, rslora),
            dropout=dropout,
            dtype=dtype,
            device=device,
        )
        if gate is None:
            self.gate = TaskEmbeddingGate(
                num_tasks=num_tasks, num_experts=num_experts, dim=gate_dim, dtype=dtype, device=device
            )
        else:
            # Shared gate: owned by the model root, referenced here without registering it, so its
            # parameters appear once in state_dict and the optimizer.
            self.__dict__["gate"] = gate

    def route(self, x, task_ids, cluster_ids):
        task_ids = require_task_ids(task_ids, "moelora")
        return None, self.gate(task_ids).unsqueeze(1)  # all experts; weight (B, 1, E)

    def route_table(self, x, task_ids, cluster_ids, cache=None):
        task_ids = require_task_ids(task_ids, "moelora")
        logits = self.gate.logits()  # (n_tasks, E)
        n, E = logits.shape

        def build():  # (B*E, n_tasks*E): sample b gets row t(b) of softmax(logits), expert e in column e
            every_expert = torch.arange(E, device=task_ids.device).expand(n, E)
            return task_spread(task_ids, every_expert, E, logits.dtype)

        return logits, per_batch(cache, task_ids, ("moelora", n, E, logits.dtype, logits.device), build)

    def table_gate(self):
        return self.gate

    def task_route(self, task):
        ids = torch.tensor([task], device=self.experts.lora_A.device)
        return None, self.gate(ids)[0]  # (E,)
