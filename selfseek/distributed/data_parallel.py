"""Data-parallel attention, DeepSeek-V3's decode layout: D ranks, each with its own sequences and its own KV cache
(no latent held twice); attention and the dense layers run on each rank over its own tokens, and the MoE layers
are shared through expert parallelism: each rank routes its own tokens and sends their slots to the ranks owning
the experts (`dispatch_combine`, the one EP implementation), which send the results back.

Rank 0 runs the engine with one Scheduler and BlockManager per DP rank (`DPScheduler`, `DPBlocks`): a sequence
is placed on the least loaded rank when it arrives and stays there. Each step rank 0 builds every rank's batch
from that rank's block tables and sends them all in one lockstep command (`forward_ranks`); the ranks run their
batches at once, and the logits of the rows to sample are gathered back to rank 0, which samples them (so
penalties, logits processors, seeds and structured outputs work as with one process). A rank with nothing to do
in a step still joins the MoE layers' exchanges with zero rows, so the collectives line up.

LLMEngine asks the model for these parts (`model.data_parallel`, a DataParallel) in place of its BlockManager,
Scheduler and ModelRunner. DP runs with tensor_parallel_size 1: each rank is one DP group, world = D (= E).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfseek.distributed import comm as comm_mod
from selfseek.distributed.expert_parallel import EPMoE
from selfseek.engine.errors import RequestError
from selfseek.engine.kv_cache import BlockManager
from selfseek.engine.runner import BlockTables
from selfseek.engine.scheduler import Scheduled, Scheduler
from selfseek.engine.sequence import Sequence
from selfseek.models.batch import AttnBatch, batch_from_tables
from selfseek.models.model import CausalLM


class DPEPMoE(EPMoE):
    """DeepSeekMoE under data-parallel attention: the rank's tokens are its own, so it routes and dispatches all
    of them (no chunks of shared rows, no gather back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.route_and_dispatch(x.reshape(-1, shape[-1]), comm_mod.current()).view(shape)


# Engine features not built for per-rank batches: the MTP drafter and the disk tier run on one BlockManager's
# block tables (TP / EP runs have them, launch.py), LoRA rows on one batch.
DP_REFUSED = ("speculative_tokens", "prefix_cache_dir", "lora")


def check_data_parallel_engine_args(engine_args: dict) -> None:
    for name in DP_REFUSED:
        if engine_args.get(name):
            raise ValueError(f"{name}: not supported with data_parallel_size > 1 yet")


@dataclass
class RankWork:
    """One DP rank's part of a step: its flat batch and the rows whose logits are sampled."""

    tokens: torch.Tensor  # [T] token ids
    batch: AttnBatch
    sample_rows: torch.Tensor  # [n] rows of the batch


def forward_ranks(model: CausalLM, work: tuple[RankWork | None, ...], pools: list[torch.Tensor]) -> torch.Tensor | None:
    """Every rank's side of a DP step (work[r]: rank r's, None: it has nothing this step): run this rank's batch
    on its own pools -> on rank 0 the logits [sum n_r, vocab] fp32 of every rank's sampled rows, in rank order
    (None on the others)."""
    comm = comm_mod.current()
    mine = work[comm.rank]
    empty = torch.empty(0, model.config.vocab_size, device=model.device)
    if mine is None:  # idle: only the collectives the busy ranks' forward makes (the MoE layers' exchanges)
        rows = torch.empty(0, model.config.hidden_size, dtype=model.dtype, device=model.device)
        for moe in ep_layers(model):
            moe(rows)
        logits = empty
    else:
        hidden = CausalLM.hidden_states(model, mine.tokens, mine.batch, pools)
        logits = CausalLM.logits(model, hidden[mine.sample_rows]).float() if len(mine.sample_rows) else empty
    return comm.gather_rows(logits, [0 if w is None else len(w.sample_rows) for w in work])


def ep_layers(model: CausalLM) -> list[EPMoE]:
    """The expert-parallel MoE blocks of the main stack, in the order a forward runs them."""
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, EPMoE)]


class DPBlocks:
    """The DP ranks' BlockManagers behind the engine's BlockManager interface: a sequence's blocks live in its
    rank's manager (`rank_of`); totals (blocks, hits) are summed over the ranks."""

    def __init__(self, size: int, blocks_per_rank: int, block_size: int, prefix_caching: bool, fingerprint: str):
        self.ranks = [BlockManager(blocks_per_rank, block_size, prefix_caching, fingerprint) for _ in range(size)]
        self.block_size, self.prefix_caching, self.fingerprint = block_size, prefix_caching, fingerprint
        self.rank_of: dict[Sequence, int] = {}  # set by DPScheduler.add, dropped when the sequence ends
        self.disk = None  # no disk tier under data-parallel attention (DP_REFUSED)

    @property
    def num_blocks(self) -> int:
        return sum(b.num_blocks for b in self.ranks)

    @property
    def num_free(self) -> int:
        return sum(b.num_free for b in self.ranks)

    @property
    def ref_count(self) -> list[int]:
        return [c for b in self.ranks for c in b.ref_count]

    @property
    def hits(self) -> int:
        return sum(b.hits for b in self.ranks)

    @property
    def queries(self) -> int:
        return sum(b.queries for b in self.ranks)

    @property
    def disk_hits(self) -> int:
        return 0

    def blocks_needed(self, num_tokens: int) -> int:
        return self.ranks[0].blocks_needed(num_tokens)

    def root_for(self, salt: str | None = None, adapter: str | None = None) -> bytes:
        return self.ranks[0].root_for(salt, adapter)  # one fingerprint: the same root keys on every rank

    def commit_full_blocks(self, seq: Sequence) -> None:
        self.ranks[self.rank_of[seq]].commit_full_blocks(seq)


class DPScheduler:
    """One Scheduler per DP rank behind the engine's Scheduler interface. A sequence goes to its leader's rank
    (n > 1 siblings share the leader's cached prompt), else to the rank with the fewest unfinished sequences, then
    the fewest tokens left to compute; it stays there (a preempted one waits in its rank's queue). Each rank has
    its own token budget and max_num_seqs per step."""

    def __init__(self, blocks: DPBlocks, max_num_batched_tokens: int, max_num_seqs: int):
        self.blocks = blocks
        self.ranks = [Scheduler(b, max_num_batched_tokens, max_num_seqs) for b in blocks.ranks]
        self.assigned = [0] * len(self.ranks)  # sequences placed on each rank so far

    def _load(self, r: int) -> tuple[int, int]:
        seqs = [*self.ranks[r].running, *self.ranks[r].waiting]
        return len(seqs), sum(s.num_tokens - s.num_computed for s in seqs)

    def add(self, seq: Sequence) -> None:
        manager = self.blocks.ranks[0]
        if manager.blocks_needed(seq.num_tokens + 1) > manager.num_blocks:
            raise RequestError(f"prompt has {len(seq.prompt_ids)} tokens; a data-parallel rank's KV cache holds "
                               f"{manager.num_blocks * manager.block_size}", param="prompt",
                               code="context_length_exceeded")
        r = self.blocks.rank_of.get(seq.leader) if seq.leader is not None else None
        if r is None:
            r = min(range(len(self.ranks)), key=lambda i: (*self._load(i), i))
        self.blocks.rank_of[seq] = r
        self.assigned[r] += 1
        self.ranks[r].add(seq)

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.ranks)

    @property
    def waiting(self) -> list[Sequence]:
        return [seq for s in self.ranks for seq in s.waiting]

    @property
    def running(self) -> list[Sequence]:
        return [seq for s in self.ranks for seq in s.running]

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.ranks)

    def schedule(self) -> list[Scheduled]:
        return [entry for s in self.ranks for entry in s.schedule()]

    def finish(self, seq: Sequence) -> None:
        r = self.blocks.rank_of.pop(seq, None)
        if r is not None:
            self.ranks[r].finish(seq)


class DPRunner:
    """The engine's runner for a DP model: every rank's batch (built as ModelRunner builds one, from that rank's
    block tables) in one lockstep call; -> the gathered logits and their entries, rank by rank."""

    def __init__(self, model: CausalLM, blocks: DPBlocks, cache_dtype: torch.dtype | None = None):
        self.model, self.blocks = model, blocks
        self.device = model.device
        self.cache_dtype = cache_dtype or model.dtype
        # every rank makes pools of this size for its own sequences
        self.pools = model.new_kv_pools(blocks.ranks[0].num_blocks * blocks.block_size, self.cache_dtype)
        self.tables = [BlockTables() for _ in blocks.ranks]
        self.idle_steps = 0  # forwards in which some rank had no sequence (it joined the exchanges with none)

    @torch.inference_mode()
    def run(self, scheduled: list[Scheduled]) -> tuple[torch.Tensor, list[Scheduled]]:
        by_rank: list[list[Scheduled]] = [[] for _ in self.tables]
        for s in scheduled:
            by_rank[self.blocks.rank_of[s.seq]].append(s)
        work, sampled = [], []
        for r, mine in enumerate(by_rank):
            w, entries = self._work(r, mine)
            work.append(w)
            sampled += entries
        self.idle_steps += any(w is None for w in work)
        return self.model.forward_ranks(tuple(work), self.pools), sampled

    def _work(self, r: int, scheduled: list[Scheduled]) -> tuple[RankWork | None, list[Scheduled]]:
        # dense prefills first, then sequences with cached context, longest chunk first (models/batch.py)
        order = sorted(scheduled, key=lambda s: (s.seq.num_computed > 0, -s.num_new))
        rows = self.tables[r].sync([s.seq for s in order])  # also releases the rows of finished sequences
        if not order:
            return None, []
        tokens, starts, num_new, ends, sampled = [], [], [], [], []
        for s in order:
            start = s.seq.num_computed
            if s.samples:
                ends.append(len(tokens) + s.num_new - 1)
                sampled.append(s)
            tokens.extend(s.seq.token_slice(start, start + s.num_new))
            starts.append(start)
            num_new.append(s.num_new)
        batch = batch_from_tables(self.tables[r].table, rows, starts, num_new, self.blocks.block_size, self.device)
        return RankWork(torch.tensor(tokens, device=self.device), batch,
                        torch.tensor(ends, dtype=torch.long, device=self.device)), sampled


@dataclass
class DataParallel:
    """A DP model's `data_parallel` attribute (set by launch.py): LLMEngine builds its parts through it."""

    size: int

    def new_blocks(self, args, blocks_per_rank: int, fingerprint: str) -> DPBlocks:
        """args: the EngineArgs (kv_cache_memory, or the default sizing, is each rank's)."""
        check_data_parallel_engine_args({name: getattr(args, name) for name in DP_REFUSED})
        return DPBlocks(self.size, blocks_per_rank, args.block_size, args.enable_prefix_caching, fingerprint)

    def new_scheduler(self, blocks: DPBlocks, args) -> DPScheduler:
        return DPScheduler(blocks, args.max_num_batched_tokens, args.max_num_seqs)

    def new_runner(self, model: CausalLM, blocks: DPBlocks, cache_dtype: torch.dtype | None) -> DPRunner:
        return DPRunner(model, blocks, cache_dtype)
