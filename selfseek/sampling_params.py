"""What a request asks of the sampler; validated up front so bad values fail with the field's name."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top alternatives to return per generated token
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated text
    repetition_penalty: float = 1.0  # HF/CTRL: divide positive (multiply negative) logits of seen tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    # Per-sequence hooks on the next-token logits, run after penalties: f(generated ids, logits row) -> row.
    # The server's grammar constraints are these; a stateful one belongs to a single sequence (use n=1).
    logits_processors: list[Callable] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "must be a finite number >= 0"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= -1, "must be an integer >= -1"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "must be an integer in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("presence_penalty", _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "must be in [-2, 2]"),
            ("frequency_penalty", _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "must be in [-2, 2]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0, "must be > 0"),
            ("logit_bias", all(_finite(v) and -100 <= v <= 100 for v in self.logit_bias.values()),
             "values must be in [-100, 100]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {why} (got {getattr(self, name)!r})")

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
