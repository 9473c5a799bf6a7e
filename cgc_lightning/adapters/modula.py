r"""MoDULA (arXiv 2412.07405): universal and domain-specific LoRA experts under a token router.

A domain is a task cluster. Every layer stacks ``u`` universal experts (``u = 1`` in the paper) and
one expert per domain on one axis, and has its own router reading the token's hidden state:

    experts:  [U_1 .. U_u | D_1 .. D_n]                           lora_A: (u+n, r, d_in)
    router:   p = softmax(W_r x)                                  router_W: (n_routed, d_in), 0 at init
              top_k: p on the k likeliest experts, 0 elsewhere (not renormalised, as in the Switch
              Transformer: the router keeps a gradient even with k = 1)

    MoDULA-Flan:  h = W0 x + s * sum_{e in {U, D_1..D_n}} p_e B_e A_e x              n_routed = u + n
    MoDULA-Res:   h = W0 x + s * sum_j B_{U_j} A_{U_j} x + s * sum_k p_k B_k A_k x    n_routed = n

No task label is needed once the router is trained. Training goes in stages (``stage``), each one
freezing what the earlier ones trained:

    universal:  h = W0 x + s B_U A_U x                             trains U on the whole mixture
    domain:     the variant's equation with the router replaced    trains the domain experts not trained
                by the one-hot domain label c = c(b):              yet, each on its own domain, U frozen
                  Res:   h = W0 x + s B_U A_U x + s B_c A_c x
                  Flan:  h = W0 x + s B_c A_c x                    (p = e_{D_c}: U, a routed expert, gets 0)
    router:     the variant's equation                             trains the router alone
    joint:      the variant's equation                             trains everything at once (one stage)

The ``domain`` stage routes by the label exactly as METHODS.md says: MoDULA-Res keeps its always-on
universal path (so ``D_c`` learns what ``U`` lacks on domain ``c``, its final function under a one-hot
router), while MoDULA-Flan, whose router mixes ``U`` with the domain experts, gives ``U`` no weight.
Domain experts share a stacked tensor with the universal one, so freezing is per expert row: a
gradient hook zeroes the frozen rows, and Adam(W) without weight decay leaves a row whose gradient
has always been zero bit for bit unchanged.

Optional load balancing (Switch Transformer's), over the tokens of the batch, padding included:

    aux = coef * n_routed * sum_e f_e P_e       f_e: share of top-k slots given to e (top-1 when dense)
                                                P_e: mean router probability of e;  1 when uniform
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cgc_lightning.adapters.experts import Adapter, DenseMixture, apply_mixture
from cgc_lightning.adapters.lora import lora_scaling

VARIANTS = ("res", "flan")
STAGES = ("joint", "universal", "domain", "router")
#: Stages whose function is a constant matrix per task (no router), so they merge and export like LoRA.
CONSTANT_STAGES = ("universal", "domain")
#: Stages in which a saved adapter's domain experts have been trained (the ``domain`` stage freezes them).
DOMAIN_TRAINED_STAGES = ("domain", "router", "joint")


def expert_labels(clusters: Sequence[str], num_universal: int = 1) -> list[str]:
    """A name for each expert of a MoDULA layer, in expert-axis order: ``universal[.j]``, ``domain.<cluster>``."""
    universal = ["universal"] if num_universal == 1 else [f"universal.{j}" for j in range(num_universal)]
    return universal + [f"domain.{c}" for c in clusters]


def load_balance_loss(logits: torch.Tensor, k: int = 1) -> torch.Tensor:
    """``n * sum_e f_e P_e`` (Switch Transformer) over tokens; 1 for a uniform router.

    Args:
        logits: ``(N, n)`` router logits of ``N`` tokens.
        k: slots per token (the router's top-k; 1 for a dense router, whose top-1 counts).
    """
    n = logits.shape[-1]
    chosen = torch.zeros_like(logits).scatter(-1, logits.topk(k, dim=-1).indices, 1.0)  # (N, n), no gradient
    f = chosen.mean(0) / k  # (n,) share of the slots
    return n * (f * torch.softmax(logits, dim=-1).mean(0)).sum()


class MoDULA(Adapter):
    """Universal and domain experts of one layer, its router, and the training stage.

    Args:
        task_clusters: domain (cluster) of each task; there are ``max + 1`` domains.
        variant: ``res`` (the universal expert always on, the router over the domains) or ``flan``
            (the router over every expert).
        num_universal: ``u``, universal experts.
        stage: ``joint``, ``universal``, ``domain`` or ``router`` (see the module docstring).
        top_k: keep the ``k`` likeliest routed experts per token; ``None`` for the dense softmax.
        load_balance_coef: weight of the load-balancing loss left in :attr:`aux_loss` by each
            training forward that uses the router; 0 turns it off.
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        task_clusters: Sequence[int],
        variant: str = "res",
        num_universal: int = 1,
        stage: str = "joint",
        top_k: int | None = None,
        load_balance_coef: float = 0.0,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype=None,
        device=None,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"MoDULA variant must be one of {VARIANTS}, got {variant!r}")
        if num_universal < 1:
            raise ValueError(f"MoDULA needs num_universal >= 1, got {num_universal}")
        num_domains = max(task_clusters) + 1
        super().__init__(
            in_features=in_features,
            out_features=out_features,
            r=r,
            num_experts=num_universal + num_domains,
            scaling=lora_scaling(alpha, r, rslora),
            dropout=dropout,
            dtype=dtype,
            device=device,
        )
        self.variant, self.num_universal, self.num_domains = variant, num_universal, num_domains
        #: Where the router's rows start on the expert axis: Flan routes the universal experts too.
        self.routed_offset = num_universal if variant == "res" else 0
        n_routed = self.experts.num_experts - self.routed_offset
        if top_k is not None and not 1 <= top_k <= n_routed:
            raise ValueError(f"router top_k must be in 1..{n_routed} (the routed experts), got {top_k}")
        if load_balance_coef < 0:
            raise ValueError(f"load_balance_coef must be >= 0, got {load_balance_coef}")
        self.top_k, self.load_balance_coef = top_k, float(load_balance_coef)
        self.router_W = nn.Parameter(torch.zeros(n_routed, in_features, dtype=dtype, device=device))
        u, E = num_universal, self.experts.num_experts
        # domain stage: row c = domain c's expert at weight 1, and (Res: always on) every universal expert
        table = torch.zeros(num_domains, E, dtype=dtype, device=device)
        table[:, :u] = 1 if variant == "res" else 0
        table[:, u:] = torch.eye(num_domains, dtype=dtype, device=device)
        self.register_buffer("domain_table", table, persistent=False)  # (n, E)
        self.register_buffer("task_domain", torch.tensor(list(task_clusters), device=device), persistent=False)
        self.register_buffer("expert_grad_mask", torch.ones(E, dtype=dtype, device=device), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self._grad_hooks: list = []
        self.set_stage(stage)

    # ------------------------------------------------------------------------------------------ stages

    def set_stage(self, stage: str, trained_domains: Sequence[int] = ()) -> None:
        """Route as ``stage`` does and make only its parameters trainable.

        Args:
            stage: ``joint``, ``universal``, ``domain`` or ``router``.
            trained_domains: domains whose experts an earlier stage trained; the ``domain`` stage
                keeps them frozen (adding a domain trains only the new one).
        """
        if stage not in STAGES:
            raise ValueError(f"MoDULA stage must be one of {STAGES}, got {stage!r}")
        u, E = self.num_universal, self.experts.num_experts
        self.stage = stage
        self.needs_task_ids = stage == "domain"  # only the domain stage reads the label
        self.mergeable = stage in CONSTANT_STAGES
        train = torch.zeros(E, dtype=torch.bool)
        if stage in ("universal", "joint"):
            train[:u] = True
        if stage in ("domain", "joint"):
            train[u:] = True
        if stage == "domain":
            for k in trained_domains:
                train[u + k] = False
        self.router_W.requires_grad_(stage in ("router", "joint"))
        self.expert_grad_mask.copy_(train.to(self.expert_grad_mask))
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks = []
        for p in (self.experts.lora_A, self.experts.lora_B):
            p.requires_grad_(bool(train.any()))
            if train.any() and not train.all():  # frozen rows share the tensor with trained ones
                self._grad_hooks.append(p.register_hook(self._mask_frozen_rows))
        self.aux_loss = None

    def _mask_frozen_rows(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.expert_grad_mask.to(grad.dtype)[:, None, None]  # (E, r, d)

    @property
    def trainable_experts(self) -> list[int]:
        """Expert rows the current stage trains."""
        if not self.experts.lora_A.requires_grad:
            return []
        return self.expert_grad_mask.nonzero().flatten().tolist()

    @property
    def frozen_numel(self) -> int:
        """Elements of the frozen rows of expert tensors that ``requires_grad`` (for an honest trainable count)."""
        if not self.experts.lora_A.requires_grad:
            return 0
        frozen = self.experts.num_experts - len(self.trainable_experts)
        return frozen * self.experts.r * (self.experts.in_features + self.experts.out_features)

    @torch.no_grad()
    def load_saved(self, saved: Mapping[str, torch.Tensor], domain_rows: Sequence[int | None]) -> None:
        """Copy a saved layer of the same variant whose domains may differ from this one's.

        Args:
            saved: the saved layer's ``experts.lora_A``, ``experts.lora_B`` and ``router_W``.
            domain_rows: for each domain of this layer, its index among the saved layer's domains,
                or ``None`` for a domain the saved layer does not have (it keeps its fresh init).
        """
        if len(domain_rows) != self.num_domains:
            raise ValueError(f"domain_rows has {len(domain_rows)} entries for {self.num_domains} domains")
        u = self.num_universal
        pairs = [(k, old) for k, old in enumerate(domain_rows) if old is not None]
        for key, param, offset in (
            ("experts.lora_A", self.experts.lora_A, u),
            ("experts.lora_B", self.experts.lora_B, u),
            ("router_W", self.router_W, u - self.routed_offset),
        ):
            src = saved[key].to(param.device, param.dtype)
            if src.shape[1:] != param.shape[1:] or src.shape[0] < offset:
                raise ValueError(f"saved {key} has shape {tuple(src.shape)}, this layer's is {tuple(param.shape)}")
            param[:offset] = src[:offset]  # the universal rows
            for k, old in pairs:
                param[offset + k] = src[offset + old]

    # ----------------------------------------------------------------------------------------- routing

    def router_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, T, d_in)`` -> ``(B, T, E)``: the router's weights, 1 on Res's universal experts."""
        logits = F.linear(x, self.router_W)  # (B, T, n_routed)
        p = torch.softmax(logits, dim=-1)
        if self.top_k is not None:
            idx = logits.topk(self.top_k, dim=-1).indices  # (B, T, k)
            p = torch.zeros_like(p).scatter(-1, idx, p.gather(-1, idx))
        if self.load_balance_coef > 0 and self.training and torch.is_grad_enabled():
            flat = logits.reshape(-1, logits.shape[-1])  # (B*T, n_routed)
            self.aux_loss = self.load_balance_coef * load_balance_loss(flat, self.top_k or 1)
        if self.routed_offset:  # Res: the universal experts are on at weight 1
            B, T, _ = p.shape
            p = torch.cat([p.new_ones(B, T, self.routed_offset), p], dim=-1)  # (B, T, E)
        return p

    def _domain_index(self, cluster_ids: torch.Tensor | None) -> torch.Tensor:
        if cluster_ids is None:
            raise RuntimeError(
                "the MoDULA domain stage routes each sample to its domain (task cluster) expert, and no ids are "
                "set: call the model inside `with cgc_lightning.routing.route(model, task_ids=...):`"
            )
        u = self.num_universal
        domain = (u + cluster_ids)[:, None]  # (B, 1)
        if self.variant == "flan":  # the one-hot router over {U, D}: the domain's expert alone
            return domain
        universal = torch.arange(u, device=cluster_ids.device).expand(cluster_ids.shape[0], u)  # (B, u)
        return torch.cat([universal, domain], dim=1)  # (B, u+1)

    def route(self, x, task_ids, cluster_ids):
        if self.stage == "universal":
            u = self.num_universal
            return torch.arange(u, device=x.device).expand(x.shape[0], u), None  # (B, u), weight 1
        if self.stage == "domain":
            return self._domain_index(cluster_ids), None  # (B, u+1) for Res, (B, 1) for Flan; weight 1
        return None, self.router_weights(x)  # all experts, (B, T, E)

    def route_dense(self, x, task_ids, cluster_ids, cache=None):
        if self.stage == "domain":
            self._domain_index(cluster_ids)  # the same error without ids
            return self.domain_table, cluster_ids  # (n, E): sample b uses row c(b)
        return super().route_dense(x, task_ids, cluster_ids, cache)

    def forward(self, x, task_ids, cluster_ids, out=None, *, cache=None):
        if self.stage == "universal":
            # U alone: the domain experts are not in this stage's function, so they are not computed
            u = self.num_universal
            A, B = self.experts.lora_A[:u], self.experts.lora_B[:u]  # (u, r, d_in), (u, r, d_out)
            return apply_mixture(DenseMixture, self.dropout(x), A, B, None, None, out, self.scaling)
        return super().forward(x, task_ids, cluster_ids, out, cache=cache)

    def task_route(self, task):
        if self.stage not in CONSTANT_STAGES:
            raise ValueError(
                f"MoDULA in stage {self.stage!r} routes by each token, so a task has no constant update to merge "
                f"or export; only the {' and '.join(CONSTANT_STAGES)} stages are mergeable"
            )
        u, device = self.num_universal, self.experts.lora_A.device
        universal = torch.arange(u, device=device)
        if self.stage == "universal":
            return universal, None
        domain = u + self.task_domain[task : task + 1]  # (1,)
        return (domain if self.variant == "flan" else torch.cat([universal, domain])), None  # (1,) or (u+1,)
