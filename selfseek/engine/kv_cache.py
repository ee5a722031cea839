"""The paged cache's block manager: free list, reference counts, and the content-addressed prefix cache.

A block holds `block_size` consecutive tokens of one sequence. A full block is named by a key: SHA-256 of
its parent's key and its token ids; the first block's parent is a root key that mixes in the model/weights
fingerprint, the adapter and the tenant's cache salt, so equal keys mean equal whole prefixes under the same
weights for the same tenant. SHA-256 is unkeyed, so keys are stable across restarts (a disk cache can find
blocks again) and, unlike Python's hash(), nobody can build a prompt whose block collides with another
user's. Each cached block also keeps its parent key and token ids, compared on every hit: a collision is a
miss, never someone else's KV.

Freed blocks keep their contents and key and sit in an LRU free list: a later request with the same prefix
takes them back (a cache hit) until they are evicted for new allocations, oldest first.

Window storage (DeepSeek-V4, `enable_windows`): besides its block (the "entries", kept for the sequence's life) a
block of a sequence may hold a window block (per-token rows the model reads only for the last `lookback` positions
before a step's first new token). A sequence holds window blocks for its blocks from the one holding position
num_computed - lookback on (`release_windows` drops those it moved past, at each schedule); a window block stays
attached to its block when released (reference count 0, LRU free list) until reused, so a prefix hit may take
blocks up to the last one whose predecessors' window rows are all still attached. `window_of` (a tensor the model
reads) maps each block to its window block, -1: none.

With a disk tier (`disk`, engine/disk_cache.py) every newly committed block is also written to disk, and a
prefix lookup that runs out of RAM blocks continues its chain on disk: each verified block read back is put
in a free block, as if it had stayed cached in RAM.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from selfseek.engine.disk_cache import DiskKVCache
from selfseek.engine.sequence import Sequence

KEY_VERSION = b"selfseek-block-key-v1"


def _digest(data: bytes) -> bytes:
    """The one hash behind every block key (a test may force collisions by replacing it)."""
    return hashlib.sha256(data).digest()


def root_key(fingerprint: bytes | str = b"", adapter: str | None = None, salt: str | None = None) -> bytes:
    """The parent key of a sequence's first block: what must match besides the tokens for blocks to be shared."""
    parts = [KEY_VERSION]
    for part in (fingerprint, adapter or "", salt or ""):
        b = part.encode() if isinstance(part, str) else bytes(part)
        parts += [len(b).to_bytes(8, "little"), b]  # length-prefixed: ("ab", "c") never equals ("a", "bc")
    return _digest(b"".join(parts))


def block_key(parent: bytes, tokens: list[int] | tuple[int, ...]) -> bytes:
    """Key of a full block: SHA-256 over the parent key and the block's token ids (int64 little-endian)."""
    ids = array("q", tokens)
    if array("q", [1]).tobytes()[0] != 1:  # big-endian host: keep keys identical across machines
        ids.byteswap()
    return _digest(parent + ids.tobytes())


def window_blocks_needed(lookback: int, max_num_seqs: int, max_num_batched_tokens: int, block_size: int,
                         drafts: int = 0) -> int:
    """Window blocks running sequences hold at once: each its last ceil((lookback + 1 + drafts) / block_size)
    blocks, the block straddled and the step's partial one, plus a step's new tokens."""
    per_seq = -(-(lookback + 1 + drafts) // block_size) + 2
    return max_num_seqs * per_seq + -(-max_num_batched_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 fingerprint: bytes | str = b""):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = enable_prefix_caching
        self.fingerprint = fingerprint
        self.root = root_key(fingerprint)  # no adapter, no salt
        self.ref_count = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.parent_of: list[bytes | None] = [None] * num_blocks  # compared on a hit, with the tokens
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_key: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.hits = 0  # prompt tokens served from cache
        self.queries = 0  # prompt tokens looked up
        self.disk: DiskKVCache | None = None  # the disk tier, when the engine has a prefix_cache_dir
        self.disk_hits = 0  # prompt tokens read back from the disk tier (also counted in `hits` once taken)
        self.window_of: torch.Tensor | None = None  # int64 [num_blocks]: window block of each block, -1: none
        self.num_window_blocks, self.lookback = 0, 0

    def enable_windows(self, lookback: int, max_num_seqs: int, max_num_batched_tokens: int,
                       drafts: int = 0, max_blocks: int | None = None) -> tuple[torch.Tensor, int, int]:
        """Give blocks window storage, sized for what running sequences hold at once (`window_blocks_needed`), at
        most `max_blocks`. -> (window_of, window blocks, block_size), the map the model's pools read
        (DeepseekV4LM.use_window_blocks)."""
        bs = self.block_size
        n = min(self.num_blocks, window_blocks_needed(lookback, max_num_seqs, max_num_batched_tokens, bs, drafts),
                max_blocks or self.num_blocks)
        self.num_window_blocks, self.lookback = n, lookback
        self.window_of = torch.full((self.num_blocks,), -1, dtype=torch.long)
        self._window = [-1] * self.num_blocks  # window_of as a list (cheap reads)
        self.window_owner = [-1] * n  # the block each window block is attached to
        self.window_ref = [0] * self.num_blocks  # sequences holding block b's window storage
        self.free_windows: OrderedDict[int, None] = OrderedDict((w, None) for w in range(n))  # LRU first
        self.window_start: dict[Sequence, int] = {}  # first block-table index whose window the sequence holds
        return self.window_of, n, bs

    @property
    def window_counters(self) -> dict[str, int]:
        """The window pool's blocks (engine stats): total, held by sequences, free (released ones included)."""
        return {"kv_window_blocks_total": self.num_window_blocks,
                "kv_window_blocks_used": self.num_window_blocks - len(self.free_windows),
                "kv_window_blocks_free": len(self.free_windows)}

    @property
    def num_free_windows(self) -> int:
        return len(self.free_windows) if self.window_of is not None else self.num_free

    def _first_window(self, num_computed: int) -> int:
        """Index of the first block whose window rows a step starting at `num_computed` reads."""
        return max(0, num_computed - self.lookback) // self.block_size

    def _attach(self, b: int, w: int) -> None:
        self._window[b] = w
        self.window_of[b] = w
        if w >= 0:
            self.window_owner[w] = b

    def _hold_window(self, b: int) -> None:
        """One more sequence needs block b's window rows: its attached window block, or a free one (LRU)."""
        w = self._window[b]
        if w < 0:
            w, _ = self.free_windows.popitem(last=False)
            if (old := self.window_owner[w]) >= 0:
                self._attach(old, -1)
            self._attach(b, w)
        elif self.window_ref[b] == 0:
            del self.free_windows[w]
        self.window_ref[b] += 1

    def _drop_window(self, b: int, first: bool = False) -> None:
        """A sequence no longer needs block b's window rows (kept attached while nobody reuses them; `first`:
        reused first)."""
        self.window_ref[b] -= 1
        if self.window_ref[b] == 0:
            self.free_windows[self._window[b]] = None
            self.free_windows.move_to_end(self._window[b], last=not first)

    def release_windows(self, seq: Sequence) -> None:
        """Drop the window storage of the sequence's blocks before the one its next step first reads."""
        start = self.window_start.get(seq) if self.window_of is not None else None
        if start is None:
            return
        keep = min(self._first_window(seq.num_computed), len(seq.block_table))
        for i in range(start, keep):
            self._drop_window(seq.block_table[i])
        self.window_start[seq] = max(start, keep)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def root_for(self, salt: str | None = None, adapter: str | None = None) -> bytes:
        """Root key for a tenant's cache salt and an adapter under this manager's model fingerprint."""
        return self.root if salt is None and adapter is None else root_key(self.fingerprint, adapter, salt)

    # ---- prefix cache ------------------------------------------------------------------------------
    def match_prefix(self, tokens: list[int], root: bytes | None = None) -> list[int]:
        """Cached blocks covering the longest prefix of full blocks of `tokens` (one token always left over,
        so the sequence still computes the logits of its last prompt token)."""
        if not self.prefix_caching:
            return []
        bs = self.block_size
        blocks, prev = [], root or self.root
        for i in range((len(tokens) - 1) // bs):
            block = tuple(tokens[i * bs : (i + 1) * bs])
            key = block_key(prev, block)
            b = self.by_key.get(key)
            if b is None or self.tokens_of[b] != block or self.parent_of[b] != prev:  # a collision is a miss
                if b is None and self.disk is not None and self.window_of is None:
                    blocks += self._match_on_disk(tokens, i, prev, blocks)
                break
            blocks.append(b)
            prev = key
        return self._windowed_prefix(blocks) if self.window_of is not None else blocks

    def _windowed_prefix(self, blocks: list[int]) -> list[int]:
        """The longest prefix of the hits whose last blocks (those a step after them reads) all have window rows."""
        run = 0  # hits ending at k - 1 with window rows attached, consecutively
        runs = []
        for b in blocks:
            run = run + 1 if self._window[b] >= 0 else 0
            runs.append(run)
        for k in range(len(blocks), 0, -1):
            if runs[k - 1] >= k - self._first_window(k * self.block_size):
                return blocks[:k]
        return []

    def _match_on_disk(self, tokens: list[int], start: int, prev: bytes, hits: list[int]) -> list[int]:
        """Continue a prefix match on disk from full block `start` (parent key `prev`): each block found and
        verified is read into a free block, cached under its key with ref count 0 (like a RAM hit in the free
        list). Only free blocks that are not `hits` are reused, least recently used first."""
        for b in hits:  # about to be taken: keep them from being the blocks the disk reads replace
            if b in self.free:
                self.free.move_to_end(b)
        spare = self.num_free - sum(1 for b in hits if self.ref_count[b] == 0)
        bs, loaded = self.block_size, []
        for i in range(start, (len(tokens) - 1) // bs):
            if len(loaded) >= spare:
                break
            block = tuple(tokens[i * bs : (i + 1) * bs])
            key = block_key(prev, block)
            payload = self.disk.read(key, prev, block)
            if payload is None:
                break
            b = next(iter(self.free))  # least recently used: neither a hit nor loaded here (both moved to the end)
            self._forget(b)
            self.disk.load_into(payload, b)
            self.key_of[b], self.by_key[key], self.parent_of[b], self.tokens_of[b] = key, b, prev, block
            self.free.move_to_end(b)
            loaded.append(b)
            prev = key
        self.disk_hits += len(loaded) * bs
        return loaded

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Name the sequence's newly completed blocks so later requests can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed // bs, len(seq.block_table))
        if seq.num_committed_blocks >= n_full:
            return
        root = seq.cache_root or self.root
        for i in range(len(seq.block_hashes), n_full):
            seq.block_hashes.append(block_key(seq.block_hashes[-1] if seq.block_hashes else root,
                                              seq.token_slice(i * bs, (i + 1) * bs)))
        for i in range(seq.num_committed_blocks, n_full):
            b, key = seq.block_table[i], seq.block_hashes[i]
            if self.key_of[b] is None and key not in self.by_key:
                self.key_of[b], self.by_key[key] = key, b
                self.parent_of[b] = seq.block_hashes[i - 1] if i else root
                self.tokens_of[b] = tuple(seq.token_slice(i * bs, (i + 1) * bs))
                if self.disk is not None:  # write-through: found again after a restart, no write on eviction
                    self.disk.store(key, self.parent_of[b], self.tokens_of[b], b)
        seq.num_committed_blocks = n_full

    # ---- allocation ----------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new: int, hits: list[int] = ()) -> bool:
        """Whether `num_new` more tokens fit, after taking the prefix-cache `hits` (free hits count too)."""
        have = len(seq.block_table) + len(hits)
        need = self.blocks_needed(seq.num_computed + len(hits) * self.block_size + num_new) - have
        free_hits = sum(1 for b in hits if self.ref_count[b] == 0)
        if need + free_hits > self.num_free:
            return False
        if self.window_of is None:
            return True
        first = self._first_window(seq.num_computed + len(hits) * self.block_size) - len(seq.block_table)
        free_windows = sum(1 for b in hits[max(0, first):] if self.window_ref[b] == 0)
        return max(0, need) + free_windows <= len(self.free_windows)

    def take_hits(self, seq: Sequence, hits: list[int]) -> None:
        for b in hits:
            if self.ref_count[b] == 0:
                del self.free[b]
            self.ref_count[b] += 1
        seq.block_table.extend(hits)
        seq.num_computed += len(hits) * self.block_size
        if self.window_of is not None:
            first = self._first_window(seq.num_computed)
            for b in seq.block_table[first:]:
                self._hold_window(b)
            self.window_start[seq] = first

    def allocate(self, seq: Sequence, num_new: int) -> None:
        """Grow the block table to hold seq.num_computed + num_new tokens."""
        for _ in range(self.blocks_needed(seq.num_computed + num_new) - len(seq.block_table)):
            b, _ = self.free.popitem(last=False)  # least recently freed
            self._forget(b)
            self.ref_count[b] = 1
            if self.window_of is not None:
                self.window_start.setdefault(seq, len(seq.block_table))
                self._hold_window(b)
            seq.block_table.append(b)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release the sequence's blocks past those holding its first `num_tokens` tokens (speculative decoding:
        the blocks only rejected drafts used). They were never committed, so they go first in the free list."""
        keep = max(self.blocks_needed(num_tokens), seq.num_committed_blocks)
        while len(seq.block_table) > keep:
            b = seq.block_table.pop()
            if self.window_of is not None and len(seq.block_table) >= self.window_start.get(seq, 0):
                self._drop_window(b, first=True)
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free[b] = None
                self.free.move_to_end(b, last=False)

    def _forget(self, b: int) -> None:
        """Evict block b's cached contents from the prefix cache (the disk tier keeps its copy)."""
        if self.key_of[b] is not None:
            del self.by_key[self.key_of[b]]
            self.key_of[b] = self.parent_of[b] = self.tokens_of[b] = None
        if self.window_of is not None and (w := self._window[b]) >= 0:  # its rows no longer b's next contents
            self._attach(b, -1)
            self.window_owner[w] = -1
            self.free_windows.move_to_end(w, last=False)

    def free_blocks(self, seq: Sequence) -> None:
        # Release from the tail so a sequence's last blocks are evicted before its shared prefix.
        if self.window_of is not None and (start := self.window_start.pop(seq, None)) is not None:
            for b in reversed(seq.block_table[start:]):
                self._drop_window(b)
        for b in reversed(seq.block_table):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free[b] = None
        seq.block_table = []
        seq.num_computed = seq.num_committed_blocks = 0

    def slots(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        """Pool slot of each of the sequence's first `num_tokens` tokens."""
        pos = torch.arange(num_tokens)
        table = torch.tensor(seq.block_table[: self.blocks_needed(num_tokens)], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
