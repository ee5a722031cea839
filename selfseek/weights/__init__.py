"""Model files -> (CausalLM, Tokenizer). A source is a Hugging Face checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import torch

from selfseek.models.model import CausalLM
from selfseek.tokenizer import Tokenizer
from selfseek.weights.safetensors import CheckpointError, load_checkpoint

__all__ = ["CheckpointError", "load_model"]


def load_model(
    source: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[CausalLM, Tokenizer | None]:
    """Load weights and, when the folder has one, the tokenizer."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model (expected a checkpoint folder with config.json)")
    model = load_checkpoint(path, dtype, device, progress)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    return model, tokenizer
