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
and a last weighted collapse (hc_head) before the final norm. On float32 CPU tensors outside autograd the weights,
Sinkhorn-Knopp and collapse run as one kernel call, the merge as another (kernels/fused_ops.cpp); torch otherwise.
MoE: scores sqrt(softplus(z)); experts top-k of score + bias (noaux_tc) or, in hash_moe layers, tid2eid[token];
weights = normalised scores of the chosen experts x routed_scaling_factor; experts' SwiGLU clamped at swiglu_limit.

The cache (engine): per layer a `V4Pool` of two kinds of storage, both addressed through the block tables:
- entries (CSA / HCA layers): the compressed entries (+ indexer keys) of the windows ending in each ENTRY_GROUP (16)
  aligned slots, ceil(16 / m) per group; kept for the sequence's life (block_size a multiple of 16, checked);
- window rows: per token its KV and the compressors' raw inputs (C, Z), read only for the last `lookback` positions
  before a step's first new token (the sliding window, the unfinished compression windows). With the engine's
  block manager bound (`use_window_blocks`) they live in a smaller pool of window blocks: window block
  window_of[b] holds the rows of block b while the manager keeps it (a sequence's last blocks); unbound, every
  block has its own (window slots = slots).
Prefix caching, preemption and rejected drafts follow the blocks (engine/kv_cache.py).
Module names follow transformers' DeepseekV4ForCausalLM; `checkpoint_name` maps the released checkpoints' names
(and transformers' saved ones) onto them. The released FP8 dense weights and FP4 routed experts (`X.scale` beside
`X.weight`) stay packed on a CPU (weights/safetensors.py; `pack_experts` gives the experts their packed stacks).
Shape letters: T flat rows, s queries, t keys, h heads, d head dim, w windows, j slots of a window, g groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfseek.config import ModelConfig, V4Config
from selfseek.kernels import fused_ops
from selfseek.models.batch import AttnBatch, PagedRows, build_batch
from selfseek.models.layers import RMSNorm, Rotary
from selfseek.models.moe import fused_experts
from selfseek.models.quant import Bits, QuantStack, can_quantize

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), eps=eps)  # one op for the five below
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_tail(rot: Rotary, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the last r values of x ([nope | rope] layout); cos/sin [T, r/2] broadcast over heads.
    x is a fresh intermediate of the caller's: the fused kernel rotates its tail in place (Rotary's bits)."""
    r = 2 * cos.shape[-1]
    tail = x[..., -r:]
    if fused_ops.rope(tail, cos, sin, rot.interleaved, out=tail) is not None:
        return x
    return torch.cat([x[..., :-r], rot(tail, cos, sin)], dim=-1)


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
               visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [s, H, D], w [s, H], keys [t, D], visible [s, t] (None: all) -> the top-k visible entries of each row:
        (indices [s, k], valid [s, k]), k = min(index_topk, t); a row seeing fewer than k has its other picks
        invalid."""
        per_head = F.relu(torch.einsum("shd,td->sht", q, keys.float())) * self.dim**-0.5
        scores = torch.einsum("sh,sht->st", w, per_head)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        top = scores.topk(min(self.topk, keys.shape[0]), dim=-1)
        return top.indices, top.values > float("-inf")


@dataclass
class V4Pool:
    """One layer's cache: entries [groups, ceil(G / m), entry_width] (None in sliding-only layers) addressed by slot
    // G, and window rows [window slots, token_width]; slot s's window row is window_of[s // B] * B + s % B, or s
    when window_of is None (one window row per slot)."""

    entries: torch.Tensor | None
    window: torch.Tensor
    window_of: torch.Tensor | None = None  # int64 [blocks]: each block's window block, -1: none (BlockManager's)
    block_size: int = 1
    _copy: tuple[int, torch.Tensor] | None = None  # (window_of's version, its copy on the slots' device)

    @property
    def nbytes(self) -> int:
        return self.window.nbytes + (0 if self.entries is None else self.entries.nbytes)

    def window_slots(self, slots: torch.Tensor) -> torch.Tensor:
        if self.window_of is None:
            return slots
        table = self.window_of
        if table.device != slots.device:  # copied again only when the manager has changed it (in-place version)
            if self._copy is None or self._copy[0] != table._version or self._copy[1].device != slots.device:
                self._copy = table._version, table.to(slots.device)
            table = self._copy[1]
        b = self.block_size
        return table[slots // b] * b + slots % b


@dataclass
class _Seq:
    """One sequence of the batch: its query rows, first new position, and where its values live (a pool, or the
    batch's own rows): position p's values are tokens[wslot[p]] (only positions a step reads: the last `lookback`
    before `start` and the new ones), the entry of a window ending at p entries[index[p] // g, (p % g) // rate]."""

    rows: slice
    start: int
    index: torch.Tensor
    wslot: torch.Tensor
    tokens: torch.Tensor  # [rows, token values]
    entries: torch.Tensor | None  # [groups, entries per group, entry values]
    g: int
    rate: int

    @property
    def end(self) -> int:
        return self.start + self.rows.stop - self.rows.start

    def read(self, pos: torch.Tensor, cols: slice) -> torch.Tensor:
        return self.tokens[self.wslot[pos], cols]

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
        """A token's window row: KV | compressor C, Z | indexer C, Z (`token_width`); an entry: entry | indexer entry
        (`entry_width`), ceil(G / m) of them per ENTRY_GROUP (G) slots (`group_cols` values per slot)."""
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
        self.entries_per_group = -(-g // self.rate) if self.rate else 0
        self.group_cols = self.entries_per_group * self.entry_width / g
        # window_map (window_of, window blocks, block_size), set by DeepseekV4LM.use_window_blocks
        self.window_map: tuple[torch.Tensor, int, int] | None = None

    @property
    def lookback(self) -> int:
        """Positions before a step's first new token that it reads window rows of: the sliding window's keys and the
        raw rows of the unfinished compression windows (CSA: the previous window's too)."""
        raw = (2 if self.compressor.overlap else 1) * self.rate if self.compressor is not None else 0
        return max(self.window, raw) - 1

    def new_pool(self, num_slots: int, dtype: torch.dtype, device) -> V4Pool:
        """Entries for `num_slots` slots (groups of ENTRY_GROUP consecutive slots must hold consecutive positions of
        one sequence, aligned: slot % G == position % G, as the engine's blocks do when block_size is a multiple of
        G) and window rows: one per slot, or the bound block manager's window blocks."""
        if num_slots % self.ENTRY_GROUP:
            raise ValueError(f"num_slots ({num_slots}) of a DeepSeek-V4 pool must be a multiple of {self.ENTRY_GROUP}")
        entries = (torch.zeros(num_slots // self.ENTRY_GROUP, self.entries_per_group, self.entry_width, dtype=dtype,
                               device=device) if self.rate else None)
        if self.window_map is None:
            return V4Pool(entries, torch.zeros(num_slots, self.token_width, dtype=dtype, device=device))
        window_of, blocks, block_size = self.window_map
        return V4Pool(entries, torch.zeros(blocks * block_size, self.token_width, dtype=dtype, device=device),
                      window_of, block_size)

    def _sequences(self, batch: AttnBatch, pool: V4Pool | None, local: torch.Tensor) -> list[_Seq]:
        """The batch's sequences over the pool, or (prefills without a pool) over the batch's own rows."""
        m, g = self.rate or 1, self.ENTRY_GROUP
        out = []
        for seg in batch.prefills:
            rows = slice(seg.q_start, seg.q_end)
            if pool is None or batch.slot_mapping is None:  # the batch's rows; entries in their own tensor
                n = seg.q_end - seg.q_start
                entries = local.new_zeros(n, 1, self.entry_width) if self.rate else None
                index = torch.arange(n, device=local.device)
                out.append(_Seq(rows, 0, index, index, local[rows], entries, 1, m))
            else:
                slots = batch.slot_mapping[rows]
                out.append(_Seq(rows, 0, slots, pool.window_slots(slots), pool.window, pool.entries, g, m))
        if (paged := batch.paged) is not None:
            if pool is None:
                raise ValueError("rows with cached context need the layer's KV pool")
            slots, wslots = _context_slots(paged, pool)
            cu, lens = paged.cu_q.tolist(), paged.context_lens.tolist()
            for i, n_ctx in enumerate(lens):
                rows = slice(paged.start + cu[i], paged.start + cu[i + 1])
                out.append(_Seq(rows, n_ctx - (cu[i + 1] - cu[i]), slots[i, :n_ctx], wslots[i, :n_ctx], pool.window,
                                pool.entries, g, m))
        return out

    def forward(self, x: torch.Tensor, cos_sin: dict, batch: AttnBatch,
                pool: V4Pool | None = None) -> torch.Tensor:
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
            pool.window[_new_window_slots(batch, pool)] = local.to(pool.window.dtype)
        iq = self.indexer.queries(q_c, x, self.rotary, cs) if self.indexer is not None else None
        out = x.new_empty(T, h, d)
        for seq in self._sequences(batch, pool, local):
            if self.compressor is not None:
                self._compress_new_windows(seq)
            out[seq.rows] = self._attend(seq, q[seq.rows], None if iq is None else (iq[0][seq.rows], iq[1][seq.rows]))
        out = rope_tail(self.rotary, out, cs[0], -cs[1])  # K = V: rotate the output's rope slice back by -p
        grouped = out.reshape(T, self.o_groups, -1).transpose(0, 1)  # [g, T, h d / g]
        w_a = self.o_a_proj.weight.view(self.o_groups, -1, grouped.shape[-1])  # [g, r, h d / g]
        return self.o_b_proj(torch.bmm(grouped, w_a.to(grouped.dtype).transpose(1, 2)).transpose(0, 1).flatten(1))

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
        one = q.shape[0] == 1  # one row (decode) sees each of its window keys and entries: no masks to build
        visible = None if one else (k_pos[None, :] <= p[:, None]) & (k_pos[None, :] > p[:, None] - self.window)
        picked = None  # CSA: each row's own top-k entries [s, k, d] and which are valid [s, k]
        if self.compressor is not None and end // self.rate > 0:
            n_entries = end // self.rate
            ends = torch.arange(n_entries, device=dev) * self.rate + self.rate - 1
            seen = None if one else torch.arange(n_entries, device=dev)[None, :] < ((p + 1) // self.rate)[:, None]
            if iq is None:  # HCA: every entry, one key set for all rows
                keys = torch.cat([keys, seq.read_entries(ends, self.entry_cols["entry"])])
                visible = None if one else torch.cat([visible, seen], 1)
            else:  # only the picked entries are read
                idx, ok = self.indexer.select(iq[0], iq[1], seq.read_entries(ends, self.entry_cols["ientry"]), seen)
                picked = (seq.read_entries(ends[idx], self.entry_cols["entry"]), ok)
        return sink_attention(q, keys, visible, self.sinks, self.scale, picked)


def _new_window_slots(batch: AttnBatch, pool: V4Pool) -> torch.Tensor:
    """The window slots of the batch's new rows (slot_mapping), made once per batch and window map when the batch
    has paged rows (whose per-batch cache holds them), as _context_slots."""
    if batch.paged is None or pool.window_of is None:
        return pool.window_slots(batch.slot_mapping)
    key = ("deepseek_v4 new", id(pool.window_of), pool.window.device)
    if key not in batch.paged._splits:
        batch.paged._splits[key] = pool.window_slots(batch.slot_mapping)
    return batch.paged._splits[key]


def _context_slots(paged: PagedRows, pool: V4Pool) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, window slots) [S, max_context] of the paged rows' context, made once per batch and window map: every
    layer (and the MTP module, over the same batch) shares them."""
    key = ("deepseek_v4", None if pool.window_of is None else id(pool.window_of), pool.window.device)
    if key not in paged._splits:  # PagedRows' per-batch cache
        slots = paged.context_slots().to(pool.window.device)
        paged._splits[key] = slots, pool.window_slots(slots)
    return paged._splits[key]


def sink_attention(q: torch.Tensor, kv: torch.Tensor, visible: torch.Tensor | None, sinks: torch.Tensor,
                   scale: float, per_row: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One shared K = V head with per-head sinks: q [s, h, d], kv [t, d] seen by every row where visible [s, t]
    (None: everywhere), plus per_row (keys [s, k, d], valid [s, k]): each row's own keys -> [s, h, d]."""
    if (fused := fused_ops.sink_attention(q, kv, visible, sinks.float(), scale, per_row)) is not None:
        return fused  # one kernel call for the dozen ops below (float32 CPU)
    qf = q.float()
    z = torch.einsum("shd,td->sht", qf, kv.float())
    if visible is not None:
        z = z.masked_fill(~visible[:, None, :], float("-inf"))
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
        tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (streams, self.fn, self.base, self.scale))
        if not tracked and fused_ops.hc_runs(streams):  # the fused kernel: this formula in one call
            mix = F.linear(streams.flatten(1), self.fn.float())  # the norm's factor is applied by the kernel
            fused = fused_ops.hc_pre(mix, streams, self.base.float(), self.scale.float(), self.norm_eps, self.hc_eps,
                                     self.iters)
            if fused is not None:
                return fused
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
        if (fused := fused_ops.hc_post(post, comb, streams, y)) is not None:
            return fused
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
        stacks = [w if isinstance(w, torch.Tensor) else w.packed  # a QuantStack (e.g. the released FP4 experts)
                  for w in (self.gate_proj, self.up_proj, self.down_proj)]
        if (y := fused_experts(x, weights, ids, stacks, self.limit or 0.0)) is not None:
            return y
        y = torch.zeros_like(x)
        if x.shape[0] == 1:  # decode: routing read once as Python numbers, no index tensors (a step's many tiny ops)
            w, slots_of = weights[0].tolist(), {}
            for slot, e in enumerate(ids[0].tolist()):
                slots_of.setdefault(e, []).append(slot)
            for e in sorted(slots_of):
                out = self._ffn(e, x)
                for slot in slots_of[e]:  # the order and products of the index_add_ below
                    y += (out * w[slot]).to(y.dtype)
            return y
        k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            slots = order[start : start + count]
            start += count
            tokens = slots // k
            y.index_add_(0, tokens, (self._ffn(e, x[tokens]) * weights.flatten()[slots, None]).to(y.dtype))
        return y

    def _ffn(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e's clamped SwiGLU FFN of rows h."""
        return self._linear("down_proj", e, swiglu(self._linear("gate_proj", e, h), self._linear("up_proj", e, h),
                                                   self.limit))

    def _linear(self, proj: str, e: int, h: torch.Tensor) -> torch.Tensor:
        """h @ W_e^T for a float stack, or a QuantStack's expert e (e.g. the released FP4 experts, kept packed;
        used where the fused kernels.moe cannot run: autograd, another device, no kernels)."""
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
                pool: V4Pool | None = None) -> torch.Tensor:
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
                pool: V4Pool | None = None) -> torch.Tensor:
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

    def new_kv_pools(self, num_slots: int, dtype: torch.dtype | None = None) -> list[V4Pool]:
        return [layer.self_attn.new_pool(num_slots, dtype or self.dtype, self.device) for layer in self.model.layers]

    def _attentions(self) -> list[V4Attention]:
        return [layer.self_attn for layer in self.model.layers] + [mtp.block.self_attn for mtp in self.mtp]

    @property
    def lookback(self) -> int:
        """Positions before a step's first new token whose window rows any layer (MTP's included) reads."""
        return max(a.lookback for a in self._attentions())

    def use_window_blocks(self, window_map: tuple[torch.Tensor, int, int] | None) -> None:
        """Pools made from now on keep window rows in the block manager's window blocks: window_map = (window_of
        int64 [blocks], window blocks, block_size), as BlockManager.enable_windows returns it; None: one window row
        per slot again (the engine unbinds once its runner has made its pools)."""
        for a in self._attentions():
            a.window_map = window_map

    def kv_values_per_token(self) -> int:
        """Pool values per token that grow with the context (at least 1): the compressed entries and indexer keys,
        across all layers. The window rows are a pool of O(sequences) window blocks besides
        (BlockManager.enable_windows; unbound pools keep one per slot: `window_values_per_token`)."""
        return max(1, math.ceil(sum(layer.self_attn.group_cols for layer in self.model.layers)))

    def window_values_per_token(self) -> int:
        """Values of one token's window rows across all layers."""
        return sum(layer.self_attn.token_width for layer in self.model.layers)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.model.embed_tokens
        if isinstance(emb, nn.Embedding):
            return emb(tokens)
        return emb.embed(tokens, self.dtype)  # a QuantEmbedding (models/quant.py)

    def hidden_states(self, tokens: torch.Tensor, batch: AttnBatch | None = None,
                      pools: list[V4Pool] | None = None) -> torch.Tensor:
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
                   pool: V4Pool | None = None) -> torch.Tensor:
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
