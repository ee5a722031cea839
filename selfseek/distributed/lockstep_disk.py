"""The prefix cache's disk tier (engine/disk_cache.py) on a parallel model: every rank its own shard's files.

Each rank holds its own part of the KV (TP: its heads for GQA, a copy of the MLA latent; with speculative decoding
its part of the MTP pool too), so each writes and reads its own block files under DIR/rank<k>/, keyed by the same
SHA-256 block keys. Rank 0's BlockManager decides as with one process, through `LockstepDiskCache`, whose every
call runs on all ranks in the same lockstep command as the model's calls (launch.py). A block read is a hit only if
every rank's file is there and verifies: the ranks agree by an all-reduce of their misses, so no rank ever loads a
block another rank lacks. Each rank's directory is capped at `max_bytes`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfseek.distributed import comm as comm_mod
from selfseek.engine.disk_cache import DiskKVCache


# ---- run on every rank, on its own shard (lockstep commands) ---------------------------------------------------
def disk_open(model, directory: str, max_bytes: int, fingerprint: str, block_size: int,
              pools: list[torch.Tensor]) -> None:
    rank = comm_mod.current().rank
    model.disk_shard = DiskKVCache(Path(directory) / f"rank{rank}", max_bytes, fingerprint, block_size, pools)
    model.disk_payload = None


def disk_write(model, items: list[tuple[bytes, bytes, tuple[int, ...], int]]) -> list[bool]:
    """Write each (key, parent, tokens, block) of this rank's pools unless its file exists -> which it wrote."""
    return [model.disk_shard.store(*item) for item in items]


def disk_read(model, key: bytes, parent: bytes, tokens: tuple[int, ...]) -> torch.Tensor | None:
    """This rank's verified payload of `key` if every rank has and verifies its own, else None (on every rank)."""
    disk: DiskKVCache = model.disk_shard
    payload = disk.read(key, parent, tokens)
    comm = comm_mod.current()
    misses = torch.tensor([float(payload is None)], device=comm.device)
    comm.all_reduce(misses)
    if payload is not None and misses.item():  # another rank missed: not a hit after all
        disk.counters["disk_hit_blocks"] -= 1
        payload = None
    model.disk_payload = payload
    return payload


def disk_load(model, block: int) -> None:
    """Copy the payload the last disk_read agreed on into block `block` of this rank's pools."""
    payload, model.disk_payload = model.disk_payload, None
    if payload is None:
        raise RuntimeError("disk_load without an agreed disk_read before it")
    model.disk_shard.load_into(payload, block)


DISK_CALLS = {"disk_open": disk_open, "disk_write": disk_write, "disk_read": disk_read, "disk_load": disk_load}


# ---- rank 0: the engine's view ---------------------------------------------------------------------------------
class LockstepDiskCache:
    """DiskKVCache's interface for kv_cache.BlockManager (store, flush, read, load_into, counters), each call made
    on every rank's own files and pools. Deferred writes (the MTP pool, complete only after sampling) are queued here
    and sent as one command per flush."""

    def __init__(self, model, directory, max_bytes: int, fingerprint: str, block_size: int,
                 pools: list[torch.Tensor], defer_writes: bool = False):
        self.model, self.defer_writes = model, defer_writes
        self.pending: list[tuple[bytes, bytes, tuple[int, ...], int]] = []
        self._call("disk_open", str(directory), max_bytes, str(fingerprint), block_size, pools)

    def _call(self, name: str, *args):
        return self.model.lockstep.call(self.model, name, *args)

    @property
    def counters(self) -> dict[str, int]:
        return self.model.disk_shard.counters  # rank 0's files

    def store(self, key: bytes, parent: bytes, tokens: tuple[int, ...], block: int) -> bool:
        if self.defer_writes:
            self.pending.append((key, parent, tokens, block))
            return False
        return self._call("disk_write", [(key, parent, tokens, block)])[0]

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if pending:
            self._call("disk_write", pending)

    def read(self, key: bytes, parent: bytes, tokens: tuple[int, ...]) -> torch.Tensor | None:
        return self._call("disk_read", key, parent, tokens)

    def load_into(self, payload: torch.Tensor, block: int) -> None:
        """Each rank loads the payload its own disk_read verified (rank 0's is `payload`)."""
        self._call("disk_load", block)
