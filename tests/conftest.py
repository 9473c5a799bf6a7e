"""Tiny models built from configs, and helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

from cgc_lightning.config import TaskLayout
from cgc_lightning.inject import adapter_parameters

VOCAB = 97
ROOT = Path(__file__).resolve().parents[1]


def tiny_cli(tmp_path, monkeypatch, *args: str):
    """The CLI on ``experiments/tiny.yaml``, built in this process and not run, working in ``tmp_path`` (which
    sees the repo's fixtures), its MLflow store ``tmp_path/mlflow.db``; ``args``: more overrides."""
    from cgc_lightning.cli import TRAINER_DEFAULTS, CGCLightningCLI
    from cgc_lightning.module import MultiTaskLoRAModule
    from datamodules.multitask import MultiTaskDataModule

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    return CGCLightningCLI(
        MultiTaskLoRAModule,
        MultiTaskDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        # an absolute store: MLflow caches a store per URI, and a relative one would follow this test's cwd
        args=[
            "--config",
            str(ROOT / "experiments/tiny.yaml"),
            f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"--trainer.default_root_dir={tmp_path}/outputs",
            *args,
        ],
        run=False,
    )


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    if family == "gemma3":
        return Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            sliding_window=16,
        )
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(family)


def tiny_model(family: str = "llama", dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype).eval()


#: Two clusters, tasks interleaved by id so that a batch of ids 0..3 mixes clusters.
LAYOUT = TaskLayout(("qa", "nli", "sum", "ner"), ("reason", "extract"), (0, 1, 0, 1))


def randomize_adapters(model, seed: int = 1, scale: float = 0.2) -> None:
    """Give every adapter/gate tensor random values so tests compare non-trivial updates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def count_applies(monkeypatch, node) -> list:
    """A list that gains an entry each time ``node.apply`` (an autograd function of the adapters) runs."""
    calls = []
    real = node.apply
    monkeypatch.setattr(node, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.fixture
def layout():
    return LAYOUT


@pytest.fixture(params=["dense", "gathered"])
def expert_path(request, monkeypatch):
    """Run a test through both expert kernels: all experts at weight 0 where unseen, and per-sample gathers."""
    from cgc_lightning.adapters import experts

    if request.param == "gathered":
        monkeypatch.setattr(experts, "DENSE_MAX_RANK", 0)
    return request.param


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: without it they are skipped, saying so, rather than failing."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a machine with one)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
