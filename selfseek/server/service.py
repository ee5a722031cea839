"""What the routes share: the served model's names and limits, prompt building, sampling parameters,
submission to the engine (one request, or one per completion when each needs its own grammar), latency
metrics, and token-level helpers (logprob entries, FIM prompts)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

from selfseek import __version__
from selfseek.engine.async_engine import AsyncEngine, RequestDelta
from selfseek.engine.errors import EngineError
from selfseek.sampling_params import SamplingParams
from selfseek.server.errors import api_error
from selfseek.server.metrics import Metrics
from selfseek.server.prompts import ChatPrompt, render_chat
from selfseek.server.protocol import APIError
from selfseek.server.reasoning import THINK_END, THINK_START
from selfseek.server.structured import CompiledGrammar, GrammarCompiler, GrammarError, json_rule, with_reasoning
from selfseek.server.tools import FORMATS, Function, detect_format
from selfseek.tokenizer import UntrustedText

T = TypeVar("T")
log = logging.getLogger("selfseek.server")
# Whether the engine builds per-sequence logits processors itself (then n > 1 with a grammar is one request)
_ENGINE_FACTORIES = "logits_processor_factories" in {f.name for f in dataclasses.fields(SamplingParams)}
# Model names that select thinking, whatever model is served (DeepSeek's API names).
ALIASES = {"deepseek-chat": False, "deepseek-reasoner": True}
# FIM tokens: DeepSeek's (prefix-suffix-middle order), and StarCoder's, which SmolLM2's tokenizer has.
FIM_FORMATS = (("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))


@dataclass
class ServerConfig:
    model_id: str
    source: str | None = None  # where the model came from (a folder or a .gguf file), for /api/show
    api_key: str | None = None
    api_keys: list[str] = field(default_factory=list)  # more keys (--api-key-file); any of them is accepted
    # paths answered without a key when keys are set (a load balancer's probe; /metrics for a scraper)
    public_endpoints: tuple[str, ...] = ("/health",)
    max_request_bytes: int = 8 * 1024 * 1024
    keep_alive_interval: float = 10.0
    default_max_tokens: int = 4096  # when a request names none; never beyond the context
    tool_format: str = "auto"
    # control-token strings (<｜User｜>, <|im_start|>) in messages become control tokens: only for callers
    # trusted to write the prompt's structure themselves (else they are tokenized as text)
    trust_control_tokens: bool = False
    max_sequences_per_request: int = 64  # prompts x n of one request
    cors_origins: list[str] = field(default_factory=list)
    expert_metrics: bool = True
    # SamplingParams fields a request that leaves them out gets (the model's generation_config.json, GGUF or
    # Ollama params: stores.generation_defaults); explicit request values win
    generation_defaults: dict = field(default_factory=dict)

    def keys(self) -> list[str]:
        return [k for k in [self.api_key, *self.api_keys] if k]


class ModelService:
    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.core = engine.core
        self.tokenizer = engine.tokenizer
        self.model_config = engine.config
        self.max_model_len: int = self.core.max_model_len
        self.model_id = config.model_id
        # served LoRA adapters (serve --lora name=PATH): each a model name of its own, as vLLM lists them
        self.adapters: list[str] = self.core.loras.names() if hasattr(self.core, "loras") else []
        taken = {self.model_id.removesuffix(":latest"), *ALIASES}
        if clash := next((a for a in self.adapters if a.removesuffix(":latest") in taken), None):
            raise ValueError(f"LoRA adapter name {clash!r} is already a model name here; pick another")
        self.created = int(time.time())
        self.fingerprint = f"fp_selfseek_{__version__}"
        tok = self.tokenizer
        if config.tool_format not in ("auto", *FORMATS):
            raise ValueError(f"unknown tool format {config.tool_format!r}; choose auto or one of {tuple(FORMATS)}")
        self.tool_format = (detect_format(tok, self.model_config.model_type) if config.tool_format == "auto"
                            else FORMATS[config.tool_format])

        def vocab_has(text: str) -> bool:
            return tok is not None and tok.token_to_id(text) is not None

        self.supports_thinking = vocab_has(THINK_END) or THINK_START in ((tok and tok.chat_template) or "")
        self.think_end_id = tok.token_to_id(THINK_END) if vocab_has(THINK_END) else None
        self.fim = next((f for f in FIM_FORMATS if all(vocab_has(t) for t in f)), None)
        self.grammars = None
        if tok is not None:
            try:
                import llguidance  # noqa: F401

                eos = self.model_config.eos_token_id
                stops = set(tok.stop_ids) | set(eos if isinstance(eos, list) else [] if eos is None else [eos])
                self.grammars = GrammarCompiler(tok, self.model_config.vocab_size, stops)
            except ImportError:
                pass
        self.metrics = Metrics(engine.stats, self.model_id, self.core.model, config.expert_metrics)
        self.num_parameters = sum(p.numel() for p in self.core.model.parameters())
        self._prep = ThreadPoolExecutor(max_workers=4, thread_name_prefix="selfseek-prep")
        self.ready = True  # False while serve() warms the model up: /health answers 503 until then

    def warm_up(self, grammar: bool = True) -> None:
        """Everything a first request would otherwise wait for: the C++ kernels (compiled on first use),
        one forward pass, the plain-text tokenizer of role-injection checks and llguidance's token index."""
        self.ready = False
        try:
            from selfseek.kernels import build

            for source in sorted(build.HERE.glob("*.cpp")):
                build.library(source.stem)
        except Exception as e:  # noqa: BLE001 - the torch fallback serves; say why it is slower
            log.warning("kernels not built at start-up: %s", e)
        if self.tokenizer is not None:
            self.tokenizer.encode_plain("warm")
            UntrustedText(self.tokenizer).hide("warm")
        if grammar and self.grammars is not None:
            self.grammars.check("start: %json {}")

        async def one_token() -> None:
            ids = [self.tokenizer.bos_id or 0] if self.tokenizer is not None else [0]
            async for _ in self.engine.add_request("warm-up", ids, SamplingParams(max_tokens=1)):
                pass

        asyncio.run(one_token())
        self.ready = True

    def healthy(self) -> bool:
        """Whether the engine still serves: its `healthy` flag, and its loop thread alive."""
        thread = getattr(self.engine, "_thread", None)
        return bool(getattr(self.engine, "healthy", True)) and (thread is None or thread.is_alive())

    # ---- names ---------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.model_id, *self.adapters, *ALIASES]

    def resolve_model(self, name: str) -> bool | None:
        """The thinking default a model name implies (None: the template's own); 404 for unknown names."""
        base = name.removesuffix(":latest")
        if base == self.model_id.removesuffix(":latest") or self.lora_name(name) is not None:
            return None
        if base in ALIASES:
            return ALIASES[base]
        raise APIError(404, f"The model `{name}` does not exist. Served: {', '.join(self.model_names())}.",
                       param="model", code="model_not_found")

    def lora_name(self, name: str | None) -> str | None:
        """The served LoRA adapter a request's model name picks (SamplingParams.lora_name), None for the base."""
        if not name or not self.adapters:
            return None
        base = name.removesuffix(":latest")
        return next((a for a in self.adapters if a.removesuffix(":latest") == base), None)

    # ---- prompts -------------------------------------------------------------------------------------
    def require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids to /completions", param="model")

    def chat_prompt(self, messages: list[dict], functions: list[Function] | None, thinking: bool | None,
                    template_kwargs: dict | None, prefix: dict | None) -> ChatPrompt:
        self.require_tokenizer()
        if not self.tokenizer.chat_template and not self.tool_format.own_prompt:
            raise APIError(400, "this model has no chat template (a base model): use /completions",
                           param="messages", code="no_chat_template")
        try:
            return render_chat(self.tokenizer, self.tool_format, messages, functions, thinking, template_kwargs,
                               prefix, self.supports_thinking, self.config.trust_control_tokens)
        except Exception as e:  # the template's own raise_exception(), or a message it cannot take
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from e

    def encode_prompt(self, prompt: ChatPrompt, param: str) -> list[int]:
        """A rendered prompt's ids (the caller's control strings as text), checked against the context."""
        self.require_tokenizer()
        ids = prompt.encode(self.tokenizer)
        self.check_length(ids, param)
        return ids

    def encode(self, text: str, param: str) -> list[int]:
        self.require_tokenizer()
        ids = self.tokenizer.encode(text)
        self.check_length(ids, param)
        return ids

    def check_length(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                           f"the prompt has {len(ids)} tokens.", param=param, code="context_length_exceeded")
        if any(not 0 <= t < self.model_config.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in [0, {self.model_config.vocab_size})", param=param)

    def fim_prompt(self, prefix: str, suffix: str) -> ChatPrompt:
        """A fill-in-the-middle prompt; FIM markers inside the caller's prefix or suffix stay text."""
        if self.fim is None:
            raise APIError(400, "this model has no fill-in-the-middle tokens, so `suffix` is not supported",
                           param="suffix", code="fim_not_supported")
        begin, hole, end = self.fim
        if self.config.trust_control_tokens:
            return ChatPrompt(f"{begin}{prefix}{hole}{suffix}{end}", False)
        untrusted = UntrustedText(self.tokenizer)
        rendered = f"{begin}{untrusted.hide(prefix)}{hole}{untrusted.hide(suffix)}{end}"
        return ChatPrompt(untrusted.reveal(rendered), False, untrusted, rendered)

    def max_tokens(self, requested: int | None, prompt_len: int, param: str = "max_tokens") -> int:
        """The completion budget: what was asked, clipped to what the context leaves after the prompt (as
        DeepSeek's API does; the answer then ends with finish_reason "length")."""
        room = self.max_model_len - prompt_len
        if requested is None:
            requested = self.config.generation_defaults.get("max_tokens", self.config.default_max_tokens)
        return max(1, min(requested, room))

    # ---- sampling ------------------------------------------------------------------------------------
    TEMPERATURE_FLOOR = 1e-4  # below it, dividing logits overflows float32: the limit (greedy) is used instead

    def sampling_params(self, names: dict[str, str] | None = None, **fields) -> SamplingParams:
        """SamplingParams from API values, checked against this model (token ids within the vocabulary,
        top_k clipped to it, tiny temperatures greedy) so that no request's values can fail the engine's
        batch. A field the request left out (None) takes the model's generation default, else SamplingParams'
        own. `names` maps a field to the API's name of it, for the error (e.g. seed -> options.seed)."""
        names = names or {}
        for key, value in self.config.generation_defaults.items():
            if key != "max_tokens" and fields.get(key) is None:  # max_tokens: see max_tokens()
                fields[key] = value
        vocab = self.model_config.vocab_size

        def bad(field: str, why: str) -> APIError:
            name = names.get(field, field)
            return APIError(400, f"Invalid value for `{name}`: {why}", param=name)

        bias = {}
        for k, v in (fields.get("logit_bias") or {}).items():
            try:
                token = int(k)
            except (TypeError, ValueError):
                raise bad("logit_bias", f"keys must be token ids, got {k!r}") from None
            if not 0 <= token < vocab:
                raise bad("logit_bias", f"token id {token} is outside the vocabulary [0, {vocab})")
            bias[token] = float(v)
        fields["logit_bias"] = bias
        for t in fields.get("stop_token_ids") or []:
            if not 0 <= t < vocab:
                raise bad("stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab})")
        if fields.get("top_k") is not None and fields["top_k"] > vocab:
            fields["top_k"] = vocab
        temperature = fields.get("temperature")
        if temperature is not None and 0 < temperature < self.TEMPERATURE_FLOOR:
            fields["temperature"] = 0.0
        seed = fields.get("seed")
        if seed is not None and not -(2**63) <= seed < 2**63 - 64:  # seed + i for each of n completions
            raise bad("seed", "must fit a signed 64-bit integer")
        try:
            return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
        except (TypeError, ValueError) as e:  # SamplingParams names the field: "SamplingParams.top_k must be ..."
            field = getattr(e, "param", None)
            if field is None and (m := re.search(r"SamplingParams\.(\w+)", str(e))):
                field = m.group(1)
            name = names.get(field, field) if field else None
            raise APIError(400, str(e), param=name) from e

    # ---- grammars ------------------------------------------------------------------------------------
    def _require_grammars(self, param: str) -> GrammarCompiler:
        if self.grammars is None:
            raise APIError(400, "constrained decoding needs llguidance (pip install selfseek[server])", param=param)
        return self.grammars

    def json_grammar(self, schema: dict | None, reasoning_open: bool, param: str) -> CompiledGrammar:
        """Blocking (a large schema compiles for seconds): call it off the event loop (run_blocking)."""
        gc = self._require_grammars(param)
        grammar = with_reasoning(f"body: {json_rule(schema)}", reasoning_open, self.think_end_id)
        return self._compile(gc, grammar, param)

    def tools_grammar(self, functions: list[Function], mode: str, parallel: bool,
                      reasoning_open: bool) -> CompiledGrammar | None:
        gc = self._require_grammars("tools")
        rules = self.tool_format.grammar(functions, mode, parallel, gc.literal, gc.added)
        if rules is None:
            return None
        return self._compile(gc, with_reasoning(rules, reasoning_open, self.think_end_id), "tools")

    @staticmethod
    def _compile(gc: GrammarCompiler, grammar: str, param: str) -> CompiledGrammar:
        try:
            return gc.compile(grammar)
        except GrammarError as e:
            raise APIError(400, f"invalid schema: {e}", param=param, code="invalid_schema") from e

    async def run_blocking(self, fn: Callable[..., T], *args) -> T:
        """Run CPU-bound request preparation (template rendering, tokenizing a large body, compiling a
        grammar) on the preparation threads, so /health and every stream keep being served meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._prep, functools.partial(fn, *args))

    # ---- generation ----------------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 grammar: CompiledGrammar | None, param: str) -> AsyncIterator[RequestDelta]:
        """Submit at once (a bad request fails here, before any response starts) and stream every
        completion's deltas. With a grammar each completion needs its own matcher: the engine makes one per
        sequence from a factory when it takes `logits_processor_factories`; an older engine gets one request
        per completion (with seed + i, as the engine gives sibling completions)."""
        n = params.n
        try:
            if grammar is None:
                streams = [self.engine.add_request(request_id, prompt_ids, params)]
            elif _ENGINE_FACTORIES:
                p = dataclasses.replace(params, logits_processor_factories=[grammar])
                streams = [self.engine.add_request(request_id, prompt_ids, p)]
            else:
                streams = []
                for i in range(n):
                    p = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i,
                                            logits_processors=[grammar.processor()])
                    streams.append(self.engine.add_request(f"{request_id}-{i}", prompt_ids, p))
        except BaseException as e:
            self.abort(request_id, n)
            if isinstance(e, EngineError):
                raise api_error(e, request_id) from e
            if isinstance(e, ValueError | GrammarError):
                raise APIError(400, str(e), param=param) from e
            raise
        merged = streams[0] if len(streams) == 1 else merge(streams)
        return self._timed(merged, n, time.perf_counter())

    def abort(self, request_id: str, n: int) -> None:
        """Stop a request whose response ended early (client gone): both id schemes of generate()."""
        self.engine.abort(request_id)
        for i in range(n):
            self.engine.abort(f"{request_id}-{i}")

    async def _timed(self, deltas: AsyncIterator[RequestDelta], n: int, start: float) -> AsyncIterator[RequestDelta]:
        """Observe TTFT, inter-token latency and end-to-end latency (from submission) as the deltas pass."""
        m, name = self.metrics, self.model_id
        last: dict[int, float] = {}
        open_ = n
        try:
            async for d in deltas:
                now = time.perf_counter()
                if d.token_ids:
                    if d.index not in last:
                        m.ttft.labels(name).observe(now - start)
                    else:
                        step = (now - last[d.index]) / len(d.token_ids)
                        for _ in d.token_ids:
                            m.itl.labels(name).observe(step)
                    last[d.index] = now
                if d.finish_reason is not None:
                    open_ -= 1
                    m.finished.labels(name, d.finish_reason).inc()
                    if open_ == 0:
                        m.e2e.labels(name).observe(now - start)
                yield d
        finally:
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()

    # ---- tokens --------------------------------------------------------------------------------------
    @lru_cache(maxsize=65536)  # noqa: B019 - one service per server, and token ids are few
    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and raw bytes (a byte-level token may hold part of a UTF-8 character)."""
        tok = self.tokenizer
        if tok is None:
            return str(token_id), list(str(token_id).encode())
        raw = _byte_level_bytes(tok.id_to_token(token_id))
        text = tok.decode([token_id])
        return text, list(raw if raw is not None and text.endswith("\ufffd") else text.encode())


def _byte_level_bytes(piece: str | None) -> bytes | None:
    """A GPT-2 byte-level token string back to its bytes (None if it is not one)."""
    if piece is None:
        return None
    table = _unicode_to_byte()
    try:
        return bytes(table[c] for c in piece)
    except KeyError:
        return None


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


async def merge(streams: list[AsyncIterator[RequestDelta]], reindex: bool = True) -> AsyncIterator[RequestDelta]:
    """Deltas of several streams as one; with `reindex`, delta.index becomes the stream's position (streams of
    one completion each)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestDelta]) -> None:
        try:
            async for d in stream:
                if reindex:
                    d.index = i
                await queue.put(d)
        except BaseException as e:  # noqa: B036 - handed to the consumer, which decides
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                if not isinstance(item, asyncio.CancelledError):
                    raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
