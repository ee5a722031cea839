"""Grammar-constrained decoding: json_object, json_schema and tool-call formats, with llguidance.

A request's constraint is one Lark grammar (llguidance's dialect, with `%json {schema}` for JSON Schema
and `<[id]>` for added tokens). When the prompt leaves reasoning open, the grammar starts with free text
up to "</think>", so the constraint applies after the reasoning part ends. Each completion gets its own
matcher, wrapped as a `SamplingParams.logits_processors` entry: before each sampling step it consumes
the tokens generated since the last step and masks every token the grammar cannot take next (EOS is
allowed only where the grammar may end).

Why llguidance: measured here with DeepSeek's 129K-token vocabulary, a JSON-schema mask takes 0.05-0.6 ms
per token (the first about 7 ms) and compiling a schema about 1 ms; its tokenizer index takes about 3 s
to build, once per server (lazily, or at start-up with --warm-grammar). It is one small wheel with no
dependencies, while xgrammar's pulls in triton. outlines-core was not measured.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import numpy as np
import torch

from selfseek.tokenizer import Tokenizer

log = logging.getLogger("selfseek.server")

# Constrained JSON is written the way json.dumps writes it ({"a": 1, "b": [2, 3]}): free whitespace lets a
# weak model emit whitespace until max_tokens (DeepSeek's JSON-mode guide warns of that), and made masks
# 3-6x slower to compute here. Unknown schema keywords are ignored ("lenient") rather than refused.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile (the request gets a 400 naming the field)."""


def lark_literal(text: str, special: dict[str, int]) -> str:
    """`text` as a Lark expression: quoted strings, with the added tokens in it as `<[id]>`."""
    parts: list[str] = []
    i = 0
    while i < len(text):
        hit = min(((text.find(s, i), s) for s in special if text.find(s, i) != -1), default=None)
        end = hit[0] if hit else len(text)
        if end > i:
            parts.append(json.dumps(text[i:end], ensure_ascii=False))
        if hit is None:
            break
        parts.append(f"<[{special[hit[1]]}]>")
        i = hit[0] + len(hit[1])
    return " ".join(parts) or '""'


def json_rule(schema: dict | None) -> str:
    """`%json {...}`: any JSON object when `schema` is None (response_format json_object)."""
    schema = {"type": "object"} if schema is None else schema
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_OPTIONS}, ensure_ascii=False)


def with_reasoning(body_rules: str, reasoning_open: bool, think_end_id: int | None) -> str:
    """A complete grammar: `body` (a rule defined in body_rules), after the reasoning part if it is open.
    The reasoning text ends at the "</think>" token when the vocabulary has one, else at the text."""
    if not reasoning_open:
        return f"start: body\n{body_rules}"
    if think_end_id is not None:  # a regex cannot match an added token, so the text ends where it comes
        think = f"think: THINK_TEXT <[{think_end_id}]>\nTHINK_TEXT: /(?s:.*)/"
    else:
        think = "think[lazy]: /(?s:.*)<\\/think>/"
    return f"start: think WS? body\n{think}\nWS: /[ \\t\\r\\n]+/\n{body_rules}"


class GrammarCompiler:
    """llguidance state shared by every request of one model: its token index, built on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.stop_ids = sorted(stop_ids)
        # llguidance treats every added token (special or not: DeepSeek's <｜tool▁calls▁begin｜>, <think>) as
        # a token without text, so grammars name them by id (lark_literal) and a regex never matches them.
        tk = tokenizer._tk  # the tokenizers.Tokenizer: llguidance indexes its JSON serialization
        self.added = {t.content: i for i, t in tk.get_added_tokens_decoder().items()}
        self._ll = None
        self._lock = threading.Lock()

    def _lltokenizer(self):
        with self._lock:  # requests arrive on the event loop and, via warm-up, another thread
            if self._ll is None:
                import llguidance

                self._ll = llguidance.LLTokenizer(
                    self.tokenizer._tk.to_str(), n_vocab=self.vocab_size, eos_token=self.stop_ids or None
                )
            return self._ll

    def literal(self, text: str) -> str:
        return lark_literal(text, self.added)

    def check(self, grammar: str) -> None:
        """Raise GrammarError when the grammar (or a schema inside it) does not compile."""
        import llguidance

        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            llguidance.LLMatcher.grammar_from_lark(grammar), self._lltokenizer()
        )
        if is_error:
            raise GrammarError(messages[0] if messages else "invalid grammar")

    def processor(self, grammar: str) -> GrammarProcessor:
        import llguidance

        matcher = llguidance.LLMatcher(self._lltokenizer(), llguidance.LLMatcher.grammar_from_lark(grammar))
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return GrammarProcessor(matcher, self.vocab_size)


class GrammarProcessor:
    """One completion's constraint, as a logits processor: (generated ids, logits row) -> masked row."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.consumed = 0
        self._bits = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)
        self._failed = False

    def __call__(self, token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self._failed:
            return logits
        try:
            for token in token_ids[self.consumed:]:
                self.matcher.consume_token(token)
            self.consumed = len(token_ids)
            if self.matcher.is_error():
                raise RuntimeError(self.matcher.get_error())
            self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        except Exception as e:  # never fail the engine step: the completion goes on unconstrained
            log.warning("grammar constraint dropped: %s", e)
            self._failed = True
            return logits
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        allowed = torch.from_numpy(allowed.astype(bool)).to(logits.device)
        if allowed.shape[0] < logits.shape[-1]:  # logits wider than the tokenizer: padding ids never fit
            allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[0]))
        return logits.masked_fill(~allowed, float("-inf"))
