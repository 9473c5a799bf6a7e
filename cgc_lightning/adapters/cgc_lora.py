r"""CGC-LoRA (arXiv 2402.01684): customised gate control over shared and task-specific LoRA experts.

One module set serves one task cluster of K tasks: S task-common (shared) experts and P
task-specific experts for each of its K tasks. Task t sees only the S + P experts that are shared in
its cluster or its own, through its own gate:

    g_t = softmax(G_t)                                   over the S + P experts visible to t
    G_t = W_g^(t) emb(t)                 gate_input: task        (the default; mergeable)
    G_t = W_g^(t) x                      gate_input: token       (PLE-style)
    G_t = W_g^(t) emb(t) + W_g^(t) x     gate_input: task+token

    h = W0 x + s * ( sum_{i in shared(c(t))} g_{t,i} B_i A_i x + sum_{j in specific(t)} g_{t,j} B_j A_j x )

The 1+N pattern: N module sets, one per cluster, all stacked in one tensor; a sample of cluster c
reaches set c's experts only, because its task's visible-expert table points inside set c.

For a task gate, W_g^(t) emb(t) is one free vector of S + P logits per task (a per-task matrix times
a per-task embedding spans exactly that), so it is stored as such: ``gate_logits: (n_tasks, S+P)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cgc_lightning.adapters.experts import Adapter, per_batch, require_task_ids, task_spread
from cgc_lightning.adapters.lora import lora_scaling

GATE_INPUTS = ("task", "token", "task+token")


def expert_layout(task_clusters: Sequence[int], num_shared: int, num_specific: int) -> tuple[torch.Tensor, int]:
    """Lay out every cluster's module set in one expert axis.

    Cluster ``c`` owns a contiguous block ``[S shared | P experts of its 1st task | P of its 2nd | ...]``.

    Returns:
        ``visible: (n_tasks, S+P)`` expert ids each task sees (shared first), and the total expert count.
    """
    if num_shared < 0 or num_specific < 0 or num_shared + num_specific == 0:
        raise ValueError(
            f"CGC-LoRA needs num_shared >= 0, num_specific >= 0 and at least one expert per task, "
            f"got num_shared={num_shared}, num_specific={num_specific}"
        )
    num_clusters = max(task_clusters) + 1
    visible, offset = [None] * len(task_clusters), 0
    for c in range(num_clusters):
        tasks = [t for t, tc in enumerate(task_clusters) if tc == c]
        if not tasks:
            raise ValueError(f"cluster {c} has no tasks; every cluster needs at least one")
        shared = list(range(offset, offset + num_shared))
        offset += num_shared
        for t in tasks:
            visible[t] = shared + list(range(offset, offset + num_specific))
            offset += num_specific
    return torch.tensor(visible, dtype=torch.long), offset


class TaskLogitGate(nn.Module):
    """Per-task gate logits ``G_t: (n_tasks, S+P)``, starting at zero (uniform gates)."""

    def __init__(self, *, num_tasks: int, num_visible: int, dtype=None, device=None):
        super().__init__()
        self.gate_logits = nn.Parameter(torch.zeros(num_tasks, num_visible, dtype=dtype, device=device))

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """task_ids: (B,) -> logits (B, S+P)."""
        return self.gate_logits[task_ids]


class CGCLoRA(Adapter):
    """CGC-LoRA module sets for every cluster in one layer.

    Args:
        task_clusters: cluster index of each task (task ``t`` is in cluster ``task_clusters[t]``).
        num_shared: ``S``, task-common experts per cluster.
        num_specific: ``P``, task-specific experts per task.
        gate_input: ``task``, ``token`` or ``task+token``.
        gate: a task gate shared by all layers, or ``None`` for this layer's own.
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        task_clusters: Sequence[int],
        num_shared: int = 2,
        num_specific: int = 1,
        gate_input: str = "task",
        gate: TaskLogitGate | None = None,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype=None,
        device=None,
    ):
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")
        visible, num_experts = expert_layout(task_clusters, num_shared, num_specific)
        super().__init__(
            in_features=in_features,
            out_features=out_features,
            r=r,
            num_experts=num_experts,
            scaling=lora_scaling(alpha, r, rslora),
            dropout=dropout,
            dtype=dtype,
            device=device,
        )
        n_tasks, k = visible.shape
        self.gate_input = gate_input
        self.mergeable = gate_input == "task"
        self.register_buffer("visible", visible.to(device), persistent=False)  # (n_tasks, S+P)
        # names the layout in the per-batch cache, so every layer with this layout shares one spread matrix
        self._layout_key = ("cgc_lora", num_experts, tuple(map(tuple, visible.tolist())))
        self.task_gate = None
        if "task" in gate_input.split("+"):
            if gate is None:
                self.task_gate = TaskLogitGate(num_tasks=n_tasks, num_visible=k, dtype=dtype, device=device)
            else:
                self.__dict__["task_gate"] = gate  # owned by the model root; see MoELoRA
        self.gate_token_W = None
        if "token" in gate_input:
            self.gate_token_W = nn.Parameter(torch.zeros(n_tasks, k, in_features, dtype=dtype, device=device))

    def gate_weights(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_in), task_ids: (B,) -> g: (B, 1, S+P) for a task gate, (B, T, S+P) otherwise."""
        logits = 0
        if self.task_gate is not None:
            logits = self.task_gate(task_ids).unsqueeze(1)  # (B, 1, S+P)
        if self.gate_token_W is not None:
            W = self.gate_token_W[task_ids]  # (B, S+P, d_in)
            logits = logits + torch.bmm(x.to(W.dtype), W.transpose(1, 2))  # (B, T, S+P)
        return torch.softmax(logits, dim=-1)

    def route(self, x, task_ids, cluster_ids):
        task_ids = require_task_ids(task_ids, "cgc_lora")
        return self.visible[task_ids], self.gate_weights(x, task_ids)  # (B, S+P), (B, T|1, S+P)

    def route_table(self, x, task_ids, cluster_ids, cache=None):
        if self.gate_input != "task":
            return None  # the token-reading gates differ per token: route_dense
        task_ids = require_task_ids(task_ids, "cgc_lora")
        G = self.task_gate.gate_logits  # (n_tasks, S+P)
        # (B*E, n_tasks*(S+P)): sample b gets row t(b) of softmax(G) on the experts task t(b) sees, 0 elsewhere
        spread = per_batch(
            cache,
            task_ids,
            (*self._layout_key, G.dtype, G.device),
            lambda: task_spread(task_ids, self.visible, self.experts.num_experts, G.dtype),
        )
        return G, spread

    def table_gate(self):
        return self.task_gate if self.gate_input == "task" else None

    def task_route(self, task):
        if not self.mergeable:
            raise ValueError(
                f"CGC-LoRA with gate_input={self.gate_input!r} reads the token, so a task has no "
                "constant update to merge or export; only gate_input='task' is mergeable"
            )
        ids = torch.tensor([task], device=self.visible.device)
        return self.visible[task], torch.softmax(self.task_gate(ids)[0], dim=-1)  # (S+P,), (S+P,)
