"""What a request asks of the sampler; validated up front so bad values fail with the field's name
(RequestError(param=...)), and bounded so that no request's values can break a batch it shares: a seed fits
a 64-bit generator, a temperature under TEMPERATURE_FLOOR is greedy (dividing by it would overflow), the
repetition penalty stays in [0.01, 100], a logit bias has at most MAX_LOGIT_BIAS entries with non-negative
token ids (the engine checks them against its vocabulary; top_k above the vocabulary means all of it)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from selfseek.engine.errors import RequestError

TEMPERATURE_FLOOR = 1e-4  # a temperature below it samples greedily (logits / 1e-300 overflow float32)
MAX_LOGIT_BIAS = 1024  # entries per request: each is applied to every row of every step
SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch.Generator accepts


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
    # Hooks on the next-token logits, run after penalties: f(generated ids, logits row) -> row (or None after
    # changing the row in place). These are shared by the n completions: only stateless ones belong here.
    logits_processors: list[Callable] = field(default_factory=list)
    # Zero-argument callables, each called once per completion for its own fresh processor (a grammar
    # matcher is stateful): this is how a constrained request gets n > 1 completions.
    logits_processor_factories: list[Callable[[], Callable]] = field(default_factory=list)
    # Tenant salt of the prefix cache (vLLM's name): requests share cached prompt blocks only with requests
    # of the same salt. The server passes the API key or the request's `cache_salt`.
    cache_salt: str | None = None
    # The served LoRA adapter to run under (LLM(lora={name: folder}), `serve --lora name=PATH`); None: the base.
    lora_name: str | None = None

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
            ("repetition_penalty", _finite(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100,
             "must be in [0.01, 100]"),
            ("seed", self.seed is None or (_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             "must be an integer that fits 64 bits"),
            ("logit_bias", isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS,
             f"must be a map of at most {MAX_LOGIT_BIAS} entries"),
            ("logit_bias", all(_int(k) and k >= 0 for k in self.logit_bias), "keys must be token ids (integers >= 0)"),
            ("logit_bias", all(_finite(v) and -100 <= v <= 100 for v in self.logit_bias.values()),
             "values must be in [-100, 100]"),
            ("stop_token_ids", all(_int(t) and t >= 0 for t in self.stop_token_ids),
             "must be token ids (integers >= 0)"),
            ("cache_salt", self.cache_salt is None or isinstance(self.cache_salt, str), "must be a string"),
            ("lora_name", self.lora_name is None or isinstance(self.lora_name, str), "must be a string"),
            ("logits_processor_factories", all(callable(f) for f in self.logits_processor_factories),
             "must be zero-argument callables"),
        ]
        for name, ok, why in checks:
            if not ok:
                shown = repr(getattr(self, name))
                raise RequestError(f"SamplingParams.{name} {why} (got {shown[:200]})", param=name)

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR or self.top_k == 1

    def generator_seed(self, index: int) -> int | None:
        """The seed of completion `index` (seed + index, wrapped into what a generator accepts)."""
        return None if self.seed is None else (self.seed + index) % 2**64


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
