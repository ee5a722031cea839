"""One completion's state: its tokens, how many are in the cache, its block table, its output so far."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from selfseek.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class PenaltyState:
    """Token statistics for penalties, kept per sequence and extended with each new token (never rebuilt);
    penalties touch only the distinct tokens, not the whole vocabulary."""

    counts: torch.Tensor  # [vocab] occurrences of each token in the output (presence/frequency)
    out_ids: torch.Tensor  # distinct output tokens
    seen_ids: torch.Tensor  # distinct prompt + output tokens (repetition)
    out: set[int] = field(default_factory=set)
    seen: set[int] = field(default_factory=set)
    num_counted: int = 0  # output tokens already in `counts` / `out`
    num_seen: int = 0  # tokens (prompt + output) already in `seen`


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # FCFS order; preempted sequences keep theirs
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V (or latent) is in the cache
    num_cached_prompt: int = 0  # prompt tokens that came from the prefix cache (first schedule)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained keys of its full blocks, computed once
    num_committed_blocks: int = 0  # leading blocks already offered to the prefix cache
    cache_root: bytes | None = None  # its first block's parent key (fingerprint, adapter, tenant salt)
    lora_index: int = 0  # the served LoRA adapter its rows run under (models/lora_serving.py); 0: the base model
    leader: Sequence | None = None  # n > 1: siblings wait for the leader's prompt to be cached, then share it
    generator: torch.Generator | None = None
    processors: list[Callable] = field(default_factory=list)  # its own logits processors (fresh per sequence)
    penalty_state: PenaltyState | None = None
    logit_bias_tensors: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, values), built once
    stop_ids: frozenset[int] = frozenset()  # token ids that end it (EOS unless ignore_eos, stop_token_ids)
    finish_reason: str | None = None
    error: BaseException | None = None  # why it failed (an EngineError reaches the caller)
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    # sampled but not yet reported
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[dict[int, float]] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int | None = None) -> list[int]:
        """tokens[start:end] without building the whole prompt + output list (O(end - start))."""
        p = len(self.prompt_ids)
        end = self.num_tokens if end is None else min(end, self.num_tokens)
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start : min(end, p)] + self.output_ids[: max(0, end - p)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def prompt_done(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)
