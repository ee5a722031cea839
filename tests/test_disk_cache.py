"""The prefix cache's disk tier (engine/disk_cache.py): restart hits, integrity, tenant isolation, size cap,
concurrent writers."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest
import torch
from checkpoints import VOCAB, build_hf_model

from selfseek import SamplingParams
from selfseek.engine.disk_cache import DiskKVCache
from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.engine.kv_cache import block_key, root_key
from selfseek.server.metrics import _EngineCollector
from selfseek.weights.safetensors import load_checkpoint

BS = 16
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)


def _load(tmp_path_factory, family: str):
    path = tmp_path_factory.mktemp(family)
    build_hf_model(family).save_pretrained(path)
    return load_checkpoint(path, progress=False)


@pytest.fixture(scope="module")
def mla(tmp_path_factory):
    return _load(tmp_path_factory, "v3_long")


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return _load(tmp_path_factory, "qwen2")


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PREFIX = _prompt(100, 1)  # 6 full blocks of 16


def _engine(model, cache_dir=None, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory", 1 << 24)
    return LLMEngine(model, None, EngineArgs(block_size=BS, prefix_cache_dir=cache_dir and str(cache_dir), **kw))


def _run(engine: LLMEngine, prompt: list[int], params: SamplingParams = PARAMS):
    """-> (tokens, logprobs per token, num_cached_tokens) of one request run to the end."""
    engine.add_request("r", engine.prepare(prompt, params), params)
    tokens, logprobs, cached = [], [], None
    while engine.has_work():
        for d in engine.step():
            tokens += d.token_ids
            logprobs += d.logprobs or []
            cached = d.num_cached_tokens
    return tokens, logprobs, cached


def _assert_same(got, want, exact: bool = False):
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1], strict=True):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t] == b[t] if exact else abs(a[t] - b[t]) <= 1e-5, (t, a[t], b[t])


@pytest.mark.parametrize("family", ["mla", "gqa"])
def test_a_restart_serves_the_prefix_from_disk(family, request, tmp_path):
    model = request.getfixturevalue(family)
    second = PREFIX + _prompt(9, 3)
    cold = _run(_engine(model, enable_prefix_caching=False), second)

    first_engine = _engine(model, tmp_path)
    assert _run(first_engine, PREFIX + _prompt(20, 2))[2] == 0
    assert first_engine.stats()["disk_writes"] >= 6
    ram_hit = _run(first_engine, second)
    assert ram_hit[2] == 96
    del first_engine  # the "restart": a new engine over the same directory, nothing in RAM

    restarted = _engine(model, tmp_path)
    disk_hit = _run(restarted, second)
    stats = restarted.stats()
    assert disk_hit[2] == 96 and stats["prefix_cache_disk_hit_tokens"] == 96
    assert stats["prefix_cache_hit_tokens"] == 96 and stats["disk_hit_blocks"] == 6
    metrics = {f.name: f.samples[0].value for f in _EngineCollector(restarted.stats, "m", None).collect()}
    assert metrics["selfseek:prefix_cache_disk_hits"] == 96 and metrics["selfseek:prefix_cache_hits"] == 96
    _assert_same(disk_hit, cold)  # paged attention over cached KV vs a dense prefill: fp32 rounding only
    _assert_same(disk_hit, ram_hit, exact=True)  # the very bytes the RAM tier held
    assert _run(restarted, second)[2] == 96 and restarted.stats()["disk_hit_blocks"] == 6  # now a RAM hit


def test_without_a_directory_nothing_is_written(mla, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = _engine(mla)
    _run(engine, PREFIX)
    assert engine.blocks.disk is None and "disk_writes" not in engine.stats() and not os.listdir(tmp_path)


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[-5] ^= 0x40  # one payload bit: only the checksum can tell
    path.write_bytes(bytes(data[: len(data) // 2]) if how == "truncate" else bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_file_is_a_miss_and_is_replaced(mla, tmp_path, how):
    prompt = PREFIX + _prompt(5, 4)
    cold = _run(_engine(mla, enable_prefix_caching=False), prompt)
    _run(_engine(mla, tmp_path), prompt)
    keys, prev = [], root_key(_engine(mla).fingerprint)
    for i in range(6):
        prev = block_key(prev, tuple(PREFIX[i * BS : (i + 1) * BS]))
        keys.append(prev)
    bad = tmp_path / keys[3].hex()
    _damage(bad, how)

    engine = _engine(mla, tmp_path)
    got = _run(engine, prompt)
    assert got[2] == 3 * BS  # the chain stops at the damaged block
    assert engine.stats()["disk_rejected"] == 1
    _assert_same(got, cold)
    # recomputed and written again: a third engine reads the whole prefix
    again = _engine(mla, tmp_path)
    assert _run(again, prompt)[2] == 96 and again.stats()["disk_rejected"] == 0


def test_another_tenant_or_model_never_hits(mla, tmp_path):
    salted = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, cache_salt="tenant-a")
    _run(_engine(mla, tmp_path), PREFIX, salted)
    assert _run(_engine(mla, tmp_path), PREFIX, salted)[2] == 96
    other = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, cache_salt="tenant-b")
    assert _run(_engine(mla, tmp_path), PREFIX, other)[2] == 0
    assert _run(_engine(mla, tmp_path), PREFIX, SamplingParams(temperature=0, max_tokens=2))[2] == 0
    assert _run(_engine(mla, tmp_path, model_fingerprint="other weights"), PREFIX, salted)[2] == 0


def _pools(n_blocks: int = 8, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n_blocks * BS, 2, 3, generator=g).to(dtype) for _ in range(2)]


def _block(i: int) -> tuple[bytes, bytes, tuple[int, ...]]:
    tokens = tuple(range(100 + i * BS, 100 + (i + 1) * BS))  # 3 digits each: every block file has one size
    parent = root_key(f"parent {i}")
    return block_key(parent, tokens), parent, tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_round_trip_and_any_header_mismatch_is_a_miss(tmp_path, dtype):
    pools = _pools(dtype=dtype)
    disk = DiskKVCache(tmp_path, 1 << 30, "fp", BS, pools)
    key, parent, tokens = _block(2)
    assert disk.store(key, parent, tokens, 2) and not disk.store(key, parent, tokens, 2)  # written once
    target = _pools(dtype=dtype)
    disk2 = DiskKVCache(tmp_path, 1 << 30, "fp", BS, target)
    disk2.load_into(disk2.read(key, parent, tokens), 5)
    for a, b in zip(pools, target, strict=True):
        assert torch.equal(a[2 * BS : 3 * BS], b[5 * BS : 6 * BS])
    # a key names one (parent, tokens): other tokens under it are a collision or a bad file, deleted either way
    assert disk2.read(key, parent, tokens[:-1] + (0,)) is None and not disk2.has(key)
    for other in (DiskKVCache(tmp_path, 1 << 30, "other model", BS, pools),
                  DiskKVCache(tmp_path, 1 << 30, "fp", BS // 2, pools),
                  DiskKVCache(tmp_path, 1 << 30, "fp", BS, [p.to(torch.float16) for p in pools]),
                  DiskKVCache(tmp_path, 1 << 30, "fp", BS, [p.reshape(len(p), 6) for p in pools])):
        assert disk.store(key, parent, tokens, 2)
        assert other.read(key, parent, tokens) is None and not other.has(key)
    assert disk.store(key, parent, tokens, 2) and disk2.read(key, parent, tokens) is not None


def test_the_size_cap_deletes_least_recently_used_files(tmp_path):
    pools = _pools()
    probe = DiskKVCache(tmp_path / "probe", 1 << 30, "fp", BS, pools)
    probe.store(*_block(0), 0)
    file_size = os.path.getsize(probe.path(_block(0)[0]))
    disk = DiskKVCache(tmp_path / "c", 4 * file_size, "fp", BS, pools)
    for i in range(4):
        disk.store(*_block(i), i)
        os.utime(disk.path(_block(i)[0]), (1000 + i, 1000 + i))  # distinct ages, oldest first
    assert disk.read(*_block(0)) is not None  # a hit makes block 0 the most recently used
    disk.store(*_block(4), 4)  # over the cap: down to 90% of it, oldest first
    present = [i for i in range(5) if disk.has(_block(i)[0])]
    assert present == [0, 3, 4] and disk.counters["disk_evicted_files"] == 2
    assert disk.bytes_used == 3 * file_size


def _write_repeatedly(directory: str, rounds: int) -> None:
    disk = DiskKVCache(directory, 1 << 30, "fp", BS, _pools())
    key, parent, tokens = _block(1)
    for _ in range(rounds):
        disk.path(key).unlink(missing_ok=True)  # so every round really writes
        disk.store(key, parent, tokens, 1)


def test_concurrent_writers_leave_a_valid_file(tmp_path):
    key, parent, tokens = _block(1)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_repeatedly, args=(str(tmp_path), 30)) for _ in range(2)]
    threads = [threading.Thread(target=_write_repeatedly, args=(str(tmp_path), 30)) for _ in range(2)]
    for w in procs + threads:
        w.start()
    reader = DiskKVCache(tmp_path, 1 << 30, "fp", BS, _pools())
    while any(w.is_alive() for w in procs + threads):
        reader.read(key, parent, tokens)  # finds no file or a whole one, never a torn one (that would be rejected)
    for w in procs + threads:
        w.join()
    assert all(p.exitcode == 0 for p in procs)
    _write_repeatedly(str(tmp_path), 1)
    payload = reader.read(key, parent, tokens)
    assert reader.counters["disk_rejected"] == 0 and payload is not None
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []
    reader.load_into(payload, 0)
    assert torch.equal(reader.pools[0][:BS], _pools()[0][BS : 2 * BS])


def test_disk_reads_never_take_the_blocks_of_the_hits(mla, tmp_path):
    """A pool just as large as the request, whose RAM hits are the least recently used free blocks: the blocks
    read from disk must reuse other free blocks, not the hits of the same lookup, and the request must fit."""
    prompt = PREFIX + _prompt(5, 6)  # 105 + 6 generated tokens: 7 blocks
    cold = _run(_engine(mla, enable_prefix_caching=False), prompt)
    _run(_engine(mla, tmp_path), prompt)
    per_block = BS * _engine(mla).kv_bytes_per_token
    engine = _engine(mla, tmp_path, kv_cache_memory=7 * per_block)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    assert _run(engine, PREFIX[: 3 * BS + 1], one)[2] == 3 * BS  # blocks 0-2 of the prefix now in RAM
    _run(engine, _prompt(60, 7), one)  # an unrelated prompt: its blocks are freed after the prefix's
    got = _run(engine, prompt)
    assert got[2] == 96 and engine.stats()["prefix_cache_disk_hit_tokens"] == 3 * BS + 3 * BS
    _assert_same(got, cold)


@pytest.fixture(scope="module")
def mla_mtp(tmp_path_factory):
    """The MLA model with a randomly initialised MTP layer (the tiny checkpoint has none)."""
    from selfseek.models.mtp import MTPLayer

    model = _load(tmp_path_factory, "v3_long")
    torch.manual_seed(0)
    model.mtp = torch.nn.ModuleList([MTPLayer(model.config, model.config.num_hidden_layers)])
    with torch.no_grad():
        for p in model.mtp.parameters():  # away from the all-ones norms and default init: distinct drafts
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _mtp_blocks(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """The MTP pool's slots of the prompt's full blocks, found by their keys in the RAM prefix cache."""
    key, pool, out = engine.blocks.root, engine.speculative.mtp_pool, []
    for i in range(len(prompt) // BS):
        key = block_key(key, prompt[i * BS : (i + 1) * BS])
        b = engine.blocks.by_key[key]
        out.append(pool[b * BS : (b + 1) * BS])
    return torch.stack(out)


def test_the_mtp_pool_is_spilled_and_restored_with_the_blocks(mla_mtp, tmp_path):
    """With speculative decoding the MTP module's cache travels with each block (written once the step has
    filled it): after a restart the disk hit restores those bytes, so the drafts are those of a cold run."""
    prompt = PREFIX + _prompt(9, 3)
    drafts = []

    def run(engine):
        runner, made = engine.speculative, []
        propose = runner.propose

        def recording():
            propose()
            made.extend(d.tokens[0] for d in runner.drafts.values())

        runner.propose = recording
        drafts.append(made)
        return _run(engine, prompt)

    first = _engine(mla_mtp, tmp_path, speculative_tokens=1)
    cold = run(first)
    assert cold[2] == 0 and first.stats()["disk_writes"] >= 6
    want = _mtp_blocks(first, prompt)
    assert want.flatten(1).abs().sum(dim=1).min() > 0  # every block's MTP slots were written
    del first

    restarted = _engine(mla_mtp, tmp_path, speculative_tokens=1)
    hit = run(restarted)
    assert hit[2] == 96 and restarted.stats()["disk_hit_blocks"] == 6
    assert torch.equal(_mtp_blocks(restarted, prompt), want)
    assert drafts[1] == drafts[0] and len(drafts[0]) >= PARAMS.max_tokens - 1
    _assert_same(hit, cold)
