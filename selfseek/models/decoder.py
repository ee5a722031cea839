"""One decoder layer: h = h + Attn(RMSNorm(h)); h = h + FFN(RMSNorm(h)). Shared by the main stack
(models/model.py) and the multi-token-prediction module (models/mtp.py), so neither imports the other."""

from __future__ import annotations

import torch
from torch import nn

from selfseek.config import ModelConfig
from selfseek.models.attention import Attention
from selfseek.models.batch import AttnBatch
from selfseek.models.layers import MLP, RMSNorm
from selfseek.models.mla import MLA
from selfseek.models.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.is_mla else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos_sin, batch: AttnBatch, pool: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, batch, pool)
        return x + self.mlp(self.post_attention_layernorm(x))
