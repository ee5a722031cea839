"""The attention metadata of one forward pass over a flat batch of tokens from many sequences.

Tokens of all scheduled sequences are concatenated into one [T] row so every linear layer runs once per
step. Attention needs to know, per sequence, which rows are its queries and where its earlier tokens sit
in the paged KV pool:
- prefill segments (a prompt, or a chunk of one, after `n_prefix` tokens already in the cache) come first;
- single-token decodes come last, one row per sequence, attended as one padded [B, T_max] gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSegment:
    q_start: int  # rows [q_start, q_end) of the flat batch
    q_end: int
    prefix_slots: torch.Tensor | None  # pool slots of this sequence's tokens before the segment
    mask: torch.Tensor | None  # [s, n_prefix + s] additive causal mask; None for one query row


@dataclass
class AttnBatch:
    positions: torch.Tensor  # [T] absolute position of every row
    slot_mapping: torch.Tensor | None  # [T] pool slot each row's K/V (or latent) is written to; None: no cache
    prefills: list[PrefillSegment] = field(default_factory=list)
    decode_start: int = 0  # rows >= decode_start are decodes
    decode_slots: torch.Tensor | None = None  # [B, T_max] pool slots of each decode's context (itself included)
    decode_mask: torch.Tensor | None = None  # [B, 1, T_max] additive: -inf past each context's length
    prefill_mode: str = "expanded"  # MLA: expanded ("MHA mode") or absorbed ("MQA mode")
    decode_mode: str = "absorbed"

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


def causal_mask(n_new: int, n_prefix: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """[n_new, n_prefix + n_new] additive mask: query i (position n_prefix + i) sees keys 0..n_prefix + i."""
    if n_new == 1:
        return None
    q = torch.arange(n_prefix, n_prefix + n_new, device=device)[:, None]
    k = torch.arange(n_prefix + n_new, device=device)[None, :]
    return torch.zeros(n_new, n_prefix + n_new, device=device).masked_fill(k > q, float("-inf"))


def build_batch(
    items: list[tuple[torch.Tensor | None, int, int]],
    device: torch.device | str = "cpu",
    prefill_mode: str = "expanded",
    decode_mode: str = "absorbed",
) -> AttnBatch:
    """items: per sequence (slots of its first n_prefix + n_new tokens or None for no cache, n_prefix, n_new).

    Sequences with n_new > 1 (or nothing cached yet) are prefills and must come before the decodes.
    """
    positions, slot_rows, prefills = [], [], []
    decodes: list[torch.Tensor] = []
    row = 0
    for slots, n_prefix, n_new in items:
        positions.append(torch.arange(n_prefix, n_prefix + n_new))
        is_decode = n_new == 1 and n_prefix > 0 and slots is not None
        if slots is not None:
            slot_rows.append(slots[n_prefix : n_prefix + n_new])
        if is_decode:
            decodes.append(slots[: n_prefix + 1])
        else:
            if decodes:
                raise ValueError("prefill segments must come before decodes")
            prefix = slots[:n_prefix].to(device) if slots is not None and n_prefix else None
            prefills.append(PrefillSegment(row, row + n_new, prefix, causal_mask(n_new, n_prefix, device)))
        row += n_new
    batch = AttnBatch(
        positions=torch.cat(positions).to(device),
        slot_mapping=torch.cat(slot_rows).to(device) if slot_rows else None,
        prefills=prefills,
        decode_start=row - len(decodes),
        prefill_mode=prefill_mode,
        decode_mode=decode_mode,
    )
    if decodes:
        lengths = torch.tensor([len(d) for d in decodes])
        t_max = int(lengths.max())
        padded = torch.zeros(len(decodes), t_max, dtype=torch.long)
        for i, d in enumerate(decodes):
            padded[i, : len(d)] = d
        pad = torch.arange(t_max)[None, :] >= lengths[:, None]
        batch.decode_slots = padded.to(device)
        batch.decode_mask = torch.zeros(len(decodes), 1, t_max).masked_fill(pad[:, None, :], float("-inf")).to(device)
    return batch
