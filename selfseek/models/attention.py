"""Multi-head / grouped-query attention for the Llama-shaped family (DeepSeek-LLM, DeepSeek-Coder v1).

The paged cache of a layer is [slots, 2, k, d]: K and V per KV head.
Shape letters: T flat rows, b batch, s queries, t keys, k KV heads, g query heads per KV head, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from selfseek.config import ModelConfig
from selfseek.models.attention_backend import dense_attention, paged_attention
from selfseek.models.batch import AttnBatch
from selfseek.models.layers import RMSNorm, Rotary


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        hd, bias = cfg.hidden_size, cfg.attention_bias
        qkv_bias = bias or cfg.qkv_bias  # qwen2: q/k/v carry a bias, o does not
        self.q_proj = nn.Linear(hd, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hd, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hd, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hd, bias=bias)
        # qwen3: RMSNorm over each head of q and k, before rotary (HF names q_norm / k_norm)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = Rotary(cfg.rope, self.head_dim, interleaved=False)
        self.scale = cfg.softmax_scale()

    def new_pool(self, num_slots: int, dtype: torch.dtype, device) -> torch.Tensor:
        return torch.zeros(num_slots, 2, self.n_kv, self.head_dim, dtype=dtype, device=device)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        batch: AttnBatch,
        pool: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, m] (rows of many sequences, see models/batch.py) -> [T, m]."""
        T = x.shape[0]
        g = self.n_heads // self.n_kv
        q = self.q_proj(x).view(T, self.n_kv, g, self.head_dim)
        k = self.k_proj(x).view(T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, *cos_sin), self.rotary(k, *cos_sin)
        kv = torch.stack([k, self.v_proj(x).view(T, self.n_kv, self.head_dim)], dim=1)  # [T, 2, k, d]
        if pool is not None and batch.slot_mapping is not None:
            pool[batch.slot_mapping] = kv

        out = x.new_empty(T, self.n_kv, g, self.head_dim)
        for seg in batch.prefills:
            rows = slice(seg.q_start, seg.q_end)
            out[rows] = dense_attention(q[rows].flatten(1, 2), k[rows], kv[rows, 1], self.scale, seg.mask).view(
                -1, self.n_kv, g, self.head_dim)
        if (paged := batch.paged) is not None:
            if pool is None:
                raise ValueError("rows with cached context need the layer's KV pool")
            out[paged.start :] = paged_attention(q[paged.start :], pool[:, 0], pool[:, 1], paged, self.scale)
        return self.o_proj(out.reshape(T, self.n_heads * self.head_dim))
