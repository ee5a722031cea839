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
from collections.abc import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from selfseek.engine.async_engine import RequestDelta
from selfseek.sampling_params import SamplingParams
from selfseek.server.common import (
    ClientGone,
    consume,
    engine_error,
    is_resource_abort,
    parse_body,
    service,
    usage,
)
from selfseek.server.protocol import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from selfseek.server.reasoning import ReasoningParser
from selfseek.server.service import ModelService, merge
from selfseek.server.sse import DONE, KEEP_ALIVE, Stream, sse_event, with_keep_alive
from selfseek.server.tools import Function, ToolCallParser, make_parser

router = APIRouter()
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, skip_special: bool) -> SamplingParams:
    try:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    except ValueError as e:
        raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from e
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
            max_tokens=max_tokens, stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
            seed=req.seed, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
            logit_bias=bias, skip_special_tokens=skip_special,
        )
    except ValueError as e:  # SamplingParams names the field: "SamplingParams.top_k must be ..."
        field = re.search(r"SamplingParams\.(\w+)", str(e))
        raise APIError(400, str(e), param=field.group(1) if field else None) from e


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
        self.finish_reason: str | None = None

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


@router.post("/chat/completions")
@router.post("/v1/chat/completions")
@router.post("/beta/chat/completions")
async def chat_completions(request: Request) -> Response:
    svc = service(request)
    req = await parse_body(request, ChatCompletionRequest)
    thinking = svc.resolve_model(req.model)
    if req.thinking is not None and req.thinking.type != "auto":
        thinking = req.thinking.type == "enabled"
    kwargs = req.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            thinking = bool(kwargs[key])
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    messages, prefix = chat_messages(req)
    functions, mode = chat_tools(req)
    prompt = svc.chat_prompt(messages, functions, thinking, kwargs, prefix)
    ids = svc.encode(prompt.text, "messages")
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
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
        grammar = svc.json_grammar(schema, prompt.reasoning_open, "response_format")

    # V3.2 spells its tool markup with a special token; the others' markers survive skipping specials
    skip = req.skip_special_tokens and not (mode and svc.tool_format == "deepseek_v32")
    params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, skip)
    rid = str(uuid.uuid4())
    deltas = svc.generate(rid, ids, params, grammar, "messages")
    parse_reasoning = svc.supports_thinking or prompt.reasoning_open
    choices = [ChatChoice(i, svc, ReasoningParser(prompt.reasoning_open) if parse_reasoning else None,
                          make_parser(svc.tool_format, req.parallel_tool_calls) if mode else None,
                          params.logprobs) for i in range(req.n)]
    model_name = "deepseek-reasoner" if req.model == "deepseek-chat" and thinking else req.model
    thinking_mode = bool(thinking) or prompt.reasoning_open
    head = {"id": rid, "created": int(time.time()), "model": model_name, "system_fingerprint": svc.fingerprint}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    if req.stream:
        body = _chat_stream(svc, head, deltas, choices, len(ids), thinking_mode, include_usage)
        return Stream(body, "text/event-stream", on_close=lambda: svc.abort(rid, req.n))

    cached = [0]
    errors: list[APIError] = []

    def on_delta(d: RequestDelta) -> None:
        if d.index == 0 and d.num_cached_tokens:
            cached[0] = d.num_cached_tokens
        if (err := engine_error(d)) is not None:
            errors.append(err)
        choices[d.index].feed(d)

    try:
        await consume(request, deltas, on_delta)
    except ClientGone:
        return Response(status_code=499)
    if errors:
        raise errors[0]
    return JSONResponse({
        **head, "object": "chat.completion",
        "choices": [{"index": c.index, "message": c.message(thinking_mode), "logprobs": c.logprobs_object(),
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": usage(len(ids), cached[0], sum(c.tokens for c in choices), sum(c.reasoning_tokens for c in choices)),
    })


async def _chat_stream(svc: ModelService, head: dict, deltas: AsyncIterator[RequestDelta], choices: list[ChatChoice],
                       prompt_tokens: int, thinking_mode: bool, include_usage: bool) -> AsyncIterator[bytes]:
    chunk_head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
        return {**chunk_head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": finish}], **extra}

    first = {"role": "assistant", "content": ""}
    if thinking_mode:
        first["reasoning_content"] = ""
    for c in choices:
        yield sse_event(chunk(c.index, first))
    cached, open_ = 0, len(choices)
    async for d in with_keep_alive(deltas, svc.config.keep_alive_interval):
        if d is None:
            yield KEEP_ALIVE
            continue
        if (err := engine_error(d)) is not None:
            yield sse_event(err.body())
            return
        if d.index == 0 and d.num_cached_tokens:
            cached = d.num_cached_tokens
        c = choices[d.index]
        delta, logprobs = c.feed(d)
        if d.finish_reason is None:
            if delta or logprobs:
                yield sse_event(chunk(c.index, delta, logprobs))
            continue
        out = chunk(c.index, delta or {"content": ""}, logprobs, c.finish_reason)
        open_ -= 1
        if open_ == 0:  # DeepSeek: the totals ride on the last chunk
            out["usage"] = usage(prompt_tokens, cached, sum(x.tokens for x in choices),
                                 sum(x.reasoning_tokens for x in choices))
        yield sse_event(out)
        if open_ == 0 and include_usage:  # OpenAI: and in a chunk of their own
            yield sse_event({**chunk_head, "choices": [], "usage": out["usage"]})
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
        self.tokens = 0
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
    prompts = []
    for p in _prompts(req):
        if isinstance(p, str):
            text = svc.fim_prompt(p, req.suffix) if req.suffix is not None else p
            prompts.append((p, svc.encode(text, "prompt")))
        else:
            if req.suffix is not None:
                raise APIError(400, "`suffix` needs a text prompt", param="suffix")
            svc.check_length(p, "prompt")
            prompts.append((svc.tokenizer.decode(p) if svc.tokenizer else "", p))
    rid = str(uuid.uuid4())
    n = req.n
    streams, choices = [], []
    for k, (text, ids) in enumerate(prompts):
        params = sampling_params(req, svc.max_tokens(req.max_tokens, len(ids)), req.logprobs, req.skip_special_tokens)
        streams.append(_offset(svc.generate(f"{rid}-p{k}", ids, params, None, "prompt"), k * n))
        choices += [TextChoice(k * n + i, svc, text if req.echo else "", req.logprobs) for i in range(n)]
    deltas = streams[0] if len(streams) == 1 else merge(streams, reindex=False)
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
            "system_fingerprint": svc.fingerprint}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def on_close() -> None:
        for k in range(len(prompts)):
            svc.abort(f"{rid}-p{k}", n)

    if req.stream:
        body = _completion_stream(svc, head, deltas, choices, prompts, req.echo, prompt_tokens, include_usage)
        return Stream(body, "text/event-stream", on_close=on_close)

    cached: dict[int, int] = {}
    errors: list[APIError] = []
    if req.echo:
        for c in choices:
            c.echo_logprobs(prompts[c.index // n][1])

    def on_delta(d: RequestDelta) -> None:
        cached.setdefault(d.index // n, d.num_cached_tokens)
        if (err := engine_error(d)) is not None:
            errors.append(err)
        choices[d.index].feed(d)

    try:
        await consume(request, deltas, on_delta)
    except ClientGone:
        return Response(status_code=499)
    if errors:
        raise errors[0]
    return JSONResponse({
        **head,
        "choices": [{"index": c.index, "text": c.text, "logprobs": c.lp if c.top is not None else None,
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": usage(prompt_tokens, sum(cached.values()), sum(c.tokens for c in choices), 0),
    })


async def _offset(deltas: AsyncIterator[RequestDelta], base: int) -> AsyncIterator[RequestDelta]:
    try:
        async for d in deltas:
            d.index += base
            yield d
    finally:
        await deltas.aclose()


async def _completion_stream(svc: ModelService, head: dict, deltas: AsyncIterator[RequestDelta],
                             choices: list[TextChoice], prompts: list, echo: bool, prompt_tokens: int,
                             include_usage: bool) -> AsyncIterator[bytes]:
    extra = {"usage": None} if include_usage else {}
    n = len(choices) // len(prompts)

    def chunk(index: int, text: str, logprobs: dict | None, finish: str | None = None) -> dict:
        return {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                **extra}

    if echo:
        for c in choices:
            yield sse_event(chunk(c.index, c.text, c.echo_logprobs(prompts[c.index // n][1])))
    cached: dict[int, int] = {}
    open_ = len(choices)
    async for d in with_keep_alive(deltas, svc.config.keep_alive_interval):
        if d is None:
            yield KEEP_ALIVE
            continue
        if (err := engine_error(d)) is not None:
            yield sse_event(err.body())
            return
        cached.setdefault(d.index // n, d.num_cached_tokens)
        c = choices[d.index]
        part = c.feed(d)
        if d.finish_reason is None:
            if d.text or part:
                yield sse_event(chunk(c.index, d.text, part))
            continue
        out = chunk(c.index, d.text, part, c.finish_reason)
        open_ -= 1
        if open_ == 0:
            out["usage"] = usage(prompt_tokens, sum(cached.values()), sum(x.tokens for x in choices), 0)
        yield sse_event(out)
        if open_ == 0 and include_usage:
            yield sse_event({**head, "choices": [], "usage": out["usage"]})
    yield DONE
