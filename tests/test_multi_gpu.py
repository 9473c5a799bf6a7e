"""Every method under Lightning's DDP (2 CPU processes, gloo) without ``find_unused_parameters``.

Rank 0 trains on task 0 only and rank 1 on task 1 only (tasks 0 and 1 are in different clusters),
so each rank's batches miss three tasks and one cluster, and tasks 2 and 3 are in no batch at all.
DDP with ``find_unused_parameters=False`` fails at the second step if an adapter tensor got no
gradient on a rank; the experts are stacked in one tensor per layer, so an unseen expert gets a zero
gradient instead. The test checks, per method (dense and gathered expert paths, gradient
checkpointing on one of them, ``torch.compile`` on one):

* 3 training steps run;
* after them the adapter tensors are bitwise identical on both ranks;
* the experts and gate rows of tasks 2 and 3, which no batch touched, are bitwise unchanged
  (zero gradients and AdamW without weight decay), and the seen ones moved.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cgc_lightning.config import AdapterConfig

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-llama"
TASKS = ["qa", "nli", "sum", "ner"]
CLUSTERS = ["reason", "extract", "reason", "extract"]  # tasks 0, 2 in one cluster; 1, 3 in the other
STEPS = 3
BATCH = 2  # sequences per rank per step
#: name -> (adapter config, number of tasks, gradient checkpointing[, compile]). E r <= 128 runs the dense path.
CASES = {
    "cgc_lora_dense": (AdapterConfig(method="cgc_lora", r=4, dropout=0.0), 4, False),  # 8 experts, E r = 32
    "cgc_lora_gathered_gc": (AdapterConfig(method="cgc_lora", r=32, dropout=0.0), 4, True),  # E r = 256
    "cgc_lora_compiled": (AdapterConfig(method="cgc_lora", r=4, dropout=0.0), 4, False, {"backend": "aot_eager"}),
    "cgc_lora_token_gate": (AdapterConfig(method="cgc_lora", r=4, dropout=0.0, gate_input="task+token"), 4, False),
    "moelora": (AdapterConfig(method="moelora", r=4, num_experts=4, dropout=0.0), 4, False),
    "joint_lora": (AdapterConfig(method="joint_lora", r=4, dropout=0.0), 4, False),
    "independent_lora_dense": (AdapterConfig(method="independent_lora", r=4, dropout=0.0), 4, False),
    "independent_lora_40_tasks": (AdapterConfig(method="independent_lora", r=4, dropout=0.0), 40, False),  # E r=160
}


def _rows(n: int, seq: int = 24) -> list[dict]:
    """Rows with task ids 0, 1, 0, 1, ...: Lightning's DistributedSampler gives rank r the rows r, r + 2, ..."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (n, seq), generator=g).tolist()
    return [{"input_ids": s, "labels": s, "task_id": i % 2} for i, s in enumerate(ids)]


def _adapter_state(module) -> dict[str, torch.Tensor]:
    from cgc_lightning.inject import adapter_parameters

    return {name: p.detach().clone() for name, p in adapter_parameters(module.model)}


def _worker(rank: int, port: int, out: str) -> None:
    """One DDP rank: a Trainer.fit per case; saves the adapter tensors before and after each."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["NODE_RANK"] = "0"
    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from cgc_lightning.hf import ModelSpec
    from cgc_lightning.module import MultiTaskLoRAModule
    from datamodules.collate import Collator

    saved = {}
    for name, (adapter, n_tasks, checkpointing, *compile) in CASES.items():
        names = TASKS if n_tasks == 4 else [f"t{i}" for i in range(n_tasks)]
        clusters = CLUSTERS if n_tasks == 4 else [CLUSTERS[i % 4] for i in range(n_tasks)]
        torch.manual_seed(0)
        module = MultiTaskLoRAModule(
            ModelSpec(name_or_path=str(FIXTURE), random_init=True),
            adapter=adapter,
            task_names=names,
            task_clusters=clusters,
            lr=1e-2,
            warmup_ratio=0.0,
            schedule="constant",
            gradient_checkpointing=checkpointing,
            compile=compile[0] if compile else False,
        )
        before = _adapter_state(module)
        cluster_ids = [list(dict.fromkeys(clusters)).index(c) for c in clusters]
        loader = DataLoader(_rows(2 * BATCH * STEPS), batch_size=BATCH, collate_fn=Collator(0, cluster_ids))
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=DDPStrategy(find_unused_parameters=False),
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(module, train_dataloaders=loader)
        assert trainer.global_step == STEPS, name
        if compile:  # the steps ran through the compiled graph, inside DDP
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, name
        saved[name] = (before, _adapter_state(module))
    torch.save(saved, f"{out}/rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_states(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _unseen(name: str, module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean masks over the adapter tensors: the slices only tasks 2 and up (in no batch) use."""
    adapter, n_tasks, *_ = CASES[name]
    masks = {}
    for key, value in module_state.items():
        mask = torch.zeros_like(value, dtype=torch.bool)
        if adapter.method == "independent_lora" and key.endswith(("lora_A", "lora_B")):
            mask[2:] = True  # expert t is task t's
        elif adapter.method == "cgc_lora":
            # cluster blocks: [S shared | P of task 0 | P of task 2] [S shared | P of task 1 | P of task 3]
            S, P = adapter.num_shared, adapter.num_specific
            if key.endswith(("lora_A", "lora_B")):
                mask[S + P : S + 2 * P] = True  # task 2's specific experts
                mask[2 * S + 3 * P : 2 * S + 4 * P] = True  # task 3's
            elif key.endswith(("gate_logits", "gate_token_W")):
                mask[2:] = True  # rows of tasks 2 and 3
        elif adapter.method == "moelora" and key.endswith("gate_task_emb"):
            mask[2:] = True  # embeddings of tasks 2 and 3
        masks[key] = mask
    return masks


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_ddp_batches_missing_tasks(ddp_states, name):
    (before0, after0), (before1, after1) = (ddp_states[r][name] for r in range(2))
    assert after0.keys() == after1.keys() and after0
    for key in after0:
        torch.testing.assert_close(before0[key], before1[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k} init: {m}")
        torch.testing.assert_close(after0[key], after1[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k} ranks: {m}")
    moved = 0
    for key, mask in _unseen(name, before0).items():
        delta = after0[key] - before0[key]
        assert torch.equal(delta[mask], torch.zeros_like(delta[mask])), f"{name}: {key} changed where no batch reached"
        moved += int(delta[~mask].abs().sum() > 0)
    assert moved > 0, f"{name}: no adapter tensor moved; did training run?"
    # B of the experts that batches saw moved from its zero init in every layer
    seen_B = [k for k in after0 if k.endswith("lora_B")]
    assert all(after0[k].abs().sum() > 0 for k in seen_B), f"{name}: some lora_B never trained"


def test_bf16_true_precision_trains_with_per_task_losses():
    """``precision: bf16-true`` (the multi-GPU docs' setting) makes bf16 the default dtype inside
    ``training_step``; the per-task loss sums must still take the float32 losses."""
    import lightning as L
    from torch.utils.data import DataLoader

    from cgc_lightning.hf import ModelSpec
    from cgc_lightning.module import MultiTaskLoRAModule
    from datamodules.collate import Collator

    torch.manual_seed(0)
    module = MultiTaskLoRAModule(
        ModelSpec(name_or_path=str(FIXTURE), random_init=True),
        adapter=AdapterConfig(method="cgc_lora", r=4, dropout=0.0),
        task_names=TASKS,
        task_clusters=CLUSTERS,
    )
    loader = DataLoader(_rows(4), batch_size=2, collate_fn=Collator(0, [0, 1, 0, 1]))
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-true",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 2
    assert module._task_tokens.sum() > 0 and torch.isfinite(module._task_loss_sum).all()
