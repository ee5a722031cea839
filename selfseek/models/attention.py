"""Multi-head / grouped-query attention for the Llama-shaped family (DeepSeek-LLM, DeepSeek-Coder v1).

The paged cache of a layer is [slots, 2, k, d]: K and V per KV head.
Shape letters: T flat rows, b batch, s queries, t keys, k KV heads, g query heads per KV head, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from selfseek.config import ModelConfig
from selfseek.models.batch import AttnBatch
from selfseek.models.layers import Rotary


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
        q = self.rotary(self.q_proj(x).view(T, self.n_kv, g, self.head_dim), *cos_sin)
        k = self.rotary(self.k_proj(x).view(T, self.n_kv, self.head_dim), *cos_sin)
        kv = torch.stack([k, self.v_proj(x).view(T, self.n_kv, self.head_dim)], dim=1)  # [T, 2, k, d]
        if pool is not None and batch.slot_mapping is not None:
            pool[batch.slot_mapping] = kv

        out = x.new_empty(T, self.n_kv, g, self.head_dim)
        for seg in batch.prefills:
            rows = slice(seg.q_start, seg.q_end)
            ctx = kv[rows] if seg.prefix_slots is None else torch.cat([pool[seg.prefix_slots], kv[rows]])
            mask = None if seg.mask is None else seg.mask[None]
            out[rows] = self._attend(q[rows][None], ctx[None], mask)[0]
        d = batch.decode_start
        if d < T:
            out[d:] = self._attend(q[d:, None], pool[batch.decode_slots], batch.decode_mask)[:, 0]
        return self.o_proj(out.reshape(T, self.n_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [b, s, k, g, d], ctx [b, t, 2, k, d], mask [b, s, t] -> [b, s, k, g, d]."""
        k, v = ctx.unbind(dim=2)
        scores = torch.einsum("bskgd,btkd->bskgt", q, k) * self.scale
        if mask is not None:
            scores = scores + mask[:, :, None, None, :]
        p = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.einsum("bskgt,btkd->bskgd", p, v)
