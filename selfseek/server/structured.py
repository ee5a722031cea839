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

from selfseek.engine.errors import RequestFailed
from selfseek.tokenizer import Tokenizer

log = logging.getLogger("selfseek.server")

# Constrained JSON is written the way json.dumps writes it ({"a": 1, "b": [2, 3]}): free whitespace lets a
# weak model emit whitespace until max_tokens (DeepSeek's JSON-mode guide warns of that), and made masks
# 3-6x slower to compute here. Schema keywords the compiler cannot enforce (uniqueItems, an unknown format)
# are refused (not "lenient"), so a request never gets an answer that silently ignores part of its schema.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}

# Digit runs bounded as llama.cpp's schema converter bounds them: a weak model otherwise writes digits until
# max_tokens and the answer never parses. 15 integer digits (exact in a double), 6 decimals, no exponent.
MAX_INTEGER = 10**15 - 1
NUMBER_STEP = 1e-6
_DATA_KEYS = ("enum", "const", "default", "examples")  # values there are data, not schemas
_MAP_KEYS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")  # name -> schema


def bound_schema(schema: object, close_objects: bool = False) -> object:
    """A copy of a JSON schema whose integers and numbers have bounded digit runs (a minimum/maximum and a
    multipleOf where the schema sets none) and, with `close_objects`, whose objects take only the properties
    they name (additionalProperties false where the schema does not say otherwise)."""
    if isinstance(schema, list):
        return [bound_schema(v, close_objects) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _MAP_KEYS and isinstance(value, dict):  # names there are the user's, never keywords
            out[key] = {k: bound_schema(v, close_objects) for k, v in value.items()}
        else:
            out[key] = value if key in _DATA_KEYS else bound_schema(value, close_objects)
    types = schema.get("type")
    types = {t for t in (types if isinstance(types, list) else [types]) if isinstance(t, str)}
    if types & {"integer", "number"}:
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            out["minimum"] = -MAX_INTEGER
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            out["maximum"] = MAX_INTEGER
        if "number" in types and "multipleOf" not in schema:
            out["multipleOf"] = NUMBER_STEP
    if close_objects and "object" in types and not {"additionalProperties", "patternProperties"} & schema.keys():
        out["additionalProperties"] = False
    return out


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


def json_rule(schema: dict | None, close_objects: bool = False) -> str:
    """`%json {...}`: any JSON object when `schema` is None (response_format json_object), numbers bounded
    (bound_schema)."""
    schema = bound_schema({"type": "object"} if schema is None else schema, close_objects)
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

    def compile(self, grammar: str) -> CompiledGrammar:
        """Compile once per request (GrammarError when it does not compile); each completion copies it.
        Slow for a large schema (seconds): the server calls this off its event loop."""
        import llguidance

        matcher = llguidance.LLMatcher(self._lltokenizer(), llguidance.LLMatcher.grammar_from_lark(grammar))
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return CompiledGrammar(matcher, self.vocab_size)

    def processor(self, grammar: str) -> GrammarProcessor:
        return self.compile(grammar).processor()


class CompiledGrammar:
    """A compiled constraint; calling it (a logits-processor factory) gives one completion's processor."""

    def __init__(self, matcher: Any, vocab_size: int):
        self._matcher, self.vocab_size = matcher, vocab_size

    def processor(self) -> GrammarProcessor:
        return GrammarProcessor(self._matcher.deep_copy(), self.vocab_size)

    __call__ = processor


class GrammarFailed(RequestFailed):
    """The matcher rejected the model's token or failed: the completion cannot stay within its constraint."""


class GrammarProcessor:
    """One completion's constraint, as a logits processor: (generated ids, logits row) -> masked row."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.consumed = 0
        self._bits = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)

    def __call__(self, token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        # A failure fails this completion (the engine isolates it), never continues it unconstrained: a 200
        # answer that silently broke its schema is worse than an error.
        try:
            for token in token_ids[self.consumed:]:
                self.matcher.consume_token(token)
            self.consumed = len(token_ids)
            if self.matcher.is_error():
                raise GrammarFailed(f"grammar constraint failed: {self.matcher.get_error()}")
            self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        except GrammarFailed:
            raise
        except Exception as e:
            raise GrammarFailed(f"grammar constraint failed: {type(e).__name__}: {e}") from e
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        allowed = torch.from_numpy(allowed.astype(bool)).to(logits.device)
        if allowed.shape[0] < logits.shape[-1]:  # logits wider than the tokenizer: padding ids never fit
            allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[0]))
        return logits.masked_fill(~allowed, float("-inf"))
