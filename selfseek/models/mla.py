"""Multi-head Latent Attention (DeepSeek-V2 paper §2.1, V3 paper §2.1.1).

Per token: c_KV = RMSNorm(W^DKV h)[:c], k^R = RoPE(W^DKV h)[c:]: the cache holds only these
kv_lora_rank + qk_rope_head_dim values. Two ways to attend over them, equal in exact arithmetic:

- expanded ("MHA mode", prefill): k^C, v = W^UKV c_KV per head, then ordinary attention with
  q = [q^C; q^R], k = [k^C; k^R].
- absorbed ("MQA mode", decode): W^UK folds into the query and W^UV into the output, so scores are
  q^C W^UK . c_KV + q^R . k^R and no per-head K/V is ever built (V2 paper §2.1.3).

Shape letters: b batch, s queries, t keys, h heads, d nope/v head dim, r rope dim, c latent dim.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from selfseek.config import ModelConfig
from selfseek.models.layers import RMSNorm, Rotary

AttnMode = Literal["auto", "expanded", "absorbed"]


class LatentCache:
    """Contiguous per-layer latent cache: c_KV [b, T, c] and roped k^R [b, T, r]."""

    def __init__(self, batch: int, max_len: int, cfg: ModelConfig, dtype: torch.dtype, device):
        self.latent = torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.rope = torch.zeros(batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def update(self, start: int, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + latent.shape[1]
        self.latent[:, start:end] = latent
        self.rope[:, start:end] = k_rope
        return self.latent[:, :end], self.rope[:, :end]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent_dim = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        hd, qk = cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank is None:  # V2-Lite: no query compression
            self.q_proj = nn.Linear(hd, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hd, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hd, self.latent_dim + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.latent_dim, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, hd, bias=False)
        self.rotary = Rotary(cfg.rope, self.rope_dim, interleaved=cfg.rope_interleave)
        self.scale = cfg.softmax_scale()

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LatentCache | None = None,
        start_pos: int = 0,
        mode: AttnMode = "auto",
    ) -> torch.Tensor:
        b, s, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = self.rotary(q_rope, *cos_sin)

        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = self.rotary(k_rope, *cos_sin)  # one rope key shared by all heads
        if cache is not None:
            latent, k_rope = cache.update(start_pos, latent, k_rope)

        if mode == "auto":
            mode = "expanded" if s > 1 else "absorbed"
        if mode == "expanded":
            o = self._attend_expanded(q_nope, q_rope, latent, k_rope, mask)
        else:
            o = self._attend_absorbed(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(o.flatten(2))

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        dtype = scores.dtype
        scores = scores * self.scale
        if mask is not None:
            scores = scores + mask[:, None, :]  # mask [s, t] -> [s, h, t]
        return scores.softmax(dim=-1, dtype=torch.float32).to(dtype)

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        b, t, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, t, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        scores = torch.einsum("bshd,bthd->bsht", q_nope, k_nope) + torch.einsum("bshr,btr->bsht", q_rope, k_rope)
        p = self._softmax(scores, mask)
        return torch.einsum("bsht,bthd->bshd", p, v)

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.latent_dim)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W^UK absorbed into the query
        scores = torch.einsum("bshc,btc->bsht", q_latent, latent) + torch.einsum("bshr,btr->bsht", q_rope, k_rope)
        p = self._softmax(scores, mask)
        o_latent = torch.einsum("bsht,btc->bshc", p, latent)
        return torch.einsum("bshc,hdc->bshd", o_latent, w_uv)  # W^UV absorbed after attention
