"""Models to train: a fresh DeepSeek-V3-shaped CausalLM from a config dict, or a checkpoint made trainable."""

from __future__ import annotations

from typing import Any

import torch

from selfseek.config import ConfigError, ModelConfig
from selfseek.models.model import CausalLM
from selfseek.train.config import TINY_V3, TrainConfigError
from selfseek.weights.safetensors import load_checkpoint


def model_config_dict(overrides: dict[str, Any], tokenizer_vocab: int, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json of the model to train: TINY_V3 < `overrides`; vocab_size defaults to the tokenizer's
    size rounded up to a multiple of 64 (unused rows cost little and keep matmuls aligned)."""
    d = {**TINY_V3, **overrides}
    if d.get("vocab_size") is None:
        d["vocab_size"] = -(-tokenizer_vocab // 64) * 64
    if d["vocab_size"] < tokenizer_vocab:
        raise TrainConfigError(
            f"model.vocab_size {d['vocab_size']} is smaller than the tokenizer's {tokenizer_vocab} tokens"
        )
    d.setdefault("bos_token_id", bos_id)
    d.setdefault("eos_token_id", eos_id)
    d.setdefault("num_key_value_heads", d.get("num_attention_heads"))
    return d


def parse_model_config(d: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_dict(d, source="model config")
    except ConfigError as e:
        raise TrainConfigError(str(e)) from None


def init_weights(model: CausalLM, std: float) -> None:
    """N(0, std) for every matrix (router and experts included), ones for norms, zero routing bias."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)


def make_trainable(model: CausalLM) -> CausalLM:
    """Train mode; every parameter learns except the aux-loss-free routing bias (it has its own update)."""
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("e_score_correction_bias"))
    return model


def new_model(cfg: ModelConfig, init_std: float, seed: int) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    init_weights(model, init_std)
    return make_trainable(model)


def load_trainable(path: str, device: torch.device) -> CausalLM:
    """A Hugging Face-format folder as an fp32 model ready to train (the MTP module kept when present)."""
    return make_trainable(load_checkpoint(path, dtype="float32", device=device, progress=False))


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
