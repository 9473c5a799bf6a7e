"""Model files are checked before loading: a truncated safetensors file is named."""

from __future__ import annotations

import pytest


def test_a_truncated_safetensors_model_is_refused_before_loading(tmp_path):
    from transformers import AutoModelForCausalLM

    from cgc_lightning.hf import ModelLoadError, ModelSpec, load_model
    from tests.conftest import tiny_config

    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "m")
    load_model(ModelSpec(name_or_path=str(tmp_path / "m")))  # whole: loads
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])  # an interrupted copy
    truncated = r"model.safetensors is truncated or corrupt: its tensors need [\d,]+ bytes"
    with pytest.raises(ModelLoadError, match=truncated):
        load_model(ModelSpec(name_or_path=str(tmp_path / "m")))
    weights.write_bytes(data[:4])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(ModelSpec(name_or_path=str(tmp_path / "m")))
