"""Multi-head / grouped-query attention for the Llama-shaped family (DeepSeek-LLM, DeepSeek-Coder v1).

Shape letters: b batch, s queries, t keys, k KV heads, g query heads per KV head, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from selfseek.config import ModelConfig
from selfseek.models.layers import Rotary


class KVCache:
    """Contiguous per-layer cache of K and V per KV head: [b, T, k, d] each."""

    def __init__(self, batch: int, max_len: int, cfg: ModelConfig, dtype: torch.dtype, device):
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        hd, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(hd, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hd, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hd, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hd, bias=bias)
        self.rotary = Rotary(cfg.rope, self.head_dim, interleaved=False)
        self.scale = cfg.softmax_scale()

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        start_pos: int = 0,
        mode: str = "auto",
    ) -> torch.Tensor:
        b, s, _ = x.shape
        g = self.n_heads // self.n_kv
        q = self.rotary(self.q_proj(x).view(b, s, self.n_kv, g, self.head_dim), *cos_sin)
        k = self.rotary(self.k_proj(x).view(b, s, self.n_kv, self.head_dim), *cos_sin)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        scores = torch.einsum("bskgd,btkd->bskgt", q, k) * self.scale
        if mask is not None:
            scores = scores + mask[:, None, None, :]
        p = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.einsum("bskgt,btkd->bskgd", p, v)
        return self.o_proj(o.reshape(b, s, self.n_heads * self.head_dim))
