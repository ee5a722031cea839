"""Who runs this step: continuous batching with chunked prefill and preemption.

Each step has a token budget. Running sequences go first, oldest first: a decode costs one token, an
unfinished prompt continues with the next chunk. Then waiting sequences start, FCFS, taking whatever
their prompts find in the prefix cache. When blocks run out, the newest running sequence is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later (its outputs so
far are kept, so nothing is lost). With window storage (DeepSeek-V4, engine/kv_cache.py) a sequence first drops
the window rows it has moved past, and admission needs free window blocks as well as blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from selfseek.engine.kv_cache import BlockManager
from selfseek.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_new: int  # tokens computed for it this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so it needs the next one sampled."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int = 512, max_num_seqs: int = 64):
        self.blocks = blocks
        self.max_tokens, self.max_seqs = max_num_batched_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget = self.max_tokens
        out: list[Scheduled] = []
        preempted = False
        self.running.sort(key=lambda s: s.arrival)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            self.blocks.release_windows(seq)  # DeepSeek-V4: window rows it has moved past
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.can_allocate(seq, num_new):
                victim = self.running[-1]  # the newest
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, num_new)
                out.append(Scheduled(seq, num_new))
                budget -= num_new
                i += 1
        if preempted:  # no room to spare: don't start anything new this step
            return out

        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting.popleft()
            if seq.leader is not None and not (seq.leader.prompt_done or seq.leader.finished):
                skipped.append(seq)  # n > 1: wait until the leader's prompt blocks can be shared
                continue
            hits = self.blocks.match_prefix(seq.tokens, seq.cache_root) if seq.num_computed == 0 else []
            num_new = min(seq.num_tokens - seq.num_computed - len(hits) * self.blocks.block_size, budget)
            if not self.blocks.can_allocate(seq, num_new, hits):
                skipped.append(seq)
                break
            first_time = seq.num_preemptions == 0 and seq.num_computed == 0
            self.blocks.take_hits(seq, hits)
            if first_time:
                seq.num_cached_prompt = seq.num_computed
                self.blocks.hits += seq.num_computed
                self.blocks.queries += len(seq.prompt_ids)
            self.blocks.allocate(seq, num_new)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(Scheduled(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_blocks(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # back to its FCFS place among the waiting
        pos = next((k for k, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(pos, seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_blocks(seq)
        seq.status = Status.FINISHED
