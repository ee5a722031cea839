"""DeepSeek-V4 (V4-Flash, V4-Pro): hybrid compressed attention, hyper-connections, hash-routed MoE.

Per layer (config.v4.layer_types), attention over one shared KV head (K = V, head_dim D, the last r values roped):
- sliding_attention: each query sees the last `sliding_window` (W) tokens, itself included;
- compressed_sparse_attention (CSA, m = compress_rate_csa): plus compressed entries, one per m tokens, each a
  softmax-gated sum over 2m tokens (window w's "Cb" half and window w-1's "Ca" half); a lightning indexer over
  entries compressed the same way at index_head_dim picks the index_topk entries each query attends;
- heavily_compressed_attention (HCA, m' = compress_rate_hca): plus every compressed entry, one per m' tokens.
Query p sees entry w once its window is complete: w < (p + 1) // m. With K = V the output's rope slice is rotated
back by -p. Per-head sinks s_h join each softmax's denominator: a = exp(z) / (sum exp(z) + exp(s_h)).

    q = RoPE(RMSNorm_unweighted(W^{QB} c^Q)) per head,   c^Q = RMSNorm(W^{QA} x)
    kv = RoPE(RMSNorm(W^{KV} x))
    entry_w = RoPE_c(RMSNorm(sum_j softmax_j(Z_j + B_j) * C_j)),   C = W^{KV}_c x, Z = W^{Z}_c x  (per channel)
    I[p, w] = sum_h w_h(x_p) / sqrt(H) * ReLU(q^I_{p,h} . k^I_w) / sqrt(D^I)     (indexer, CSA only)
    out = W^{OB} [W^{OA}_g o_g]_g                       grouped low-rank output projection (o_groups groups)

Residual stream: hc_mult streams X [n, m] mixed by manifold-constrained hyper-connections (mHC) around each block:
    pre, post, comb = from X (one linear layer over the normed flattened streams); comb made doubly stochastic by
    Sinkhorn-Knopp; block input = sum_j pre_j X_j; X'_k = post_k * Block(input) + sum_j comb[j, k] X_j
and a last weighted collapse (hc_head) before the final norm.
MoE: scores sqrt(softplus(z)); experts top-k of score + bias (noaux_tc) or, in hash_moe layers, tid2eid[token];
weights = normalised scores of the chosen experts x routed_scaling_factor; experts' SwiGLU clamped at swiglu_limit.

The cache (engine): one pool row per token and layer, addressed through the block tables like every other family,
holding the token's KV and the compressors' raw inputs (C, Z); the compressed entries (+ indexer keys) are paged
by groups of ENTRY_GROUP (16) aligned rows: a group's memory holds its 16 tokens' values, then the ceil(16 / m)
entries of the windows ending in it. A group lies inside one block (block_size a multiple of 16, checked), so
everything is a function of the sequence's blocks: prefix caching, preemption and rejected drafts need nothing
special.
Module names follow transformers' DeepseekV4ForCausalLM; `checkpoint_name` maps the released checkpoints' names
(and transformers' saved ones) onto them. The released FP8 dense weights and FP4 routed experts (`X.scale` beside
`X.weight`) stay packed on a CPU (weights/safetensors.py; `pack_experts` gives the experts their packed stacks).
Shape letters: T flat rows, s queries, t keys, h heads, d head dim, w windows, j slots of a window, g groups.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfseek.config import ModelConfig, V4Config
from selfseek.models.batch import AttnBatch, build_batch
from selfseek.models.layers import RMSNorm, Rotary
from selfseek.models.quant import Bits, QuantStack, can_quantize

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_tail(rot: Rotary, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the last r values of x ([nope | rope] layout); cos/sin [T, r/2] broadcast over heads."""
    r = 2 * cos.shape[-1]
    return torch.cat([x[..., :-r], rot(x[..., -r:], cos, sin)], dim=-1)


class Compressor(nn.Module):
    """Compresses every `rate` tokens into one entry of width `dim` (CSA: overlapping 2-window form)."""

    def __init__(self, cfg: ModelConfig, dim: int, rate: int, overlap: bool):
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        width = (2 if overlap else 1) * dim
        self.kv_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, cfg.rms_norm_eps)

    @property
    def raw_width(self) -> int:
        """Values per token the compressor reads later: C and Z."""
        return 2 * self.kv_proj.out_features

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, m] -> [T, 2 * width]: C then Z, what the cache keeps per token until its windows are compressed."""
        return torch.cat([self.kv_proj(x), self.gate_proj(x)], dim=-1)

    def compress(self, raw: torch.Tensor, w0: int, has_prev: bool, rot: Rotary) -> torch.Tensor:
        """Entries of windows w0 .. w0 + n - 1 from the raw rows of their tokens ([n * rate, 2 * width]; CSA with
        `has_prev`: window w0 - 1's rows first) -> [n, dim], roped at positions w * rate."""
        c, z = raw.float().view(-1, self.rate, raw.shape[-1]).chunk(2, dim=-1)  # [w, j, width]
        z = z + self.position_bias.float()
        if self.overlap:  # slots: window w-1's Ca half, then window w's Cb half; no window -1 (weight 0)
            d = self.dim
            if not has_prev:
                c = torch.cat([c.new_zeros(1, *c.shape[1:]), c])
                z = torch.cat([z.new_full((1, *z.shape[1:]), float("-inf")), z])
            c = torch.cat([c[:-1, :, :d], c[1:, :, d:]], dim=1)  # [n, 2j, d]
            z = torch.cat([z[:-1, :, :d], z[1:, :, d:]], dim=1)
        entries = self.kv_norm(torch.einsum("wjd,wjd->wd", z.softmax(dim=1), c).to(raw.dtype))
        pos = (w0 + torch.arange(entries.shape[0], device=raw.device)) * self.rate
        return rope_tail(rot, entries, *rot.cos_sin(pos))


class IndexerScorer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weights_proj = nn.Linear(cfg.hidden_size, cfg.index_n_heads, bias=False)


class V4Indexer(Compressor):
    """The lightning indexer of a CSA layer: its own compressor at index_head_dim for the keys, queries from c^Q."""

    def __init__(self, cfg: ModelConfig, rate: int):
        super().__init__(cfg, cfg.index_head_dim, rate, overlap=True)
        self.n_heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.dim, bias=False)
        self.scorer = IndexerScorer(cfg)

    def queries(self, q_compressed: torch.Tensor, x: torch.Tensor, rot: Rotary, cos_sin) -> tuple:
        """-> (q^I [T, H, D^I] fp32 roped, head weights [T, H] fp32)."""
        q = self.q_b_proj(q_compressed).view(x.shape[0], self.n_heads, self.dim)
        w = F.linear(x.float(), self.scorer.weights_proj.weight.float()) * self.n_heads**-0.5
        return rope_tail(rot, q, *cos_sin).float(), w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
               visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [s, H, D], w [s, H], keys [t, D], visible [s, t] -> the top-k visible entries of each row: (indices
        [s, k], valid [s, k]), k = min(index_topk, t); a row seeing fewer than k has its other picks invalid."""
        per_head = F.relu(torch.einsum("shd,td->sht", q, keys.float())) * self.dim**-0.5
        scores = torch.einsum("sh,sht->st", w, per_head).masked_fill(~visible, float("-inf"))
        top = scores.topk(min(self.topk, keys.shape[0]), dim=-1)
        return top.indices, top.values > float("-inf")


@dataclass
class _Seq:
    """One sequence of the batch: its query rows, first new position, and where its values live (a pool, or the
    batch's own rows: groups of one row): position p's slot is index[p], its values tokens[slot // g, slot % g] and
    the entry of a window ending at p entries[slot // g, (p % g) // rate]."""

    rows: slice
    start: int
    index: torch.Tensor
    tokens: torch.Tensor  # [groups, g, token values]
    entries: torch.Tensor | None  # [groups, entries per group, entry values]
    g: int
    rate: int

    @property
    def end(self) -> int:
        return self.start + self.rows.stop - self.rows.start

    def read(self, pos: torch.Tensor, cols: slice) -> torch.Tensor:
        slot = self.index[pos]
        return self.tokens[slot // self.g, slot % self.g, cols]

    def entry_cells(self, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(group, entry) indices of the windows ending at positions `ends`."""
        return self.index[ends] // self.g, (ends % self.g) // self.rate

    def read_entries(self, ends: torch.Tensor, cols: slice) -> torch.Tensor:
        return self.entries[(*self.entry_cells(ends), cols)]


class V4Attention(nn.Module):
    SCORE_BUDGET = 1 << 24  # attention / index scores held at once (fp32 values: 64 MB)
    ENTRY_GROUP = 16  # pool rows whose spare columns share the compressed entries of windows ending in them

    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        v4: V4Config = cfg.v4
        self.layer_type = layer_type
        self.n_heads, self.head_dim, self.window = cfg.num_attention_heads, cfg.head_dim, v4.sliding_window
        self.o_groups, self.eps = v4.o_groups, cfg.rms_norm_eps
        hd, d = cfg.hidden_size, cfg.head_dim
        self.q_a_proj = nn.Linear(hd, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * d, bias=False)
        self.kv_proj = nn.Linear(hd, d, bias=False)
        self.kv_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.o_a_proj = nn.Linear(self.n_heads * d // v4.o_groups, v4.o_groups * v4.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(v4.o_groups * v4.o_lora_rank, hd, bias=False)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads))
        self.rate = v4.compress_rate(layer_type)
        self.compressor = Compressor(cfg, d, self.rate, overlap=layer_type == CSA) if self.rate else None
        if layer_type == CSA:
            self.compressor.indexer = V4Indexer(cfg, self.rate)
        # sliding-only layers rope with the plain "main" rotary, compressed ones (and their compressors) with YaRN
        self.rotary = Rotary(v4.compress_rope if self.rate else cfg.rope, cfg.qk_rope_head_dim, interleaved=True)
        self.scale = d**-0.5
        self._layout()

    @property
    def indexer(self) -> V4Indexer | None:
        return getattr(self.compressor, "indexer", None)

    def _layout(self) -> None:
        """A token's values: KV | compressor C, Z | indexer C, Z (`token_width`); an entry's: entry | indexer entry
        (`entry_width`). A pool row is `row_width` = token_width + group_cols values: the memory of ENTRY_GROUP
        (G) rows holds their G tokens' values, then the ceil(G / m) entries of the windows ending in them."""
        widths = [("kv", self.head_dim)]
        if self.compressor is not None:
            widths.append(("raw", self.compressor.raw_width))
        if self.indexer is not None:
            widths.append(("iraw", self.indexer.raw_width))
        self.cols, at = {}, 0
        for name, w in widths:
            self.cols[name], at = slice(at, at + w), at + w
        self.token_width = at
        self.entry_width = (self.head_dim if self.rate else 0) + (self.indexer.dim if self.indexer is not None else 0)
        self.entry_cols = {"entry": slice(0, self.head_dim), "ientry": slice(self.head_dim, self.entry_width)}
        g = self.ENTRY_GROUP
        self.group_cols = -(-(-(-g // self.rate) * self.entry_width) // g) if self.rate else 0
        self.row_width = at + self.group_cols

    def new_pool(self, num_slots: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Rows of ENTRY_GROUP consecutive slots must hold consecutive positions of one sequence, aligned
        (slot % ENTRY_GROUP == position % ENTRY_GROUP): the engine's blocks, when block_size is a multiple of it."""
        if num_slots % self.ENTRY_GROUP:
            raise ValueError(f"num_slots ({num_slots}) of a DeepSeek-V4 pool must be a multiple of {self.ENTRY_GROUP}")
        return torch.zeros(num_slots, self.row_width, dtype=dtype, device=device)

    def _views(self, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A pool's (token values [groups, G, token_width], entries [groups, ceil(G / m), entry_width] or None):
        each group's G rows are one stretch of memory, its token values first, then its entries."""
        g = self.ENTRY_GROUP
        flat = pool.view(-1, g * self.row_width)
        tokens = flat[:, : g * self.token_width].view(-1, g, self.token_width)
        if not self.rate:
            return tokens, None
        n = -(-g // self.rate)
        at = g * self.token_width
        return tokens, flat[:, at : at + n * self.entry_width].view(-1, n, self.entry_width)

    def _sequences(self, batch: AttnBatch, pool: torch.Tensor | None, local: torch.Tensor) -> list[_Seq]:
        """The batch's sequences over the pool's views, or (prefills without a pool) over the batch's own rows."""
        m, g = self.rate or 1, self.ENTRY_GROUP
        out = []
        for seg in batch.prefills:
            rows = slice(seg.q_start, seg.q_end)
            if pool is None or batch.slot_mapping is None:  # groups of one row; entries in their own tensor
                n = seg.q_end - seg.q_start
                entries = local.new_zeros(n, 1, self.entry_width) if self.rate else None
                out.append(_Seq(rows, 0, torch.arange(n, device=local.device), local[rows, None], entries, 1, m))
            else:
                out.append(_Seq(rows, 0, batch.slot_mapping[rows], *self._views(pool), g, m))
        if (paged := batch.paged) is not None:
            if pool is None:
                raise ValueError("rows with cached context need the layer's KV pool")
            views = self._views(pool)
            slots, cu, lens = paged.context_slots().to(pool.device), paged.cu_q.tolist(), paged.context_lens.tolist()
            for i, n_ctx in enumerate(lens):
                rows = slice(paged.start + cu[i], paged.start + cu[i + 1])
                out.append(_Seq(rows, n_ctx - (cu[i + 1] - cu[i]), slots[i, :n_ctx], *views, g, m))
        return out

    def forward(self, x: torch.Tensor, cos_sin: dict, batch: AttnBatch,
                pool: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, m] -> [T, m]; cos_sin: {"main": ..., "compress": ...} at the rows' positions."""
        T, h, d = x.shape[0], self.n_heads, self.head_dim
        cs = cos_sin["compress" if self.rate else "main"]
        q_c = self.q_a_norm(self.q_a_proj(x))
        q = rope_tail(self.rotary, unweighted_rms_norm(self.q_b_proj(q_c).view(T, h, d), self.eps), *cs)
        kv = rope_tail(self.rotary, self.kv_norm(self.kv_proj(x)), *cs)
        parts = [kv]
        if self.compressor is not None:
            parts.append(self.compressor.raw(x))
        if self.indexer is not None:
            parts.append(self.indexer.raw(x))
        local = torch.cat(parts, dim=-1)
        if pool is not None and batch.slot_mapping is not None:
            slots, g = batch.slot_mapping, self.ENTRY_GROUP
            self._views(pool)[0][slots // g, slots % g] = local.to(pool.dtype)
        iq = self.indexer.queries(q_c, x, self.rotary, cs) if self.indexer is not None else None
        out = x.new_empty(T, h, d)
        for seq in self._sequences(batch, pool, local):
            if self.compressor is not None:
                self._compress_new_windows(seq)
            out[seq.rows] = self._attend(seq, q[seq.rows], None if iq is None else (iq[0][seq.rows], iq[1][seq.rows]))
        out = rope_tail(self.rotary, out, cs[0], -cs[1])  # K = V: rotate the output's rope slice back by -p
        grouped = out.reshape(T, self.o_groups, -1)
        w_a = self.o_a_proj.weight.view(self.o_groups, -1, grouped.shape[-1])  # [g, r, h d / g]
        return self.o_b_proj(torch.einsum("tgk,grk->tgr", grouped, w_a.to(grouped.dtype)).flatten(1))

    def _compress_new_windows(self, seq: _Seq) -> None:
        """Entries of the windows the sequence's new tokens complete, stored in the group of each one's last token."""
        m = self.rate
        w0, w1 = seq.start // m, seq.end // m
        if w1 <= w0:
            return
        dev = seq.index.device
        entries = []
        for comp, raw_cols in ((self.compressor, "raw"), (self.indexer, "iraw")):
            if comp is None:
                continue
            has_prev = comp.overlap and w0 > 0
            raw = seq.read(torch.arange((w0 - has_prev) * m, w1 * m, device=dev), self.cols[raw_cols])
            entries.append(comp.compress(raw, w0, has_prev, self.rotary))
        cells = seq.entry_cells(torch.arange(w0, w1, device=dev) * m + m - 1)
        seq.entries[cells] = torch.cat(entries, dim=-1).to(seq.entries.dtype)

    def _attend(self, seq: _Seq, q: torch.Tensor, iq: tuple | None) -> torch.Tensor:
        """The sequence's query rows q [s, h, d] over their window keys and visible compressed entries, in blocks
        of rows whose scores (attention and indexer) stay within SCORE_BUDGET values."""
        s = q.shape[0]
        n_entries = seq.end // self.rate if self.rate else 0
        if self.indexer is not None:  # index scores over every entry, attention (and a gathered copy) over top-k
            entry_cost = self.indexer.n_heads * n_entries + self.indexer.topk * (self.n_heads + self.head_dim)
        else:
            entry_cost = self.n_heads * n_entries
        step = max(1, self.SCORE_BUDGET // (self.n_heads * (self.window + s) + entry_cost))
        if step >= s:
            return self._attend_rows(seq, q, iq, seq.start)
        return torch.cat([self._attend_rows(seq, q[r : r + step], None if iq is None else
                                            (iq[0][r : r + step], iq[1][r : r + step]), seq.start + r)
                          for r in range(0, s, step)])

    def _attend_rows(self, seq: _Seq, q: torch.Tensor, iq: tuple | None, start: int) -> torch.Tensor:
        """Query rows at positions start .. start + len(q) - 1 of the sequence."""
        dev = seq.index.device
        end = start + q.shape[0]
        p = torch.arange(start, end, device=dev)  # query positions
        k_pos = torch.arange(max(0, start - self.window + 1), end, device=dev)
        keys = seq.read(k_pos, self.cols["kv"])
        visible = (k_pos[None, :] <= p[:, None]) & (k_pos[None, :] > p[:, None] - self.window)
        picked = None  # CSA: each row's own top-k entries [s, k, d] and which are valid [s, k]
        if self.compressor is not None and end // self.rate > 0:
            n_entries = end // self.rate
            ends = torch.arange(n_entries, device=dev) * self.rate + self.rate - 1
            seen = torch.arange(n_entries, device=dev)[None, :] < ((p + 1) // self.rate)[:, None]
            if iq is None:  # HCA: every entry, one key set for all rows
                keys = torch.cat([keys, seq.read_entries(ends, self.entry_cols["entry"])])
                visible = torch.cat([visible, seen], 1)
            else:  # only the picked entries are read
                idx, ok = self.indexer.select(iq[0], iq[1], seq.read_entries(ends, self.entry_cols["ientry"]), seen)
                picked = (seq.read_entries(ends[idx], self.entry_cols["entry"]), ok)
        return sink_attention(q, keys, visible, self.sinks, self.scale, picked)


def sink_attention(q: torch.Tensor, kv: torch.Tensor, visible: torch.Tensor, sinks: torch.Tensor, scale: float,
                   per_row: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One shared K = V head with per-head sinks: q [s, h, d], kv [t, d] seen by every row where visible [s, t],
    plus per_row (keys [s, k, d], valid [s, k]): each row's own keys -> [s, h, d]."""
    qf = q.float()
    z = torch.einsum("shd,td->sht", qf, kv.float()).masked_fill(~visible[:, None, :], float("-inf"))
    if per_row is not None:
        own = torch.einsum("shd,skd->shk", qf, per_row[0].float()).masked_fill(~per_row[1][:, None, :], float("-inf"))
        z = torch.cat([z, own], dim=-1)
    sink = sinks.float()[None, :, None].expand(z.shape[0], -1, 1)
    a = torch.cat([z * scale, sink], dim=-1).softmax(dim=-1)  # the sink takes its share of the denominator
    t = kv.shape[0]
    out = torch.einsum("sht,td->shd", a[..., :t], kv.float())
    if per_row is not None:
        out = out + torch.einsum("shk,skd->shd", a[..., t:-1], per_row[0].float())
    return out.to(q.dtype)


class HyperConnection(nn.Module):
    """mHC: pre / post / comb weights from the streams; comb projected onto doubly stochastic matrices."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v4 = cfg.v4
        self.n, self.iters, self.hc_eps, self.norm_eps = v4.hc_mult, v4.hc_sinkhorn_iters, v4.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + self.n) * self.n, self.n * cfg.hidden_size))
        self.base = nn.Parameter(torch.empty((2 + self.n) * self.n))
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [T, n, m] -> (post [T, n], comb [T, n, n] (row j: from stream j), block input [T, m])."""
        n = self.n
        mix = F.linear(unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = torch.softmax((comb_w * s_comb + comb_b).view(-1, n, n), dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)  # Sinkhorn-Knopp: columns, then rows and columns
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = torch.einsum("tn,tnm->tm", pre, streams.float()).to(streams.dtype)
        return post, comb, collapsed

    @staticmethod
    def merge(post: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """X'_k = post_k y + sum_j comb[j, k] X_j."""
        dt = streams.dtype
        return post.to(dt)[..., None] * y[:, None, :] + torch.einsum("tjk,tjm->tkm", comb.to(dt), streams)


class HyperHead(nn.Module):
    """The last collapse of the streams: sum_j (sigmoid(a_j) + eps) X_j."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.v4.hc_mult
        self.hc_eps, self.norm_eps = cfg.v4.hc_eps, cfg.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * cfg.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mix = F.linear(unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mix * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return torch.einsum("tn,tnm->tm", pre, streams.float()).to(streams.dtype)


class ClampedMLP(nn.Module):
    """SwiGLU with V4's clipping: down(silu(min(gate, L)) * clamp(up, -L, L)) (L = swiglu_limit; 0: none)."""

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class V4Gate(nn.Module):
    """Router: s = score(z); experts = top-k of s + b (or tid2eid[token] in a hash layer); w = s_e / sum s_e * scale."""

    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        self.top_k, self.scoring, self.hashed = cfg.num_experts_per_tok, cfg.scoring_func, hashed
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        if hashed:  # frozen token id -> expert ids table
            self.tid2eid = nn.Parameter(torch.zeros(cfg.vocab_size, self.top_k, dtype=torch.long), requires_grad=False)
        else:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, m], tokens [n] -> (weights [n, k] fp32, expert ids [n, k])."""
        z = F.linear(x.float(), self.weight.float())
        s = {"sqrtsoftplus": lambda: F.softplus(z).sqrt(), "sigmoid": z.sigmoid, "softmax": lambda: z.softmax(-1)}[
            self.scoring]()
        if self.hashed:
            ids = self.tid2eid[tokens].long()
        else:
            ids = (s + self.e_score_correction_bias.float()).topk(self.top_k, dim=-1, sorted=False).indices
        w = s.gather(1, ids)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, ids


class V4Experts(nn.Module):
    """E clamped-SwiGLU experts stored stacked: gate/up [e, i, m], down [e, m, i] (as models/moe.py's Experts)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, i, m = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, m))
        self.up_proj = nn.Parameter(torch.empty(e, i, m))
        self.down_proj = nn.Parameter(torch.empty(e, m, i))
        self.limit = cfg.v4.swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """y[n] = sum_k w[n, k] FFN_{ids[n, k]}(x[n]), each expert run once on the tokens routed to it."""
        k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        y, start = torch.zeros_like(x), 0
        for e, count in enumerate(counts):
            if not count:
                continue
            slots = order[start : start + count]
            start += count
            tokens = slots // k
            h = x[tokens]
            h = swiglu(self._linear("gate_proj", e, h), self._linear("up_proj", e, h), self.limit)
            out = self._linear("down_proj", e, h) * weights.flatten()[slots, None]
            y.index_add_(0, tokens, out.to(y.dtype))
        return y

    def _linear(self, proj: str, e: int, h: torch.Tensor) -> torch.Tensor:
        """h @ W_e^T for a float stack, or a QuantStack's expert e (e.g. the released FP4 experts, kept packed;
        the fused kernels.moe has no swiglu_limit clamp, so each expert runs on its own)."""
        w = getattr(self, proj)
        return h @ w[e].to(h.dtype).T if isinstance(w, torch.Tensor) else w.linear(e, h)


def pack_experts(model: nn.Module, bits: Callable[[str], Bits | None]) -> None:
    """Give V4's routed experts packed-format stacks (quant.QuantStack of a kernels.FORMATS name, e.g. "fp4" for
    the released checkpoints' experts) where `bits` of "...mlp.experts.gate_proj" etc. names one, as
    quant.quantize_model does for moe.Experts; on the meta model before loading (the loader fills the bytes)."""
    for path, experts in list(model.named_modules()):
        if not isinstance(experts, V4Experts):
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w, b = getattr(experts, proj), bits(f"{path}.{proj}")
            if isinstance(b, str) and isinstance(w, nn.Parameter) and can_quantize(w.shape[2], b):
                delattr(experts, proj)
                setattr(experts, proj, QuantStack(w.shape[0], w.shape[2], w.shape[1], b))


class V4MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        self.gate = V4Gate(cfg, hashed)
        self.experts = V4Experts(cfg)
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = ClampedMLP(cfg.hidden_size, inter, cfg.v4.swiglu_limit) if inter else None

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        y = self.experts(x, *self.gate(x, tokens))
        return y if self.shared_experts is None else y + self.shared_experts(x)


class V4DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, hashed: bool):
        super().__init__()
        self.self_attn = V4Attention(cfg, layer_type)
        self.mlp = V4MoE(cfg, hashed)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)

    def forward(self, streams: torch.Tensor, tokens: torch.Tensor | None, cos_sin: dict, batch: AttnBatch,
                pool: torch.Tensor | None = None) -> torch.Tensor:
        """streams [T, n, m] -> [T, n, m] (tokens: the rows' token ids, read by hash-routed layers only)."""
        post, comb, x = self.attn_hc(streams)
        streams = HyperConnection.merge(post, comb, streams,
                                        self.self_attn(self.input_layernorm(x), cos_sin, batch, pool))
        post, comb, x = self.ffn_hc(streams)
        return HyperConnection.merge(post, comb, streams, self.mlp(self.post_attention_layernorm(x), tokens))


class V4Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(V4DecoderLayer(cfg, t, cfg.v4.mlp_layer_types[i] == "hash_moe")
                                    for i, t in enumerate(cfg.v4.layer_types))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)


class V4MTPLayer(nn.Module):
    """V4's multi-token prediction module (DeepSeek's MTPBlock): from the main model's last streams H_i [n, m]
    (before hc_head) and the embedding of t_{i+1}, streams predicting t_{i+2}:
        X = W^E enorm(Emb(t_{i+1})) + W^H hnorm(H_i)      (W^E x broadcast to every stream; hnorm per stream)
        X' = Block(X)                                      (a full V4 layer: mHC, attention, non-hashed MoE)
        logits = head(norm(hc_head'(X')))                  (its own hc_head and norm; head shared)
    X' feeds the next depth as H."""

    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        m = cfg.hidden_size
        self.enorm, self.hnorm = RMSNorm(m, cfg.rms_norm_eps), RMSNorm(m, cfg.rms_norm_eps)
        self.e_proj, self.h_proj = nn.Linear(m, m, bias=False), nn.Linear(m, m, bias=False)
        self.block = V4DecoderLayer(cfg, layer_type, hashed=False)
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(m, cfg.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, cos_sin: dict, batch: AttnBatch,
                pool: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, n, m], next_embeds [T, m] -> streams [T, n, m]."""
        x = self.e_proj(self.enorm(next_embeds))[:, None, :] + self.h_proj(self.hnorm(hidden))
        return self.block(x, None, cos_sin, batch, pool)

    def head_input(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [T, n, m] -> [T, m], what the shared lm_head reads."""
        return self.norm(self.hc_head(streams))


class _Rotaries:
    """Both V4 rotaries behind one `cos_sin(positions)` (the engine's speculative runner asks model.rotary)."""

    def __init__(self, main: Rotary, compress: Rotary):
        self.main, self.compress = main, compress

    def cos_sin(self, positions: torch.Tensor) -> dict:
        return {"main": self.main.cos_sin(positions), "compress": self.compress.cos_sin(positions)}


class DeepseekV4LM(nn.Module):
    """The causal LM with CausalLM's interface (models/model.py): hidden_states -> [T, hc_mult, m] streams."""

    # parameters kept in fp32 whatever the compute dtype (transformers' _keep_in_fp32_modules_strict, less the norms):
    # every use reads them as fp32
    KEEP_FP32 = re.compile(r"(attn_hc|ffn_hc|hc_head)\.|\.sinks$|\.position_bias$")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.v4 is None:
            raise ValueError("DeepseekV4LM needs a deepseek_v4 config")
        self.config = cfg
        self.model = V4Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        mtp_types = cfg.v4.mtp_layer_types
        self.mtp = nn.ModuleList(V4MTPLayer(cfg, mtp_types[k] if k < len(mtp_types) else SWA)
                                 for k in range(cfg.num_nextn_predict_layers))
        self.packs_entries = any(layer.self_attn.rate for layer in self.model.layers)  # any compressed layer
        self.rotary = _Rotaries(Rotary(cfg.rope, cfg.qk_rope_head_dim, interleaved=True),
                                Rotary(cfg.v4.compress_rope, cfg.qk_rope_head_dim, interleaved=True))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def new_kv_pools(self, num_slots: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        return [layer.self_attn.new_pool(num_slots, dtype or self.dtype, self.device) for layer in self.model.layers]

    def kv_values_per_token(self) -> int:
        """Pool values one token takes across all layers (this per-token layout; see `kv_bytes_per_token`)."""
        return sum(layer.self_attn.row_width for layer in self.model.layers)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.model.embed_tokens
        if isinstance(emb, nn.Embedding):
            return emb(tokens)
        return emb.embed(tokens, self.dtype)  # a QuantEmbedding (models/quant.py)

    def hidden_states(self, tokens: torch.Tensor, batch: AttnBatch | None = None,
                      pools: list[torch.Tensor] | None = None) -> torch.Tensor:
        """tokens [T] with an AttnBatch -> streams [T, n, m]; or tokens [b, s] without one (whole sequences, no
        cache) -> [b, s, n, m]."""
        if batch is None:
            b, s = tokens.shape
            batch = build_batch([(None, 0, s)] * b, tokens.device)
            return self.hidden_states(tokens.reshape(-1), batch).view(b, s, *self.hidden_shape)
        if pools is not None and batch.slot_mapping is not None and self.packs_entries:
            self.check_slots(batch)
        cos_sin = self.rotary.cos_sin(batch.positions)
        h = self.embed(tokens)
        streams = h[:, None, :].expand(-1, self.config.v4.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.model.layers):
            streams = layer(streams, tokens, cos_sin, batch, None if pools is None else pools[i])
        return streams

    @staticmethod
    def check_slots(batch: AttnBatch) -> None:
        """The pools pack compressed entries per ENTRY_GROUP aligned rows of one sequence: rows must sit at
        slot % G == position % G (the engine's blocks do when block_size is a multiple of G)."""
        g = V4Attention.ENTRY_GROUP
        if not torch.equal(batch.slot_mapping % g, batch.positions % g):
            size = f" (block_size {batch.paged.block_size})" if batch.paged is not None else ""
            raise ValueError(f"DeepSeek-V4 KV pools need block_size a multiple of {g}, rows at slot % {g} == "
                             f"position % {g}{size}")

    @property
    def hidden_shape(self) -> tuple[int, int]:
        return self.config.v4.hc_mult, self.config.hidden_size

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """streams [..., n, m] -> logits [..., vocab]."""
        lead = hidden.shape[:-2]
        x = self.model.hc_head(hidden.reshape(-1, *self.hidden_shape))
        return self.lm_head(self.model.norm(x)).view(*lead, -1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s], each row a whole sequence -> logits [b, s, vocab]."""
        return self.logits(self.hidden_states(tokens))

    def mtp_hidden(self, hidden: torch.Tensor, next_tokens: torch.Tensor, batch: AttnBatch,
                   pool: torch.Tensor | None = None) -> torch.Tensor:
        """The first MTP module's streams [T, n, m] on a flat batch, from the main model's streams H_i [T, n, m]
        (as hidden_states returns them) and tokens t_{i+1} [T]; `draft_logits` of them predict t_{i+2}. Its cache
        (`pool`) is indexed like the main layers' (row i at position i's slot)."""
        if not len(self.mtp):
            raise ValueError("this model has no multi-token-prediction layer")
        return self.mtp[0](hidden, self.embed(next_tokens), self.rotary.cos_sin(batch.positions), batch, pool)

    def draft_logits(self, streams: torch.Tensor) -> torch.Tensor:
        """An MTP module's output streams [..., n, m] -> logits [..., vocab] (its hc_head and norm, shared head)."""
        lead = streams.shape[:-2]
        return self.lm_head(self.mtp[0].head_input(streams.reshape(-1, *self.hidden_shape))).view(*lead, -1)

    def mtp_logits(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Draft logits [b, s, vocab] for t_{i+2} from streams H_i [b, s, n, m] and tokens t_{i+1} [b, s], each row
        a whole sequence, no cache."""
        b, s = next_tokens.shape
        batch = build_batch([(None, 0, s)] * b, next_tokens.device)
        x = self.mtp_hidden(hidden.reshape(b * s, *self.hidden_shape), next_tokens.reshape(-1), batch)
        return self.draft_logits(x).view(b, s, -1)


# ---- checkpoint names --------------------------------------------------------------------------------------------
# The released checkpoints' names (DeepSeek's inference code; transformers' save_pretrained writes most of them back)
# -> transformers' module names, which ours follow: the renames of transformers' conversion_mapping["deepseek_v4"].
_RENAMES = [(re.compile(a), b) for a, b in (
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight$", "embed_tokens.weight"), (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1"),
    (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_(fn|base|scale)$", r".attn_hc.\1"), (r"\.hc_ffn_(fn|base|scale)$", r".ffn_hc.\1"),
    (r"\.attn_sink$", ".sinks"), (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."), (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."), (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.(shared_experts|experts\.\d+)\.w1\.", r".\1.gate_proj."), (r"\.(shared_experts|experts\.\d+)\.w2\.",
                                                                     r".\1.down_proj."),
    (r"\.(shared_experts|experts\.\d+)\.w3\.", r".\1.up_proj."),
)]


_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")
_MTP_OWN = re.compile(r"^(enorm|hnorm|e_proj|h_proj|norm)\.weight$|^hc_head_(fn|base|scale)$")


def checkpoint_name(name: str) -> str | None:
    """A V4 checkpoint tensor's name as our module names spell it: `mtp.K.*` go to MTP module K (its own norms,
    projections and hc_head; the rest its block)."""
    bare = name.removeprefix("model.")
    if bare.startswith(("lm_head.", "head.")):
        return "lm_head.weight"
    if m := _MTP.match(bare):
        k, rest = m.groups()
        if own := _MTP_OWN.match(rest):
            return f"mtp.{k}.{rest}" if own.group(1) else f"mtp.{k}.hc_head.hc_{own.group(2)}"
        bare = f"layers.{k}.{rest}"  # named as a layer of the stack, renamed as one, then moved
        for pattern, repl in _RENAMES:
            bare = pattern.sub(repl, bare)
        return f"mtp.{k}.block." + bare.split(".", 2)[2]
    for pattern, repl in _RENAMES:
        bare = pattern.sub(repl, bare)
    return "model." + bare


# ---- KV cache arithmetic -----------------------------------------------------------------------------------------
def kv_bytes_per_token(cfg: ModelConfig, context: int, bytes_per_value: float = 1.0) -> float:
    """Mean cache bytes per token of a `context`-token sequence, with the layout DeepSeek's V4 inference uses
    (a ring of the last W KV rows per layer, compressed entries (+ indexer keys) in CSA/HCA layers), or, for
    MLA checkpoints, V3's latent cache (c + r values per token and layer). bytes_per_value: 1 for an FP8 cache.
    Raw compressor inputs of unfinished windows (< 2m rows per layer) are left out as O(1) per sequence."""
    if cfg.v4 is None:
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.has_indexer else 0)
        return cfg.num_hidden_layers * per_layer * bytes_per_value
    v4, total = cfg.v4, 0.0
    for lt in v4.layer_types:
        values = min(context, v4.sliding_window) * cfg.head_dim
        if rate := v4.compress_rate(lt):
            values += (context // rate) * (cfg.head_dim + (cfg.index_head_dim if lt == CSA else 0))
        total += values
    return total * bytes_per_value / context
