"""The prefix cache's disk tier: full KV blocks kept in a directory, found again after a restart.

DeepSeek's API keeps repeated prefixes "on disk" across its servers' lifetimes; this is the self-hosted
version. A full block is written once, when it is first committed to the RAM prefix cache (write-through:
a restart, or a crash, still finds every block computed before it, not only those evicted under memory
pressure; eviction from RAM then needs no write). Its file is `<dir>/<key hex>`, the block's SHA-256
chained key (kv_cache.block_key): stable across restarts, salted per tenant and rooted in the weights'
fingerprint, so only the same tenant under the same model finds it.

File: MAGIC, a 4-byte little-endian header length, a JSON header (format version, weights fingerprint, block
size, each layer's dtype and per-token shape, the key, its parent key and token ids, the payload's length and
SHA-256), then the payload: every layer's slots of the block, in layer order, raw (MLA: the latent and roped
key; GQA: K and V), and with speculative decoding the MTP module's pool last (acceptance survives a disk hit).
A read checks all of it against what the caller expects; any mismatch, a short or torn file, or a bad checksum
is a miss and the file is deleted, so wrong KV is never used. Writers write a private temp file and os.replace
it: readers see the old file or the new one, never a mix, and two workers writing the same key leave one valid
file. No fsync: a file torn by a power cut fails its checksum.

The directory is capped at `max_bytes`: when a write takes it over, files are deleted least recently used
first (by mtime, which a hit refreshes: atime is often off) down to 90% of the cap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import torch

log = logging.getLogger("selfseek.engine")

MAGIC = b"SSKVBLK\x01"
VERSION = 1
_TMP = ".tmp-"
_STALE_TMP_S = 3600.0  # a temp file this old belongs to a writer that died


def _layout(pools: list[torch.Tensor]) -> list[list]:
    return [[str(p.dtype).removeprefix("torch."), list(p.shape[1:])] for p in pools]


def open_disk_cache(model, directory: str | os.PathLike, max_bytes: int, fingerprint: str, block_size: int,
                    pools: list[torch.Tensor], defer_writes: bool = False) -> DiskKVCache:
    """The disk tier of `model`'s KV `pools`: a DiskKVCache, or the model's own (a parallel model's: each rank's
    shard in its own files, distributed/lockstep_disk.py)."""
    opener = getattr(model, "open_disk_cache", None)
    if opener is not None:
        return opener(directory, max_bytes, fingerprint, block_size, pools, defer_writes)
    return DiskKVCache(directory, max_bytes, fingerprint, block_size, pools, defer_writes)


class DiskKVCache:
    def __init__(self, directory: str | os.PathLike, max_bytes: int, fingerprint: str, block_size: int,
                 pools: list[torch.Tensor], defer_writes: bool = False):
        if max_bytes <= 0:
            raise ValueError(f"prefix_cache_disk_bytes must be positive, got {max_bytes}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.fingerprint, self.block_size = max_bytes, str(fingerprint), block_size
        if len({p.dtype for p in pools}) != 1:
            raise ValueError("the disk tier needs every layer's KV pool in one dtype")
        self.pools, self.dtype = pools, pools[0].dtype
        self.layout = _layout(pools)
        self.slot_values = [p[0].numel() for p in pools]  # values of one token slot, per layer
        self.payload_bytes = block_size * sum(self.slot_values) * pools[0].element_size()
        self.counters = {"disk_writes": 0, "disk_write_bytes": 0, "disk_hit_blocks": 0, "disk_rejected": 0,
                         "disk_evicted_files": 0}
        self.bytes_used = self._scan()[1]  # this process's running estimate; _evict rescans the directory
        # Deferred: store() queues and flush() writes, for pools that are complete only later in the step (the
        # MTP pool, written after sampling: engine/speculative.py). The caller flushes before any allocation.
        self.defer_writes = defer_writes
        self.pending: list[tuple[bytes, bytes, tuple[int, ...], int]] = []

    def path(self, key: bytes) -> Path:
        return self.dir / key.hex()

    def has(self, key: bytes) -> bool:
        return self.path(key).is_file()

    # ---- write -----------------------------------------------------------------------------------------
    def store(self, key: bytes, parent: bytes, tokens: tuple[int, ...], block: int) -> bool:
        """Write block `block` of the pools as `key` unless a file for it exists (deferred: at the next flush);
        -> whether it wrote now."""
        if self.defer_writes:
            self.pending.append((key, parent, tokens, block))
            return False
        return self._write(key, parent, tokens, block)

    def flush(self) -> None:
        """Write the blocks stored since the last flush (deferred mode), before their blocks can be reused."""
        pending, self.pending = self.pending, []
        for item in pending:
            self._write(*item)

    def _write(self, key: bytes, parent: bytes, tokens: tuple[int, ...], block: int) -> bool:
        path = self.path(key)
        if path.is_file():
            return False
        slots = slice(block * self.block_size, (block + 1) * self.block_size)
        with torch.no_grad():  # one device->host copy for all layers (cat in the pools' dtype: uint8 cat is slow)
            payload = torch.cat([p[slots].reshape(-1) for p in self.pools]).view(torch.uint8).cpu().numpy()
        header = json.dumps({
            "version": VERSION, "fingerprint": self.fingerprint, "block_size": self.block_size,
            "layout": self.layout, "key": key.hex(), "parent": parent.hex(), "tokens": list(tokens),
            "payload_bytes": payload.nbytes, "sha256": hashlib.sha256(payload).hexdigest(),
        }, separators=(",", ":")).encode()
        tmp = self.dir / f"{_TMP}{key.hex()}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + len(header).to_bytes(4, "little") + header)
                f.write(payload)
            os.replace(tmp, path)  # atomic: readers see no file or the whole file
        except OSError as e:  # a full or read-only disk costs the cache, not the request
            log.warning("prefix cache: cannot write %s: %s", path, e)
            tmp.unlink(missing_ok=True)
            return False
        size = len(MAGIC) + 4 + len(header) + payload.nbytes
        self.counters["disk_writes"] += 1
        self.counters["disk_write_bytes"] += size
        self.bytes_used += size
        if self.bytes_used > self.max_bytes:
            self._evict()
        return True

    # ---- read ------------------------------------------------------------------------------------------
    def read(self, key: bytes, parent: bytes, tokens: tuple[int, ...]) -> torch.Tensor | None:
        """The verified payload of `key` (flat, in the pools' dtype and on their device), or None: no file, or
        one that does not hold exactly this block of this model (deleted)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)  # writable, as torch.frombuffer wants
                del data[f.readinto(data) :]  # a file cut short meanwhile: the checks reject it
        except OSError:
            return None
        payload_at = self._check(data, key, parent, tokens)
        if payload_at is None:
            self.counters["disk_rejected"] += 1
            log.warning("prefix cache: %s does not match this model or block, or is damaged: deleted", path)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        self.counters["disk_hit_blocks"] += 1
        return torch.frombuffer(data, dtype=self.dtype, offset=payload_at).to(self.pools[0].device)

    def _check(self, data: bytearray, key: bytes, parent: bytes, tokens: tuple[int, ...]) -> int | None:
        """Offset of the payload if the file is whole and is this block under this model, else None."""
        start = len(MAGIC) + 4
        if len(data) < start or data[: len(MAGIC)] != MAGIC:
            return None
        end = start + int.from_bytes(data[len(MAGIC) : start], "little")
        try:
            h = json.loads(bytes(data[start:end]))
        except (ValueError, UnicodeDecodeError):
            return None
        expected = {"version": VERSION, "fingerprint": self.fingerprint, "block_size": self.block_size,
                    "layout": self.layout, "key": key.hex(), "parent": parent.hex(), "tokens": list(tokens),
                    "payload_bytes": self.payload_bytes}
        if not isinstance(h, dict) or any(h.get(k) != v for k, v in expected.items()):
            return None
        payload = memoryview(data)[end:]
        if len(payload) != self.payload_bytes or hashlib.sha256(payload).hexdigest() != h.get("sha256"):
            return None
        return end

    def load_into(self, payload: torch.Tensor, block: int) -> None:
        """Copy a verified payload into block `block` of every layer's pool."""
        slots = slice(block * self.block_size, (block + 1) * self.block_size)
        offset = 0
        with torch.no_grad():
            for p, n in zip(self.pools, self.slot_values, strict=True):
                size = n * self.block_size
                p[slots].copy_(payload[offset : offset + size].view(self.block_size, *p.shape[1:]))
                offset += size

    # ---- size cap --------------------------------------------------------------------------------------
    def _scan(self) -> tuple[list[tuple[float, int, Path]], int]:
        """(mtime, size, path) of every block file, and their total size; removes dead writers' temp files."""
        files, total, now = [], 0, time.time()
        for entry in os.scandir(self.dir):
            try:
                st = entry.stat()
                if entry.name.startswith(_TMP):
                    if now - st.st_mtime > _STALE_TMP_S:
                        os.unlink(entry.path)
                    continue
                if entry.is_file():
                    files.append((st.st_mtime, st.st_size, Path(entry.path)))
                    total += st.st_size
            except OSError:  # another worker removed it meanwhile
                continue
        return files, total

    def _evict(self) -> None:
        files, total = self._scan()
        files.sort(key=lambda f: f[0])
        target = int(self.max_bytes * 0.9)  # headroom, so the directory is not rescanned on every write
        for _, size, path in files:
            if total <= target:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.counters["disk_evicted_files"] += 1
        self.bytes_used = total
