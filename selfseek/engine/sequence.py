"""One completion's state: its tokens, how many are in the cache, its block table, its output so far."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from selfseek.sampling_params import SamplingParams
from selfseek.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


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
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks, computed once
    leader: Sequence | None = None  # n > 1: siblings wait for the leader's prompt to be cached, then share it
    generator: torch.Generator | None = None
    stop_ids: frozenset[int] = frozenset()  # token ids that end it (EOS unless ignore_eos, stop_token_ids)
    detokenizer: IncrementalDetokenizer | None = None
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    # sampled but not yet reported
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[dict[int, float]] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def prompt_done(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)
