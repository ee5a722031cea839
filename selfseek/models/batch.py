"""The attention metadata of one forward pass over a flat batch of tokens from many sequences.

Tokens of all scheduled sequences are concatenated into one [T] row so every linear layer runs once per
step. Attention needs to know, per sequence, which rows are its queries and where its earlier tokens sit
in the paged KV pool:
- dense prefill segments (a prompt, or its first chunk, with nothing cached before it) come first and attend
  only among their own new tokens (causal);
- the rows of sequences with cached context come last (`PagedRows`): chunks of a prompt after a cached prefix
  (longest first, so a model can treat long chunks differently, see MLA) and decodes (one row), attending
  through their block tables to everything cached, their own new tokens included (written to the pool first).

All metadata is made with tensor ops from block tables (`batch_from_tables`): the per-step Python work is
proportional to the number of sequences, not to their lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSegment:
    q_start: int  # rows [q_start, q_end) of the flat batch, attending among themselves only
    q_end: int
    mask: torch.Tensor | None = None  # additive [s, s]; None: causal


@dataclass
class PagedRows:
    """Rows [start, T) of the flat batch: sequence i's rows are start + cu_q[i] .. start + cu_q[i+1] - 1."""

    start: int
    cu_q: torch.Tensor  # int32 [S + 1] row offsets of each sequence (CPU)
    context_lens: torch.Tensor  # int32 [S] keys the sequence's last row sees (cached + new tokens) (CPU)
    block_tables: torch.Tensor  # int32 [S, blocks] pool blocks of each sequence, 0-padded (CPU)
    block_size: int
    max_context: int
    # per-batch facts every layer asks for, made once (split(), num_rows, the kernel's checks, DeepSeek-V4's slots)
    _splits: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_rows(self) -> int:
        if "num_rows" not in self._splits:  # read once per batch, not once per layer (each read is an op and a sync)
            self._splits["num_rows"] = int(self.cu_q[-1])
        return self._splits["num_rows"]

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def split(self, min_rows: int) -> tuple[int, PagedRows | None]:
        """(k, the rows of sequences k..S-1 as their own PagedRows, or None) where sequences 0..k-1 are the
        leading ones with at least `min_rows` rows each. Made once per batch (every layer asks)."""
        if min_rows not in self._splits:
            counts = self._splits.get("rows_per_seq")  # batch_from_tables leaves them as a list: no tensor ops
            if counts is not None:
                k = next((i for i, c in enumerate(counts) if c < min_rows), len(counts))
            else:
                k = int((self.cu_q.diff() >= min_rows).int().cumprod(0).sum())
            rest = None
            if k == 0:
                rest = self  # the same rows: and the same per-batch facts
            elif k < self.num_seqs:
                r0 = int(self.cu_q[k])
                ctx = self.context_lens[k:]
                max_ctx = int(ctx.max())
                rest = PagedRows(self.start + r0, self.cu_q[k:] - r0, ctx,
                                 self.block_tables[k:, : -(-max_ctx // self.block_size)].contiguous(),
                                 self.block_size, max_ctx)
            self._splits[min_rows] = (k, rest)
        return self._splits[min_rows]

    def context_slots(self) -> torch.Tensor:
        """[S, max_context] pool slot of every key of each sequence (past a context's end: padding)."""
        pos = torch.arange(self.max_context)
        blocks = self.block_tables[:, pos // self.block_size].long()
        return blocks * self.block_size + pos % self.block_size


@dataclass
class AttnBatch:
    positions: torch.Tensor  # [T] absolute position of every row
    slot_mapping: torch.Tensor | None  # [T] pool slot each row's K/V (or latent) is written to; None: no cache
    prefills: list[PrefillSegment] = field(default_factory=list)
    paged: PagedRows | None = None
    decode_mode: str = "absorbed"  # MLA, paged rows: absorbed (the kernel) or expanded (reference, tests)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


def batch_from_tables(
    tables: torch.Tensor | None,
    rows: list[int],
    starts: list[int],
    num_new: list[int],
    block_size: int,
    device: torch.device | str = "cpu",
    decode_mode: str = "absorbed",
) -> AttnBatch:
    """The batch of sequences tables[rows[i]] computing tokens starts[i] .. starts[i] + num_new[i] - 1.

    tables: int32 [N, max_blocks] block tables (CPU), or None when nothing is cached (every start 0).
    Sequences with start 0 are dense prefills and must come before those with cached context.
    """
    n_dense = 0
    while n_dense < len(starts) and starts[n_dense] == 0:
        n_dense += 1
    if any(s == 0 for s in starts[n_dense:]):
        raise ValueError("sequences with nothing cached must come before those with cached context")
    if tables is None and n_dense < len(starts):
        raise ValueError("sequences with cached context need block tables")
    if n_dense == 0 and starts and all(n == 1 for n in num_new):
        return _decode_batch(tables, rows, starts, block_size, device, decode_mode)
    n_t, start_t = torch.tensor(num_new), torch.tensor(starts)
    cu = torch.zeros(len(rows) + 1, dtype=torch.long)
    torch.cumsum(n_t, 0, out=cu[1:])
    T = int(cu[-1])
    seq = torch.repeat_interleave(torch.arange(len(rows)), n_t)
    positions = start_t[seq] + torch.arange(T) - cu[:-1][seq]
    slot_mapping, paged, tab = None, None, None
    if tables is not None:
        tab = tables[torch.tensor(rows, dtype=torch.long)]
        slot_mapping = (tab[seq, positions // block_size].long() * block_size + positions % block_size).to(device)
    bounds = cu.tolist()
    prefills = [PrefillSegment(bounds[i], bounds[i + 1]) for i in range(n_dense)]
    if n_dense < len(rows):
        ctx = (start_t + n_t)[n_dense:]
        max_ctx = int(ctx.max())
        p0 = bounds[n_dense]
        paged = PagedRows(
            start=p0,
            cu_q=(cu[n_dense:] - p0).to(torch.int32),
            context_lens=ctx.to(torch.int32),
            block_tables=tab[n_dense:, : -(-max_ctx // block_size)].contiguous(),
            block_size=block_size,
            max_context=max_ctx,
        )
        paged._splits["rows_per_seq"] = num_new[n_dense:]
    return AttnBatch(positions.to(device), slot_mapping, prefills, paged, decode_mode)


def _decode_batch(tables: torch.Tensor, rows: list[int], starts: list[int], block_size: int,
                  device: torch.device | str, decode_mode: str) -> AttnBatch:
    """batch_from_tables where every sequence computes one token after its cached context (a decode step): the
    per-sequence values in Python (O(sequences)), a dozen tensor ops in all instead of ~45."""
    cols = tables.shape[1]
    blocks = -(-(max(starts) + 1) // block_size)
    # each row's slot: its table entry for its position's block, times block_size, plus the offset in the block
    entries = torch.take(tables, torch.tensor([r * cols + p // block_size for r, p in zip(rows, starts, strict=True)]))
    slot_mapping = entries.long().mul_(block_size).add_(torch.tensor([p % block_size for p in starts]))
    n = len(rows)
    paged = PagedRows(
        start=0,
        cu_q=torch.arange(n + 1, dtype=torch.int32),
        context_lens=torch.tensor([p + 1 for p in starts], dtype=torch.int32),
        block_tables=tables[:, :blocks].index_select(0, torch.tensor(rows)),
        block_size=block_size,
        max_context=max(starts) + 1,
    )
    paged._splits["rows_per_seq"] = [1] * n
    paged._splits["num_rows"] = n
    positions = torch.tensor(starts)
    if torch.device(device) != positions.device:
        positions, slot_mapping = positions.to(device), slot_mapping.to(device)
    return AttnBatch(positions, slot_mapping, [], paged, decode_mode)


def build_batch(
    items: list[tuple[torch.Tensor | None, int, int]],
    device: torch.device | str = "cpu",
    decode_mode: str = "absorbed",
) -> AttnBatch:
    """items: per sequence (pool slots of its first n_prefix + n_new tokens, or None for no cache; n_prefix; n_new).

    For tests and training (the engine keeps block tables and calls `batch_from_tables`): each sequence's slots
    become a block table with blocks of one slot. Sequences with n_prefix > 0 must come after the others.
    """
    with_slots = [slots is not None for slots, _, _ in items]
    if any(with_slots) and not all(with_slots):
        raise ValueError("either every sequence has cache slots or none has")
    starts, num_new = [n_prefix for _, n_prefix, _ in items], [n_new for _, _, n_new in items]
    tables = None
    if all(with_slots) and items:
        lens = [p + n for p, n in zip(starts, num_new, strict=True)]
        tables = torch.zeros(len(items), max(lens), dtype=torch.int32)
        for i, (slots, _, _) in enumerate(items):
            tables[i, : lens[i]] = slots[: lens[i]]
    return batch_from_tables(tables, list(range(len(items))), starts, num_new, 1, device, decode_mode)
