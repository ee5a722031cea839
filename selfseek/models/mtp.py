"""Multi-token prediction module of DeepSeek-V3 (V3 paper §2.2), stored as `model.layers.{L}`.

Drafts tokens for speculative decoding (engine/speculative.py), trained by the MTP loss: given the main
model's output h_i (after its final norm, see CausalLM.mtp_hidden) and the embedding of t_{i+1}, it predicts
t_{i+2}:
    x = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])      (embedding first, as the serving engines do)
    logits = head(norm(Block(x)))
Emb and the output head are shared with the main model, so they are not stored twice here.
"""

from __future__ import annotations

import torch
from torch import nn

from selfseek.config import ModelConfig
from selfseek.models.decoder import DecoderLayer  # the MTP block is an ordinary decoder layer
from selfseek.models.layers import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, layer_idx)
        self.shared_head = SharedHead(cfg)

    def forward(
        self,
        hidden: torch.Tensor,
        next_embeds: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        batch,
        pool: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden, next_embeds [T, m] -> normed hidden [T, m]; apply the shared lm_head for logits."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        x = self.block(x, cos_sin, batch, pool)
        return self.shared_head.norm(x)
