"""Multi-head Latent Attention (DeepSeek-V2 paper §2.1, V3 paper §2.1.1).

Per token: c_KV = RMSNorm(W^DKV h)[:c], k^R = RoPE(W^DKV h)[c:]: the cache holds only these
kv_lora_rank + qk_rope_head_dim values. Two ways to attend over them, equal in exact arithmetic:

- expanded ("MHA mode", prefill): k^C, v = W^UKV c_KV per head, then ordinary attention with
  q = [q^C; q^R], k = [k^C; k^R] (SDPA); used for new tokens and for long chunks after a cached prefix.
- absorbed ("MQA mode", decode): W^UK folds into the query and W^UV into the output, so scores are
  q^C W^UK . c_KV + q^R . k^R and no per-head K/V is ever built (V2 paper §2.1.3); the attention itself is the
  block-table kernel (models/attention_backend.py) reading the latent cache in place, one KV head shared by all.

The paged cache holds kv_lora_rank + qk_rope_head_dim values per token per layer (576 for V3).

V3.2 (DeepSeek Sparse Attention): a lightning indexer (models/indexer.py) picks, per query, the index_topk
cached tokens it attends to; each pool row then also holds that token's indexer key (index_head_dim values
after the 576), so the indexer's cache shares the latent's block tables. Rows that see more than index_topk
keys attend only to their selection: masked in the expanded form, gathered in the absorbed one.
Shape letters: T flat rows, b batch, s queries, t keys, h heads, d nope/v head dim, r rope dim, c latent dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from selfseek import kernels
from selfseek.config import ModelConfig
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
from selfseek.models.indexer import Indexer
from selfseek.models.layers import RMSNorm, Rotary, fused_rows, run_linear
from selfseek.models.quant import QuantLinear


class HeadProduct(NamedTuple):
    """W^UK or W^UV as kernels.heads reads it: head h uses rows h * per_head + off .. + n of `weight` (`view`: its
    kernel view), transposed or not."""

    weight: kernels.Weight
    view: object
    per_head: int
    off: int
    n: int
    transposed: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        return kernels.heads(x, self.weight, self.per_head, self.off, self.n, self.transposed, self.view)


class MLA(nn.Module):
    # Chunks after a cached prefix with at least this many rows attend expanded (W^UKV applied to the context
    # once, then per-head attention, SDPA): per query row and key the absorbed form costs h (2c + r) multiply-adds,
    # the expanded one h (d + r + v) plus c h (d + v) per key shared by all rows, cheaper from ~50-170 rows
    # (medium V3 .. V3) on. Decodes and short chunks use the absorbed block-table kernel.
    EXPANDED_MIN_ROWS = 64

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
        self.indexer = Indexer(cfg) if cfg.has_indexer else None

    def new_pool(self, num_slots: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The paged cache of one layer: [slots, c + r (+ D)], the normalised latent, the roped key (and, V3.2,
        the indexer key). dtype float8_e4m3fn: uint8 rows of fp8 values and their scales (attention_backend)."""
        width = self.latent_dim + self.rope_dim + (self.indexer.head_dim if self.indexer is not None else 0)
        if dtype == FP8:
            if self.indexer is not None:
                raise ValueError("kv_cache_dtype fp8: not for V3.2 (the indexer keys have no fp8 layout yet)")
            return torch.zeros(num_slots, fp8_row_bytes(width), dtype=torch.uint8, device=device)
        return torch.zeros(num_slots, width, dtype=dtype, device=device)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        batch: AttnBatch,
        pool: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, m] (rows of many sequences, see models/batch.py) -> [T, m]."""
        T = x.shape[0]
        q_a, ckv = self._down_projections(x)
        q_c = q_a if self.q_lora_rank is None else self.q_a_layernorm(q_a)
        q = q_a if self.q_lora_rank is None else run_linear(self.q_b_proj, q_c)
        q_nope, q_rope = q.view(T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = self.rotary(q_rope, *cos_sin)

        latent, k_rope = ckv.split([self.latent_dim, self.rope_dim], dim=-1)
        kv = torch.cat([self.kv_a_layernorm(latent), self.rotary(k_rope, *cos_sin)], dim=-1)  # [T, c + r]
        dsa = None  # V3.2: (indexer queries [T, H, D], head weights [T, H], indexer keys [T, D])
        if self.indexer is not None:
            dsa = (*self.indexer.queries(q_c, x, cos_sin), self.indexer.keys(x, cos_sin).to(kv.dtype))
        if pool is not None and batch.slot_mapping is not None:
            row = kv if dsa is None else torch.cat([kv, dsa[2]], dim=-1)
            row = quantize_fp8(row) if pool.dtype == torch.uint8 else row if row.dtype == pool.dtype else row.to(
                pool.dtype)
            pool.index_copy_(0, batch.slot_mapping, row)

        paged = batch.paged
        if paged is not None and paged.start == 0 and pool is not None and dsa is None and (
                batch.decode_mode != "expanded"):
            n_long, rest = paged.split(self.EXPANDED_MIN_ROWS)
            if n_long == 0:  # every row reads the cache through the kernel (decodes, short chunks): no copy into `out`
                return run_linear(self.o_proj, self._attend_paged(q_nope, q_rope, pool, rest).flatten(1))
        out = x.new_empty(T, self.n_heads, self.v_dim)
        for seg in batch.prefills:
            rows = slice(seg.q_start, seg.q_end)
            mask = seg.mask if dsa is None else self._sparse_mask(seg.mask, *(t[rows] for t in dsa))
            out[rows] = self._attend_dense(q_nope[rows], q_rope[rows], kv[rows], mask)
        if (paged := batch.paged) is not None:
            if pool is None:
                raise ValueError("rows with cached context need the layer's KV pool")
            n_long, rest = (paged.num_seqs, None) if batch.decode_mode == "expanded" else paged.split(
                self.EXPANDED_MIN_ROWS)
            p, e = paged.start, (rest.start if rest is not None else T)
            if n_long:
                out[p:e] = self._attend_paged_expanded(
                    q_nope[p:e], q_rope[p:e], pool, paged, n_long, None if dsa is None else (dsa[0][p:e], dsa[1][p:e]))
            if rest is not None and dsa is not None and rest.max_context > self.indexer.topk:
                out[e:] = self._attend_paged_sparse(q_nope[e:], q_rope[e:], pool, rest, dsa[0][e:], dsa[1][e:])
            elif rest is not None:
                out[e:] = self._attend_paged(q_nope[e:], q_rope[e:], pool, rest)
        return run_linear(self.o_proj, out.flatten(1))

    # ---- projections ---------------------------------------------------------------------------------
    def _down_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (q_a_proj(x) or, without query compression, q_proj(x); kv_a_proj_with_mqa(x)): one GEMM when fused."""
        if self.q_lora_rank is None:
            return run_linear(self.q_proj, x), run_linear(self.kv_a_proj_with_mqa, x)
        fused = self._fused_down()
        if fused is None:
            return run_linear(self.q_a_proj, x), run_linear(self.kv_a_proj_with_mqa, x)
        return run_linear(fused, x).split([self.q_lora_rank, self.latent_dim + self.rope_dim], dim=-1)

    def _fused_down(self) -> nn.Module | None:
        """q_a_proj and kv_a_proj_with_mqa as one layer (row views of one weight; see layers.fused_rows)."""
        return fused_rows(self, (self.q_a_proj, self.kv_a_proj_with_mqa))

    # ---- attention -----------------------------------------------------------------------------------
    def _attend_dense(self, q_nope, q_rope, kv, mask) -> torch.Tensor:
        """New tokens among themselves, expanded ("MHA mode"): [s, h, d], [s, h, r], kv [s, c + r] -> [s, h, v]."""
        latent, k_rope = kv.split([self.latent_dim, self.rope_dim], dim=-1)
        s = latent.shape[0]
        kv_b = run_linear(self.kv_b_proj, latent).view(s, self.n_heads, -1)
        k_nope, v = kv_b.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(s, self.n_heads, self.rope_dim)], dim=-1)
        return dense_attention(q, k, v, self.scale, mask)

    def _per_kv_b(self, name: str, make: Callable[[], object]) -> object:
        """make()'s value, made again only when kv_b_proj's storage changes (a QuantLinear's `.weight` dequantizes
        on every read: its packed storage is the key)."""
        lin = self.kv_b_proj
        src = lin.qweight if isinstance(lin, QuantLinear) else lin.weight
        key = (src.data_ptr(), src._version)
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key:
            cached = (key, make())
            self.__dict__[name] = cached
        return cached[1]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK [h, d, c] and W^UV transposed, [h, c, v], split out of kv_b_proj, contiguous (both products are then
        plain batched GEMMs over the heads)."""
        def split() -> tuple[torch.Tensor, torch.Tensor]:
            w = self.kv_b_proj.weight.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.latent_dim)
            return w[:, : self.nope_dim].contiguous(), w[:, self.nope_dim :].transpose(1, 2).contiguous()

        return self._per_kv_b("_absorbed", split)

    def _kv_b_stored(self) -> tuple[kernels.Weight, object]:
        """kv_b_proj's weight as stored (a GGUF's q8 / K-quant rows, or float) and its kernel view: the CPU kernels
        read W^UK and W^UV from it per head (kernels.heads)."""
        def view() -> tuple[kernels.Weight, object]:
            lin = self.kv_b_proj
            w = lin.packed if isinstance(lin, QuantLinear) else lin.weight.detach()
            return w, kernels.prepare(w)

        return self._per_kv_b("_kv_b_view", view)

    def keep_split_kv_b(self, k_b: kernels.Weight, v_b: kernels.Weight) -> None:
        """A GGUF's attn_k_b [H c, d] and attn_v_b [H v, c] as the file packs them, kept by the loader beside
        kv_b_proj's float copy (W^UK's blocks run along d there, so they cannot fill kv_b_proj's rows): while
        kv_b_proj still holds the weights they were loaded with, the absorbed decode reads W^UK and W^UV from
        them, a quarter of the float copy's bytes for Q8_0."""
        w = self.kv_b_proj.weight
        self.__dict__["_split_kv_b"] = ((w.data_ptr(), w._version), (k_b, kernels.prepare(k_b)),
                                        (v_b, kernels.prepare(v_b)))

    def absorbed_products(self) -> tuple[HeadProduct, HeadProduct]:
        """W^UK and W^UV as the CPU kernels read them per head, from a GGUF's split halves (keep_split_kv_b) or
        kv_b_proj as stored."""
        d, v, c = self.nope_dim, self.v_dim, self.latent_dim
        split, lin = self.__dict__.get("_split_kv_b"), self.kv_b_proj
        if (split is not None and not isinstance(lin, QuantLinear)
                and split[0] == (lin.weight.data_ptr(), lin.weight._version)):
            (k_b, k_view), (v_b, v_view) = split[1:]
            return HeadProduct(k_b, k_view, c, 0, c, False), HeadProduct(v_b, v_view, v, 0, v, False)
        w, view = self._kv_b_stored()
        return HeadProduct(w, view, d + v, 0, d, True), HeadProduct(w, view, d + v, d, v, False)

    def _attend_paged(self, q_nope, q_rope, pool, rows: PagedRows) -> torch.Tensor:
        """Absorbed ("MQA mode") through the block tables: scores q^C W^UK . c_KV + q^R . k^R, output in the
        latent space, then W^UV. [R, h, d], [R, h, r] -> [R, h, v]. On a CPU with the kernels, W^UK and W^UV are
        read per head as stored (absorbed_products: a q8 GGUF's bytes, a quarter of float copies', and no batched
        GEMMs of one row); elsewhere they are float copies multiplied by bmm."""
        stored = self.absorbed_products() if kernels.available() and q_nope.device.type == "cpu" else None
        q_latent = stored[0](q_nope) if stored else None
        if q_latent is None:
            stored = None
            w_uk, w_uv_t = self.absorbed_weights()
            q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # W^UK absorbed into the query
        if q_rope.dtype != q_latent.dtype:
            q_rope = q_rope.to(q_latent.dtype)
        R, h = q_latent.shape[:2]
        q = torch.cat([q_latent, q_rope], dim=-1).view(R, 1, h, -1)  # [R, 1, h, c + r]: one KV head
        k_cache, v_cache, scales = self._cache_views(pool)
        o_latent = paged_attention(q, k_cache, v_cache, rows, self.scale, scales).view(R, h, -1)
        if stored:
            return stored[1](o_latent)
        if o_latent.dtype != w_uv_t.dtype:
            o_latent = o_latent.to(w_uv_t.dtype)
        return torch.bmm(o_latent.transpose(0, 1), w_uv_t).transpose(0, 1)  # W^UV absorbed after attention

    def _cache_views(self, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """(K [slots, 1, c + r], V [slots, 1, c], fp8 scales or None) views of a layer's pool for paged_attention.
        Kept on the pool tensor (it lives as long as they do): every decode step asks, once per layer."""
        views = pool.__dict__.get("_mla_views")
        key = (self.latent_dim, self.rope_dim, pool.data_ptr(), pool.shape)  # a pool resized in place moves
        if views is None or views[0] != key:
            kv_width = self.latent_dim + self.rope_dim  # V3.2 pools hold the indexer key after these
            scales = None  # an fp8 cache: K and V read the same row, so the same scales
            if pool.dtype == torch.uint8:
                scales = (fp8_scales(pool, kv_width)[:, None],) * 2
            views = (key, pool[:, None, :kv_width], pool[:, None, : self.latent_dim],
                     scales)
            pool.__dict__["_mla_views"] = views
        return views[1:]

    def _attend_paged_expanded(
        self, q_nope, q_rope, pool, rows: PagedRows, num_seqs: int, dsa: tuple | None = None
    ) -> torch.Tensor:
        """The expanded form over the gathered context of the first `num_seqs` sequences of `rows` (their query
        rows only): for long chunks after a cached prefix, and the reference the absorbed path must equal.
        dsa: V3.2's indexer queries and head weights of these rows (keys outside their selection are masked)."""
        slots, cu, lens = rows.context_slots(), rows.cu_q.tolist(), rows.context_lens.tolist()
        out = []
        for i, n_ctx in enumerate(lens[:num_seqs]):
            q_rows = slice(cu[i], cu[i + 1])
            n = cu[i + 1] - cu[i]
            ctx = pool[slots[i, :n_ctx].to(pool.device)]
            if pool.dtype == torch.uint8:  # an fp8 cache (never V3.2)
                ctx = dequantize_fp8(ctx, self.latent_dim + self.rope_dim)
            ctx = ctx.to(q_nope.dtype)  # a cache stored narrower than the compute dtype
            latent, k_rope, index_keys = ctx.split([self.latent_dim, self.rope_dim, ctx.shape[1] - self.latent_dim
                                                    - self.rope_dim], dim=-1)
            kv = run_linear(self.kv_b_proj, latent).view(n_ctx, self.n_heads, -1)
            k_nope, v = kv.split([self.nope_dim, self.v_dim], -1)
            q = torch.cat([q_nope[q_rows], q_rope[q_rows]], dim=-1)
            k = torch.cat([k_nope, k_rope[:, None].expand(n_ctx, self.n_heads, self.rope_dim)], dim=-1)
            visible = torch.arange(n_ctx, device=pool.device)[None, :] <= torch.arange(
                n_ctx - n, n_ctx, device=pool.device)[:, None]
            if dsa is not None:
                selected = self.indexer.mask(dsa[0][q_rows], dsa[1][q_rows], index_keys)
                visible = visible if selected is None else selected
            out.append(dense_attention(q, k, v, self.scale, visible))
        return torch.cat(out)

    # ---- V3.2 sparse attention -----------------------------------------------------------------------------
    def _sparse_mask(self, mask: torch.Tensor | None, iq, iw, index_keys) -> torch.Tensor | None:
        """A prefill segment's mask (None: causal; else bool or additive [s, s]) narrowed to the indexer's picks."""
        visible = None if mask is None else (mask if mask.dtype == torch.bool else mask > float("-inf"))
        selected = self.indexer.mask(iq, iw, index_keys, visible)
        if selected is None or mask is None or mask.dtype == torch.bool:
            return mask if selected is None else selected
        return mask.masked_fill(~selected, float("-inf"))

    def _attend_paged_sparse(self, q_nope, q_rope, pool, rows: PagedRows, iq, iw) -> torch.Tensor:
        """Absorbed ("MQA mode") over each row's selected keys only (DSA's decode: index_topk keys per row,
        whatever the context). The picks become a block table of one-slot blocks per row, each row its own
        sequence, so the paged kernel reads them in place. [R, h, d], [R, h, r] -> [R, h, v]."""
        kv_width = self.latent_dim + self.rope_dim
        slots, cu, lens = rows.context_slots(), rows.cu_q.tolist(), rows.context_lens.tolist()
        k = min(self.indexer.topk, rows.max_context)
        picked = torch.zeros(rows.num_rows, k, dtype=torch.int32)
        n_picked = torch.zeros(rows.num_rows, dtype=torch.int32)
        for i, n_ctx in enumerate(lens):
            q_rows = slice(cu[i], cu[i + 1])
            ctx_slots = slots[i, :n_ctx]
            idx, ok = self.indexer.select(iq[q_rows], iw[q_rows], pool[ctx_slots.to(pool.device), kv_width:])
            # picks come best first, so a row's valid ones (those it may see) lead
            picked[q_rows, : idx.shape[1]] = ctx_slots[idx.cpu()].to(torch.int32)
            n_picked[q_rows] = ok.sum(dim=1, dtype=torch.int32).cpu()
        per_row = PagedRows(rows.start, torch.arange(rows.num_rows + 1, dtype=torch.int32), n_picked, picked, 1, k)
        return self._attend_paged(q_nope, q_rope, pool, per_row)
