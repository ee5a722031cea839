"""DeepSeek's and OpenAI's chat and completion endpoints (also under /v1 and /beta, as DeepSeek serves them).

Wire format (api.md §1.7-1.9, §2): ids are bare UUIDs; a stream's first delta per choice carries the role,
finish_reason comes on the chunk with the last content, and usage rides on the final chunk (DeepSeek);
with stream_options.include_usage every chunk has "usage": null and a last chunk with "choices": [] carries
the totals (OpenAI). Reasoning goes to `reasoning_content`. A failure mid-stream is a `data: {"error": ...}`
event, which openai-python raises as APIError.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from selfseek.engine.async_engine import RequestDelta
from selfseek.sampling_params import SamplingParams
from selfseek.server.common import cache_salt, is_resource_abort, parse_body, service
from selfseek.server.protocol import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from selfseek.server.reasoning import ReasoningParser
from selfseek.server.service import ModelService, merge
from selfseek.server.sse import DONE, KEEP_ALIVE, Stream, sse_event
from selfseek.server.stream import Event, Generation
from selfseek.server.tools import Function, ToolCallParser

router = APIRouter()
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def sampling_params(svc: ModelService, req: SamplingFields, max_tokens: int, logprobs: int | None,
                    skip_special: bool, salt: str | None, names: dict[str, str] | None = None) -> SamplingParams:
    """What the request names; the fields it leaves out (None) take the model's defaults (svc.sampling_params).
    `names`: the calling API's names of fields, for errors (svc.sampling_params)."""
    return svc.sampling_params(
        names, cache_salt=salt, n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        max_tokens=max_tokens, stop=[req.stop] if isinstance(req.stop, str) else req.stop,
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
        seed=req.seed, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias, skip_special_tokens=skip_special,
        lora_name=svc.lora_name(getattr(req, "model", None)),
    )


def finish_reason(d: RequestDelta, has_calls: bool) -> str:
    if is_resource_abort(d):
        return "insufficient_system_resource"
    if d.finish_reason == "stop" and has_calls:
        return "tool_calls"
    return d.finish_reason


# ---- chat ------------------------------------------------------------------------------------------------


def _text(m: ChatMessage, i: int) -> str | None:
    if m.content is None or isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:
        if part.type != "text":
            raise APIError(400, f"content parts of type {part.type!r} are not supported (text only)",
                           param=f"messages[{i}].content")
        parts.append(part.text or "")
    return "".join(parts)


def chat_messages(req: ChatCompletionRequest) -> tuple[list[dict], dict | None]:
    """Validated messages as the chat template takes them, and the prefix message if the last one is one."""
    if not req.messages:
        raise APIError(400, "`messages` must hold at least one message", param="messages")
    out: list[dict] = []
    prefix = None
    for i, m in enumerate(req.messages):
        content = _text(m, i)
        if m.prefix or (req.continue_final_message and i == len(req.messages) - 1):
            if i != len(req.messages) - 1 or m.role != "assistant":
                raise APIError(400, "only the last message, an assistant one, can be a prefix",
                               param=f"messages[{i}].prefix")
            prefix = {"content": content or "", "reasoning_content": m.reasoning_content or m.reasoning}
            continue
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.role == "assistant" and (m.reasoning_content or m.reasoning):
            msg["reasoning_content"] = m.reasoning_content or m.reasoning  # V3.2 renders it within a tool turn
        if m.role == "assistant":
            calls = [{"id": c.id or f"call_{k}", "type": "function",
                      "function": {"name": c.function.name,
                                   "arguments": c.function.arguments if isinstance(c.function.arguments, str)
                                   else json.dumps(c.function.arguments, ensure_ascii=False)}}
                     for k, c in enumerate(m.tool_calls or [])]
            if calls:
                msg["tool_calls"] = calls
                if not content:
                    msg["content"] = None  # DeepSeek's templates take the tool-call branch on a None content
            elif content is None:
                raise APIError(400, "an assistant message needs content or tool_calls",
                               param=f"messages[{i}].content")
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise APIError(400, "a tool message needs tool_call_id", param=f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
            msg["content"] = content or ""
        else:
            if content is None:
                raise APIError(400, f"a {m.role} message needs content", param=f"messages[{i}].content")
            if m.name:
                msg["name"] = m.name
        out.append(msg)
    return out, prefix


def chat_tools(req: ChatCompletionRequest) -> tuple[list[Function] | None, str | None]:
    """The functions and the tool mode: None (no tools or tool_choice none), auto, required or named."""
    if not req.tools or req.tool_choice == "none":
        if isinstance(req.tool_choice, str) and req.tool_choice == "required":
            raise APIError(400, "tool_choice is required but no tools were given", param="tool_choice")
        return None, None
    functions = []
    for i, t in enumerate(req.tools):
        f = t.function
        if not _NAME.match(f.name):
            raise APIError(400, f"invalid function name {f.name!r}: 1-64 characters of a-z, A-Z, 0-9, _ and -",
                           param=f"tools[{i}].function.name")
        params = f.parameters if f.parameters is not None else {"type": "object", "properties": {}}
        if params.get("type", "object") != "object":
            raise APIError(400, "function parameters must be a JSON Schema of type object",
                           param=f"tools[{i}].function.parameters", code="invalid_schema")
        functions.append(Function(f.name, f.description, params, f.strict))
    choice = req.tool_choice
    if choice is None or choice == "auto":
        return functions, "auto"
    if choice == "required":
        return functions, "required"
    named = [f for f in functions if f.name == choice.function.name]
    if not named:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                       param="tool_choice")
    return named + [f for f in functions if f is not named[0]], "named"


class ChatChoice:
    """One completion's output: raw deltas in, reasoning/content/tool-call deltas out, totals kept."""

    def __init__(self, index: int, svc: ModelService, reasoning: ReasoningParser | None,
                 tools: ToolCallParser | None, top_logprobs: int | None):
        self.index, self.svc, self.reasoning, self.tools, self.top = index, svc, reasoning, tools, top_logprobs
        self.reasoning_text = self.content_text = ""
        self.logprobs: dict[str, list] = {"content": [], "reasoning_content": []}
        self.tokens = self.reasoning_tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    @classmethod
    def for_prompt(cls, index: int, svc: ModelService, reasoning_open: bool, tools: bool, parallel: bool = True,
                   top_logprobs: int | None = None) -> ChatChoice:
        """A choice parsing what this model writes: reasoning when it thinks (or the prompt opened a thought),
        tool calls in the model's format when tools were offered."""
        reasoning = ReasoningParser(reasoning_open) if svc.supports_thinking or reasoning_open else None
        return cls(index, svc, reasoning, svc.tool_format.parser(parallel) if tools else None, top_logprobs)

    def feed(self, d: RequestDelta) -> tuple[dict, dict | None]:
        """The delta dict for this engine delta (empty if nothing is new yet) and its logprobs."""
        final = d.finish_reason is not None
        was_reasoning = bool(self.reasoning and self.reasoning.in_reasoning)
        r, c = self.reasoning.feed(d.text) if self.reasoning else ("", d.text)
        if final and self.reasoning:
            r2, c2 = self.reasoning.finish()
            r, c = r + r2, c + c2
        calls: list[dict] = []
        if self.tools:
            c, calls = self.tools.feed(c)
            if final:
                c2, calls2 = self.tools.finish()
                c, calls = c + c2, calls + calls2
        # tokens that produced only reasoning, or ended it ("</think>"), or are still inside it, are reasoning
        thinking = not c and not calls and bool(r or was_reasoning or (self.reasoning and self.reasoning.in_reasoning))
        self.tokens += len(d.token_ids)
        self.token_ids += d.token_ids
        self.reasoning_tokens += len(d.token_ids) if thinking else 0
        self.reasoning_text += r
        self.content_text += c
        delta: dict = {}
        if r:
            delta["reasoning_content"] = r
        if c:
            delta["content"] = c
        if calls:
            delta["tool_calls"] = calls
        logprobs = None
        if self.top is not None and d.logprobs:
            entries = [self._entry(t, lp) for t, lp in zip(d.token_ids, d.logprobs, strict=False)]
            key = "reasoning_content" if thinking else "content"
            self.logprobs[key] += entries
            logprobs = {"content": entries} if key == "content" else {"content": None, "reasoning_content": entries}
        if final:
            self.finish_reason = finish_reason(d, bool(self.tools and self.tools.calls))
        return delta, logprobs

    def _entry(self, token: int, lps: dict[int, float]) -> dict:
        text, raw = self.svc.token_text(token)
        top = []
        for t, lp in list(lps.items())[: self.top]:
            tt, tb = self.svc.token_text(t)
            top.append({"token": tt, "logprob": lp, "bytes": tb})
        return {"token": text, "logprob": lps[token], "bytes": raw, "top_logprobs": top}

    def message(self, thinking_mode: bool) -> dict:
        calls = self.tools.calls if self.tools else []
        content = self.content_text
        msg: dict = {"role": "assistant", "content": None if calls and not content.strip() else content}
        if thinking_mode or self.reasoning_text:
            msg["reasoning_content"] = self.reasoning_text
        if calls:
            msg["tool_calls"] = calls
        return msg

    def logprobs_object(self) -> dict | None:
        if self.top is None:
            return None
        out: dict = {"content": self.logprobs["content"]}
        if self.logprobs["reasoning_content"]:
            out["reasoning_content"] = self.logprobs["reasoning_content"]
        return out


def prepare_chat(svc: ModelService, req: ChatCompletionRequest, salt: str | None,
                 names: dict[str, str] | None = None) -> tuple:
    """The chat normalizer every chat-shaped API uses (OpenAI's here; Anthropic's and Ollama's convert their
    bodies to a ChatCompletionRequest first): resolve thinking, validate messages and tools, render, tokenize
    (the caller's control strings as text), clip max_tokens, compile the constraint, build SamplingParams.
    `names` maps a chat field to the calling API's name of it, for errors (Ollama: format, options.*).
    Blocking: run it with svc.run_blocking. Returns (thinking, prompt, ids, tool mode, grammar, params)."""
    names = names or {}
    thinking = svc.resolve_model(req.model)
    if req.thinking is not None and req.thinking.type != "auto":
        thinking = req.thinking.type == "enabled"
    kwargs = req.chat_template_kwargs or {}
    if req.reasoning_effort is not None:
        kwargs = {**kwargs, "reasoning_effort": req.reasoning_effort}
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            thinking = bool(kwargs[key])
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    messages, prefix = chat_messages(req)
    functions, mode = chat_tools(req)
    prompt = svc.chat_prompt(messages, functions, thinking, kwargs, prefix)
    ids = svc.encode_prompt(prompt, "messages")
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit_param = names.get(limit_param, limit_param)
    max_tokens = svc.max_tokens(req.max_completion_tokens or req.max_tokens, len(ids), limit_param)

    grammar = None
    if mode in ("required", "named") or (mode == "auto" and any(f.strict for f in functions)):
        grammar = svc.tools_grammar(functions, mode, req.parallel_tool_calls, prompt.reasoning_open)
    rf = req.response_format
    if rf is not None and rf.type != "text" and mode not in ("required", "named"):
        if rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
            raise APIError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format.json_schema")
        schema = rf.json_schema.schema_ if rf.type == "json_schema" else None
        grammar = svc.json_grammar(schema, prompt.reasoning_open, names.get("response_format", "response_format"))

    # V3.2 spells its tool markup with a special token; the others' markers survive skipping specials
    skip = req.skip_special_tokens and not (mode and svc.tool_format.keeps_special_tokens)
    params = sampling_params(svc, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, skip, salt,
                             names)
    return thinking, prompt, ids, mode, grammar, params




@router.post("/chat/completions")
@router.post("/v1/chat/completions")
@router.post("/beta/chat/completions")
async def chat_completions(request: Request) -> Response:
    svc = service(request)
    req = await parse_body(request, ChatCompletionRequest)
    salt = cache_salt(request, req.cache_salt)
    thinking, prompt, ids, mode, grammar, params = await svc.run_blocking(prepare_chat, svc, req, salt)
    rid = str(uuid.uuid4())
    choices = [ChatChoice.for_prompt(i, svc, prompt.reasoning_open, bool(mode), req.parallel_tool_calls,
                                     params.logprobs) for i in range(req.n)]
    gen = Generation(svc, svc.generate(rid, ids, params, grammar, "messages"), choices, len(ids),
                     lambda: svc.abort(rid, req.n))
    model_name = "deepseek-reasoner" if req.model == "deepseek-chat" and thinking else req.model
    thinking_mode = bool(thinking) or prompt.reasoning_open
    head = {"id": rid, "created": int(time.time()), "model": model_name, "system_fingerprint": svc.fingerprint}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        delta = {"role": "assistant", "content": "", **({"reasoning_content": ""} if thinking_mode else {})}
        first = [{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None} for c in choices]
        body = sse_stream(gen, {**head, "object": "chat.completion.chunk"}, first, _chat_piece, include_usage)
        return Stream(body, "text/event-stream", on_close=gen.abort)
    await gen.collect(request)
    return JSONResponse({
        **head, "object": "chat.completion",
        "choices": [{"index": c.index, "message": c.message(thinking_mode), "logprobs": c.logprobs_object(),
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": gen.usage(),
    })


def _chat_piece(e: Event) -> dict | None:
    """A chat chunk's choice for an event (None: nothing new yet); a choice's last one always comes."""
    delta, logprobs = e.out
    if not (delta or logprobs or e.finished):
        return None
    return {"index": e.choice.index, "delta": delta or ({"content": ""} if e.finished else delta),
            "logprobs": logprobs, "finish_reason": e.choice.finish_reason}


async def sse_stream(gen: Generation, head: dict, first: list[dict], piece: Callable[[Event], dict | None],
                     include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's (and DeepSeek's) SSE stream, chat or completions: `first` choices, then piece(event) per event;
    DeepSeek: the totals ride on the last chunk; OpenAI (include_usage): every chunk has "usage": null and
    a last chunk with no choices carries the totals. A failure is an error event."""
    extra = {"usage": None} if include_usage else {}
    for choice in first:
        yield sse_event({**head, "choices": [choice], **extra})
    try:
        async for e in gen.events():
            if e is None:
                yield KEEP_ALIVE
            elif (choice := piece(e)) is not None:
                out = {**head, "choices": [choice], **extra}
                if e.last:
                    out["usage"] = gen.usage()
                yield sse_event(out)
                if e.last and include_usage:
                    yield sse_event({**head, "choices": [], "usage": out["usage"]})
    except APIError as err:
        yield sse_event(err.body())
        return
    yield DONE


# ---- completions -----------------------------------------------------------------------------------------


def _prompts(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "`prompt` is empty", param="prompt")
    if isinstance(p[0], int):
        return [list(p)]
    return list(p)


class TextChoice:
    def __init__(self, index: int, svc: ModelService, echo: str, top: int | None):
        self.index, self.svc, self.top = index, svc, top
        self.text = echo
        self.tokens = self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self.lp: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def echo_logprobs(self, prompt_ids: list[int]) -> dict | None:
        """The prompt's tokens for echo: without logprobs (the engine computes none for prompt tokens)."""
        if self.top is None:
            return None
        out = self._empty()
        offset = 0
        for t in prompt_ids:
            text = self.svc.token_text(t)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(offset)
            offset += len(text)
        self._add(out)
        return out

    @staticmethod
    def _empty() -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _add(self, part: dict) -> None:
        for k in self.lp:
            self.lp[k] += part[k]

    def feed(self, d: RequestDelta) -> dict | None:
        """Legacy-format logprobs of this delta's tokens (and keeps the totals)."""
        self.tokens += len(d.token_ids)
        part = None
        if self.top is not None and d.logprobs:
            part = self._empty()
            offset = len(self.text)
            for t, lps in zip(d.token_ids, d.logprobs, strict=False):
                text = self.svc.token_text(t)[0]
                part["tokens"].append(text)
                part["token_logprobs"].append(lps[t])
                part["top_logprobs"].append({self.svc.token_text(k)[0]: v for k, v in list(lps.items())[: self.top]})
                part["text_offset"].append(offset)
                offset += len(text)
            self._add(part)
        self.text += d.text
        if d.finish_reason is not None:
            self.finish_reason = finish_reason(d, False)
        return part


def _encode_prompts(svc: ModelService, req: CompletionRequest) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt (blocking: a large body tokenizes for seconds, so it runs off the loop)."""
    raw = _prompts(req)
    cap = svc.config.max_sequences_per_request
    if len(raw) * req.n > cap:
        raise APIError(400, f"{len(raw)} prompts x n={req.n} is {len(raw) * req.n} sequences; at most {cap} per "
                       "request", param="prompt")
    prompts = []
    for p in raw:
        if isinstance(p, str):
            if req.suffix is not None:
                prompts.append((p, svc.encode_prompt(svc.fim_prompt(p, req.suffix), "prompt")))
            else:
                prompts.append((p, svc.encode(p, "prompt")))
        else:
            if req.suffix is not None:
                raise APIError(400, "`suffix` needs a text prompt", param="suffix")
            svc.check_length(p, "prompt")
            prompts.append((svc.tokenizer.decode(p) if svc.tokenizer else "", p))
    return prompts


@router.post("/completions")
@router.post("/v1/completions")
@router.post("/beta/completions")
async def completions(request: Request) -> Response:
    svc = service(request)
    req = await parse_body(request, CompletionRequest)
    svc.resolve_model(req.model)
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    if req.suffix is not None and req.echo:
        raise APIError(400, "echo cannot be combined with suffix", param="echo")
    prompts = await svc.run_blocking(_encode_prompts, svc, req)
    salt = cache_salt(request, req.cache_salt)
    rid = str(uuid.uuid4())
    n = req.n
    streams, choices = [], []

    def abort() -> None:  # every prompt's request (one not submitted yet is no request: a no-op)
        for k in range(len(prompts)):
            svc.abort(f"{rid}-p{k}", n)

    try:
        for k, (text, ids) in enumerate(prompts):
            limit = svc.max_tokens(req.max_tokens, len(ids))
            params = sampling_params(svc, req, limit, req.logprobs, req.skip_special_tokens, salt)
            streams.append(_offset(svc.generate(f"{rid}-p{k}", ids, params, None, "prompt"), k * n))
            choices += [TextChoice(k * n + i, svc, text if req.echo else "", req.logprobs) for i in range(n)]
    except BaseException:  # the prompts already submitted must not run on for nobody
        abort()
        raise
    deltas = streams[0] if len(streams) == 1 else merge(streams, reindex=False)
    gen = Generation(svc, deltas, choices, sum(len(ids) for _, ids in prompts), abort, per_prompt=n)
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
            "system_fingerprint": svc.fingerprint}
    echoed = [c.echo_logprobs(prompts[c.index // n][1]) for c in choices] if req.echo else []
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        first = [{"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": None}
                 for c, lp in zip(choices, echoed, strict=False)]
        return Stream(sse_stream(gen, head, first, _text_piece, include_usage), "text/event-stream", on_close=abort)
    await gen.collect(request)
    return JSONResponse({
        **head,
        "choices": [{"index": c.index, "text": c.text, "logprobs": c.lp if c.top is not None else None,
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": gen.usage(),
    })


async def _offset(deltas: AsyncIterator[RequestDelta], base: int) -> AsyncIterator[RequestDelta]:
    try:
        async for d in deltas:
            d.index += base
            yield d
    finally:
        await deltas.aclose()


def _text_piece(e: Event) -> dict | None:
    if not (e.delta.text or e.out or e.finished):
        return None
    return {"index": e.choice.index, "text": e.delta.text, "logprobs": e.out, "finish_reason": e.choice.finish_reason}
