"""Multi-head / grouped-query attention for the Llama-shaped family (DeepSeek-LLM, DeepSeek-Coder v1).

The paged cache of a layer is [slots, 2, k, d]: K and V per KV head; with `kv_cache_dtype fp8`, uint8
[slots, 2, k, fp8 row bytes]: each head's K or V as float8_e4m3fn rows with their scales (attention_backend).
Shape letters: T flat rows, b batch, s queries, t keys, k KV heads, g query heads per KV head, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from selfseek.config import ModelConfig
from selfseek.kernels.fused_ops import rope
from selfseek.models.attention_backend import (
    FP8,
    dense_attention,
    dequantize_fp8,
    fp8_row_bytes,
    fp8_scales,
    paged_attention,
    quantize_fp8,
)
from selfseek.models.batch import AttnBatch, PagedRows
from selfseek.models.layers import RMSNorm, Rotary, fused_rows, run_linear


class Attention(nn.Module):
    GATHER_MIN_ROWS = 64  # a chunk this long after a cached prefix attends through SDPA (see _attend_gathered)

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
        if dtype == FP8:
            return torch.zeros(num_slots, 2, self.n_kv, fp8_row_bytes(self.head_dim), dtype=torch.uint8, device=device)
        return torch.zeros(num_slots, 2, self.n_kv, self.head_dim, dtype=dtype, device=device)

    def _paged_views(self, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """(K [slots, k, d], V [slots, k, d], fp8 (K, V) scales or None) of the pool, for paged_attention.
        Kept on the pool tensor (it lives as long as they do): every decode step asks, once per layer."""
        d = self.head_dim
        views = pool.__dict__.get("_gqa_views")
        key = (d, pool.data_ptr(), pool.shape)  # a pool resized in place moves
        if views is None or views[0] != key:
            if pool.dtype != torch.uint8:
                views = (key, pool[:, 0], pool[:, 1], None)
            else:
                scales = fp8_scales(pool, d)  # [slots, 2, k, tiles]
                views = (key, pool[:, 0, :, :d], pool[:, 1, :, :d], (scales[:, 0], scales[:, 1]))
            pool.__dict__["_gqa_views"] = views
        return views[1:]

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
        h, d = self.n_heads, self.head_dim
        fused = fused_rows(self, (self.q_proj, self.k_proj, self.v_proj))
        kv = None  # [T, 2, k, d]: K and V of the new rows, the pool's row layout
        if fused is not None and self.q_norm is None:
            qkv = run_linear(fused, x)
            # q and k are adjacent columns of the fused output: one rotary over both sets of heads
            qk = qkv[:, : (h + self.n_kv) * d].view(T, h + self.n_kv, d)
            if rope(qk, *cos_sin, self.rotary.interleaved, out=qk) is not None:  # in place, one kernel call
                kv = qkv[:, h * d :].view(T, 2, self.n_kv, d)  # k (roped in place), then v: no stacked copy
            else:
                qk = self.rotary(qk, *cos_sin)
                k, v = qk[:, h:], qkv[:, (h + self.n_kv) * d :]
            q = qk[:, :h].view(T, self.n_kv, g, d)
        else:
            if fused is None:
                q, k, v = run_linear(self.q_proj, x), run_linear(self.k_proj, x), run_linear(self.v_proj, x)
            else:
                q, k, v = run_linear(fused, x).split([h * d, self.n_kv * d, self.n_kv * d], dim=-1)
            q, k = q.reshape(T, self.n_kv, g, d), k.reshape(T, self.n_kv, d)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(q, *cos_sin), self.rotary(k, *cos_sin)
        if kv is None:
            kv = torch.stack([k, v.reshape(T, self.n_kv, d)], dim=1)
        if pool is not None and batch.slot_mapping is not None:
            stored = quantize_fp8(kv.reshape(-1, d)).view(T, 2, self.n_kv, -1) if pool.dtype == torch.uint8 else kv
            pool.index_copy_(0, batch.slot_mapping, stored if stored.dtype == pool.dtype else stored.to(pool.dtype))

        paged = batch.paged
        if paged is not None and pool is None:
            raise ValueError("rows with cached context need the layer's KV pool")
        n_long, rest = paged.split(self.GATHER_MIN_ROWS) if paged is not None else (0, None)
        if rest is not None and rest.start == 0:  # every row reads the cache in place (decode): no copy into `out`
            k_cache, v_cache, scales = self._paged_views(pool)
            out = paged_attention(q, k_cache, v_cache, rest, self.scale, scales)
            return run_linear(self.o_proj, out.reshape(T, self.n_heads * self.head_dim))
        out = x.new_empty(T, self.n_kv, g, self.head_dim)
        for seg in batch.prefills:
            rows = slice(seg.q_start, seg.q_end)
            out[rows] = dense_attention(q[rows].flatten(1, 2), kv[rows, 0], kv[rows, 1], self.scale, seg.mask).view(
                -1, self.n_kv, g, self.head_dim)
        e = rest.start if rest is not None else T
        if n_long:
            out[paged.start : e] = self._attend_gathered(q[paged.start : e], pool, paged, n_long)
        if rest is not None:
            k_cache, v_cache, scales = self._paged_views(pool)
            out[e:] = paged_attention(q[e:], k_cache, v_cache, rest, self.scale, scales)
        return run_linear(self.o_proj, out.reshape(T, self.n_heads * self.head_dim))

    def _attend_gathered(self, q: torch.Tensor, pool: torch.Tensor, rows: PagedRows, num_seqs: int) -> torch.Tensor:
        """Long chunks after a cached prefix (the first `num_seqs` sequences of `rows`): their context gathered
        once and attended with SDPA, a GEMM over all their query rows, where the paged kernel would read the
        whole context again for every row. q [n, k, g, d] -> [n, k, g, d]."""
        slots, cu, lens = rows.context_slots(), rows.cu_q.tolist(), rows.context_lens.tolist()
        out = []
        for i, n_ctx in enumerate(lens[:num_seqs]):
            n = cu[i + 1] - cu[i]
            ctx = pool[slots[i, :n_ctx].to(pool.device)]  # [t, 2, k, d]
            ctx = (dequantize_fp8(ctx, self.head_dim) if pool.dtype == torch.uint8 else ctx).to(q.dtype)
            visible = torch.arange(n_ctx, device=q.device)[None, :] <= torch.arange(
                n_ctx - n, n_ctx, device=q.device)[:, None]
            out.append(dense_attention(q[cu[i] : cu[i + 1]].flatten(1, 2), ctx[:, 0], ctx[:, 1], self.scale, visible))
        return torch.cat(out).view(q.shape)
