"""The paged cache's block manager: free list, reference counts, and the content-addressed prefix cache.

A block holds `block_size` consecutive tokens of one sequence. A full block is named by a hash of its
tokens chained with the hash of the block before it, so equal hashes mean equal whole prefixes. Freed
blocks keep their contents and hash and sit in an LRU free list: a later request with the same prefix
takes them back (a cache hit) until they are evicted for new allocations, oldest first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from selfseek.engine.sequence import Sequence


def block_hash(prev: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    return hash((prev, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.hits = 0  # prompt tokens served from cache
        self.queries = 0  # prompt tokens looked up

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ------------------------------------------------------------------------------
    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Cached blocks covering the longest prefix of full blocks of `tokens` (one token always left over,
        so the sequence still computes the logits of its last prompt token)."""
        if not self.prefix_caching:
            return []
        blocks, prev = [], None
        for i in range((len(tokens) - 1) // self.block_size):
            prev = block_hash(prev, tokens[i * self.block_size : (i + 1) * self.block_size])
            b = self.by_hash.get(prev)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Name the sequence's newly completed blocks so later requests can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed // bs, len(seq.block_table))
        if len(seq.block_hashes) < n_full:
            tokens = seq.tokens
            for i in range(len(seq.block_hashes), n_full):
                prev = seq.block_hashes[-1] if seq.block_hashes else None
                seq.block_hashes.append(block_hash(prev, tokens[i * bs : (i + 1) * bs]))
        for i in range(n_full):
            b, h = seq.block_table[i], seq.block_hashes[i]
            if self.hash_of[b] is None and h not in self.by_hash:
                self.hash_of[b] = h
                self.by_hash[h] = b

    # ---- allocation ----------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new: int, hits: list[int] = ()) -> bool:
        """Whether `num_new` more tokens fit, after taking the prefix-cache `hits` (free hits count too)."""
        have = len(seq.block_table) + len(hits)
        need = self.blocks_needed(seq.num_computed + len(hits) * self.block_size + num_new) - have
        free_hits = sum(1 for b in hits if self.ref_count[b] == 0)
        return need + free_hits <= self.num_free

    def take_hits(self, seq: Sequence, hits: list[int]) -> None:
        for b in hits:
            if self.ref_count[b] == 0:
                del self.free[b]
            self.ref_count[b] += 1
        seq.block_table.extend(hits)
        seq.num_computed += len(hits) * self.block_size

    def allocate(self, seq: Sequence, num_new: int) -> None:
        """Grow the block table to hold seq.num_computed + num_new tokens."""
        for _ in range(self.blocks_needed(seq.num_computed + num_new) - len(seq.block_table)):
            b, _ = self.free.popitem(last=False)  # least recently freed
            if self.hash_of[b] is not None:  # evict its cached contents
                del self.by_hash[self.hash_of[b]]
                self.hash_of[b] = None
            self.ref_count[b] = 1
            seq.block_table.append(b)

    def free_blocks(self, seq: Sequence) -> None:
        # Release from the tail so a sequence's last blocks are evicted before its shared prefix.
        for b in reversed(seq.block_table):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free[b] = None
        seq.block_table = []
        seq.num_computed = 0

    def slots(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        """Pool slot of each of the sequence's first `num_tokens` tokens."""
        pos = torch.arange(num_tokens)
        table = torch.tensor(seq.block_table[: self.blocks_needed(num_tokens)], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
