"""The block manager (allocation, free, LRU prefix cache, SHA-256 block keys) and the scheduler (budget, FCFS,
preemption, prefix hits, n > 1 leaders), without a model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from selfseek.engine import kv_cache
from selfseek.engine.kv_cache import BlockManager, block_key, root_key
from selfseek.engine.scheduler import Scheduler
from selfseek.engine.sequence import Sequence, Status
from selfseek.sampling_params import SamplingParams

BS = 4


def _seq(tokens: list[int], arrival: int = 0, root: bytes | None = None, rid: str = "r") -> Sequence:
    return Sequence(rid, 0, list(tokens), SamplingParams(), arrival, cache_root=root)


def _run_prompt(bm: BlockManager, seq: Sequence) -> None:
    """Compute the whole prompt (as a step would) and offer its full blocks to the cache."""
    hits = bm.match_prefix(seq.tokens, seq.cache_root)
    bm.take_hits(seq, hits)
    bm.allocate(seq, seq.num_tokens - seq.num_computed)
    seq.num_computed = seq.num_tokens
    bm.commit_full_blocks(seq)


# ---- block manager -------------------------------------------------------------------------------------
def test_allocate_and_free_return_every_block_tail_first():
    bm = BlockManager(8, BS)
    a = _seq(list(range(10)))
    bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_free == 5
    assert all(bm.ref_count[b] == 1 for b in a.block_table)
    table = list(a.block_table)
    bm.free_blocks(a)
    assert bm.num_free == 8 and a.block_table == [] and a.num_computed == 0
    assert list(bm.free)[-3:] == table[::-1]  # the tail is evicted first, the shared prefix last


def test_can_allocate_counts_blocks_and_free_hits():
    bm = BlockManager(4, BS)
    a = _seq(list(range(9)))
    _run_prompt(bm, a)  # 3 blocks, 2 of them full and cached
    b = _seq(list(range(9)) + [50, 51, 52])
    hits = bm.match_prefix(b.tokens)
    assert hits == a.block_table[:2]
    assert bm.can_allocate(b, 4, hits)  # 2 hit blocks in use, the 4 new tokens need 1 of the 1 free block
    assert not bm.can_allocate(b, 5, hits)
    bm.free_blocks(a)  # the hits are now free cached blocks: taking them costs free blocks too
    assert bm.can_allocate(b, 8, hits) and not bm.can_allocate(b, 9, hits)


def test_prefix_hit_reuses_blocks_and_leaves_the_last_token():
    bm = BlockManager(16, BS)
    a = _seq(list(range(8)))  # exactly two blocks
    _run_prompt(bm, a)
    assert bm.match_prefix(list(range(8))) == a.block_table[:1]  # the last token must be computed again
    assert bm.match_prefix(list(range(9))) == a.block_table[:2]
    assert bm.match_prefix([0, 1, 2, 9, 4, 5, 6, 7, 8]) == []
    b = _seq(list(range(8)) + [20, 21, 22])
    _run_prompt(bm, b)
    assert b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_count[x] for x in a.block_table[:2]] == [2, 2]


def test_eviction_drops_the_cached_key():
    bm = BlockManager(3, BS)
    a = _seq(list(range(9)))
    _run_prompt(bm, a)
    table = list(a.block_table)
    bm.free_blocks(a)
    assert bm.match_prefix(list(range(9))) == table[:2]  # freed blocks stay cached
    other = _seq([100 + i for i in range(12)])
    bm.allocate(other, 12)  # takes all three blocks: both cached ones are evicted
    assert bm.by_key == {} and bm.match_prefix(list(range(9))) == []


def test_a_forced_key_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(kv_cache, "_digest", lambda data: b"\0" * 32)  # every key is the same
    bm = BlockManager(16, BS)
    a = _seq([1, 2, 3, 4, 5])
    _run_prompt(bm, a)
    assert len(bm.by_key) == 1
    assert bm.match_prefix([9, 9, 9, 9, 5]) == []  # same key, other tokens: never a's KV
    assert bm.match_prefix([1, 2, 3, 4, 5]) == a.block_table[:1]  # the true owner still hits


def test_tenant_salts_do_not_share_and_equal_salts_do():
    bm = BlockManager(16, BS)
    prompt = list(range(13))
    alice, bob = bm.root_for("alice"), bm.root_for("bob")
    a = _seq(prompt, root=alice)
    _run_prompt(bm, a)
    assert bm.match_prefix(prompt, bob) == []
    assert bm.match_prefix(prompt) == []  # no salt is its own tenant too
    assert bm.match_prefix(prompt, bm.root_for("alice")) == a.block_table[:3]


def test_fingerprint_and_adapter_separate_caches():
    assert root_key("weights-a") != root_key("weights-b")
    assert root_key("w", "lora-1") != root_key("w", "lora-2") != root_key("w")
    assert root_key("w", "ab", "c") != root_key("w", "a", "bc")  # fields cannot run into each other
    bm = BlockManager(16, BS, fingerprint="weights-a")
    _run_prompt(bm, _seq(list(range(9))))
    other = BlockManager(16, BS, fingerprint="weights-b")
    assert block_key(bm.root, range(4)) != block_key(other.root, range(4))


def test_block_keys_are_stable_across_processes():
    expr = "kv_cache.block_key(kv_cache.block_key(kv_cache.root_key('fp', 'lora', 'salt'), [1, 2, 3]), [4, 5]).hex()"
    here = eval(expr)
    code = f"from selfseek.engine import kv_cache; print({expr})"
    for seed in ("1", "2"):  # Python's hash() differs with PYTHONHASHSEED; the block key must not
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == here
    assert len(bytes.fromhex(here)) == 32


def test_a_preempted_sequence_commits_its_blocks_again():
    bm = BlockManager(16, BS)
    a = _seq(list(range(9)))
    _run_prompt(bm, a)
    bm.free_blocks(a)
    assert a.num_committed_blocks == 0 and len(a.block_hashes) == 2  # keys kept, commits redone
    bm.allocate(a, 9)
    a.num_computed = 9
    bm.commit_full_blocks(a)
    assert a.num_committed_blocks == 2


# ---- scheduler -----------------------------------------------------------------------------------------
def _sched(num_blocks: int = 64, budget: int = 16, max_seqs: int = 8, caching: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, caching), budget, max_seqs)


def _finish_step(sch: Scheduler, scheduled) -> None:
    """What the engine does after a forward: count the computed tokens, commit blocks, sample a token."""
    for s in scheduled:
        seq = s.seq
        seq.num_computed += s.num_new
        sch.blocks.commit_full_blocks(seq)
        if seq.num_computed == seq.num_tokens:
            seq.output_ids.append(7)


def test_budget_chunks_prompts_and_keeps_fcfs():
    sch = _sched(budget=16)
    seqs = [_seq(list(range(10 * i, 10 * i + 10)), arrival=i, rid=f"r{i}") for i in range(3)]
    for s in seqs:
        sch.add(s)
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_new) for s in out] == [("r0", 10), ("r1", 6)]
    _finish_step(sch, out)
    out = sch.schedule()  # running first: r0 decodes one token, r1 finishes its prompt, r2 starts
    assert [(s.seq.request_id, s.num_new) for s in out] == [("r0", 1), ("r1", 4), ("r2", 10)]
    assert out[1].samples and out[2].samples


def test_max_num_seqs_bounds_the_running_set():
    sch = _sched(budget=100, max_seqs=2)
    for i in range(3):
        sch.add(_seq([1, 2, 3], arrival=i, rid=f"r{i}"))
    assert [s.seq.request_id for s in sch.schedule()] == ["r0", "r1"]
    assert len(sch.waiting) == 1


def test_preemption_frees_the_newest_and_requeues_it_in_order():
    sch = _sched(num_blocks=4, budget=64)
    a, b = _seq(list(range(8)), 0, rid="a"), _seq(list(range(20, 28)), 1, rid="b")
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    assert [s.seq.request_id for s in out] == ["a", "b"] and sch.blocks.num_free == 0
    _finish_step(sch, out)
    out = sch.schedule()  # a needs a third block for its 9th token: b (newest) is preempted
    assert [s.seq.request_id for s in out] == ["a"]
    assert sch.num_preemptions == 1 and b.status == Status.WAITING and b.block_table == []
    assert b.num_computed == 0 and b.output_ids == [7]  # its output is kept, recomputed later
    assert list(sch.waiting) == [b]
    sch.finish(a)
    assert sch.blocks.num_free == 4 and a.status == Status.FINISHED
    out = sch.schedule()
    # its first full block came back from the cache; a's growth evicted the second (freed tail first)
    assert out[0].seq is b and out[0].num_new == 9 - 4


def test_prefix_hits_count_and_skip_computed_tokens():
    sch = _sched(budget=64)
    a = _seq(list(range(12)), 0, rid="a")
    sch.add(a)
    out = sch.schedule()
    _finish_step(sch, out)
    sch.finish(a)
    b = _seq(list(range(12)) + [99], 1, rid="b")
    sch.add(b)
    out = sch.schedule()
    assert b.num_cached_prompt == 12 and out[0].num_new == 1
    assert sch.blocks.hits == 12 and sch.blocks.queries == 12 + 13


def test_n_siblings_wait_for_the_leader_prompt():
    sch = _sched(budget=64)
    leader = _seq(list(range(9)), 0)
    sib = Sequence("r", 1, list(range(9)), SamplingParams(), 1, leader=leader)
    sch.add(leader)
    sch.add(sib)
    out = sch.schedule()
    assert [s.seq for s in out] == [leader] and list(sch.waiting) == [sib]
    _finish_step(sch, out)
    out = sch.schedule()
    assert out[1].seq is sib and sib.num_cached_prompt == 8  # the leader's two full blocks


def test_a_prompt_that_can_never_fit_schedules_nothing():
    sch = _sched(num_blocks=2, budget=64)
    sch.add(_seq(list(range(20))))  # needs 5 blocks of 2
    assert sch.schedule() == [] and len(sch.waiting) == 1  # the engine's _fail_unschedulable takes over


@pytest.mark.parametrize("caching", [True, False])
def test_finish_frees_everything(caching):
    sch = _sched(num_blocks=8, budget=64, caching=caching)
    seqs = [_seq(list(range(5 * i, 5 * i + 6)), i, rid=f"r{i}") for i in range(3)]
    for s in seqs:
        sch.add(s)
    _finish_step(sch, sch.schedule())
    sch.finish(seqs[2])  # waiting or running, wherever it is
    for s in seqs[:2]:
        sch.finish(s)
    assert sch.blocks.num_free == 8 and not sch.has_work()


def test_token_slice_equals_slicing_the_whole_token_list():
    for n_prompt in range(5):
        for n_out in range(5):
            seq = _seq(list(range(n_prompt)))
            seq.output_ids = list(range(100, 100 + n_out))
            for start in range(n_prompt + n_out + 2):
                for end in [*range(start, n_prompt + n_out + 3), None]:
                    assert seq.token_slice(start, end) == seq.tokens[start:end]


# ---- window storage (DeepSeek-V4) ----------------------------------------------------------------------
def test_window_storage_is_released_behind_the_lookback_and_bounds_prefix_hits():
    bm = BlockManager(16, BS)
    assert bm.enable_windows(3, 1, 4)[1:] == (4, BS)  # the tail (lookback 3 + the token: 1 block) + 2, + 1 a step
    a = _seq(list(range(12)))
    bm.take_hits(a, [])
    bm.allocate(a, 12)
    a.num_computed = 12
    bm.commit_full_blocks(a)
    assert [bm.window_ref[b] for b in a.block_table] == [1, 1, 1] and bm.num_free_windows == 1
    bm.release_windows(a)  # the next step reads positions 9.. (block 2) only
    assert [bm.window_ref[b] for b in a.block_table] == [0, 0, 1] and bm.num_free_windows == 3
    table = list(a.block_table)
    bm.free_blocks(a)
    assert bm.num_free_windows == 4 and not bm.window_start
    # released window rows stay attached until reused: hits may end where a step's lookback finds them all
    assert bm.match_prefix(list(range(12)) + [99]) == table
    assert bm.match_prefix(list(range(9)) + [5, 6, 7, 8]) == table[:2]
    d = _seq(list(range(50, 66)), rid="d")
    bm.take_hits(d, [])
    bm.allocate(d, 16)  # takes every window block: a's blocks keep their keys but lose their window rows
    d.num_computed = 16
    assert all(bm.key_of[b] is not None for b in table)
    assert bm.match_prefix(list(range(12)) + [99]) == [] and bm.num_free_windows == 0
    assert not bm.can_allocate(d, 1) and bm.num_free > 0  # blocks to spare, no window block


def test_scheduler_admits_and_preempts_by_window_blocks():
    bm = BlockManager(32, BS, enable_prefix_caching=False)
    assert bm.enable_windows(7, 1, 4)[1] == 5
    sch = Scheduler(bm, 12, 4)
    a, b, c = _seq(list(range(4)), 0, rid="a"), _seq(list(range(20, 40)), 1, rid="b"), _seq([1] * 8, 2, rid="c")
    for s in (a, b, c):
        sch.add(s)
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_new) for s in out] == [("a", 4), ("b", 8)] and bm.num_free_windows == 2
    _finish_step(sch, out)
    out = sch.schedule()  # b's next 11 tokens need 3 more window blocks, 1 is left: b (newest) is preempted
    assert [(s.seq.request_id, s.num_new) for s in out] == [("a", 1)]
    assert sch.num_preemptions == 1 and b.block_table == [] and bm.num_free_windows == 3 and bm.num_free == 30
    assert list(sch.waiting) == [b, c]
    sch.finish(a)
    assert bm.num_free_windows == 5 and not any(bm.window_ref)
