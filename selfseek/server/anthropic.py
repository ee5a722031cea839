"""Anthropic's Messages API, as DeepSeek serves it (api.md: `POST /anthropic/v1/messages`, since V3.1).

A request is translated into the chat-completions request it means and goes through the same preparation
as /v1/chat/completions (openai.prepare_chat: model, thinking, messages, tools and tool_choice, prompt,
grammar, sampling) and the same output parsing (openai.ChatChoice: reasoning, content, tool calls); only
the wire format differs. Following DeepSeek: the key comes as `x-api-key` or Bearer, `anthropic-version`
and `anthropic-beta` are ignored, an unknown model name means the served model, `thinking.budget_tokens`
is ignored, image and document blocks are refused. A last assistant message is a prefill (DeepSeek's
chat prefix completion): the answer continues it.

Streaming follows Anthropic's event sequence: message_start, then per content block (thinking, text,
tool_use in the order the model writes them) content_block_start, content_block_delta (thinking_delta,
text_delta, input_json_delta), content_block_stop, then message_delta (stop_reason, usage) and
message_stop; `ping` events keep an idle connection open, and a failure is an `error` event.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from selfseek.engine.async_engine import RequestDelta
from selfseek.server.common import cache_salt, parse_body, service
from selfseek.server.openai import ChatChoice, prepare_chat
from selfseek.server.protocol import APIError, ChatCompletionRequest, Temperature, TopK, TopP
from selfseek.server.service import ModelService
from selfseek.server.sse import KEEP_ALIVE, Stream
from selfseek.server.stream import Generation

router = APIRouter()
PREFIXES = ("/anthropic/", "/v1/messages")

Str = Annotated[str, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]


# ---- request bodies ---------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations, metadata, ...: accepted, ignored


class TextBlock(_Body):
    type: Literal["text"]
    text: Str


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: Str
    name: Str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: Str
    content: Str | list[TextBlock] | None = None
    is_error: Bool = False


class ThinkingBlock(_Body):
    type: Literal["thinking"]
    thinking: Str
    signature: Str | None = None


class RedactedThinkingBlock(_Body):
    type: Literal["redacted_thinking"]
    data: Str = ""


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                  Field(discriminator="type")]


BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


class Message(_Body):
    role: Literal["user", "assistant"]
    content: Str | list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        # said plainly here: pydantic's own message for an unknown union tag names no block
        for j, block in enumerate(value if isinstance(value, list) else []):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in BLOCK_TYPES:
                raise ValueError(f"content[{j}] is a {kind!r} block; this model takes {', '.join(BLOCK_TYPES)} blocks")
        return value


class ToolDef(_Body):
    name: Str
    description: Str | None = None
    input_schema: dict[str, Any] | None = None  # required for a client tool; checked in chat_request
    type: Str | None = None  # "custom" or absent; server tools (web_search_...) carry no input_schema


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: Str | None = None
    disable_parallel_tool_use: Bool = False


class ThinkingConfig(_Body):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: Annotated[int, Field(strict=True, ge=0)] | None = None  # accepted, ignored (as DeepSeek)


class CountTokensRequest(_Body):
    model: Str
    messages: list[Message]
    system: Str | list[TextBlock] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: PositiveInt
    stop_sequences: Annotated[list[Str], Field(max_length=16)] | None = None
    stream: Bool = False
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None


# ---- translation to the chat-completions request ----------------------------------------------------------


def _text(content: str | list[TextBlock] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(b.text for b in content)


def chat_request(req: CountTokensRequest, model: str, max_tokens: int) -> ChatCompletionRequest:
    """The chat-completions request an Anthropic request means."""
    messages: list[dict] = []
    if req.system is not None and _text(req.system):
        messages.append({"role": "system", "content": _text(req.system)})
    for i, m in enumerate(req.messages):
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if m.role == "user":
            text = []
            for j, b in enumerate(blocks):
                if isinstance(b, ToolResultBlock):  # each result is a tool message, in order
                    messages.append({"role": "tool", "tool_call_id": b.tool_use_id,
                                     "content": ("Error: " if b.is_error else "") + _text(b.content)})
                elif isinstance(b, TextBlock):
                    text.append(b.text)
                else:
                    raise APIError(400, f"a user message cannot hold a {b.type} block",
                                   param=f"messages[{i}].content[{j}]")
            if text or not blocks:
                messages.append({"role": "user", "content": "".join(text)})
            continue
        msg: dict = {"role": "assistant", "content": "", "tool_calls": []}
        for j, b in enumerate(blocks):
            if isinstance(b, TextBlock):
                msg["content"] += b.text
            elif isinstance(b, ThinkingBlock):
                msg["reasoning_content"] = msg.get("reasoning_content", "") + b.thinking
            elif isinstance(b, ToolUseBlock):
                msg["tool_calls"].append({"id": b.id, "type": "function",
                                          "function": {"name": b.name, "arguments": json.dumps(b.input,
                                                                                               ensure_ascii=False)}})
            elif isinstance(b, ToolResultBlock):
                raise APIError(400, "tool_result blocks belong in a user message", param=f"messages[{i}].content[{j}]")
        if not msg["tool_calls"]:
            del msg["tool_calls"]
            if i == len(req.messages) - 1:  # a final assistant turn is a prefill: the answer continues it
                msg["prefix"] = True
        messages.append(msg)

    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    if req.tools:
        for i, t in enumerate(req.tools):
            if t.type not in (None, "custom"):
                raise APIError(400, f"server tools ({t.type}) are not supported; define the tool with an input_schema",
                               param=f"tools[{i}].type")
            if t.input_schema is None:
                raise APIError(400, "a tool needs an input_schema", param=f"tools[{i}].input_schema")
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.input_schema}} for t in req.tools]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool" and not choice.name:
            raise APIError(400, "tool_choice of type tool needs a name", param="tool_choice.name")
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
            choice.type, {"type": "function", "function": {"name": choice.name}})
        body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    if req.thinking is not None:
        # adaptive: the model's (template's) own default; between_tools: thinking on
        body["thinking"] = {"type": {"adaptive": "auto", "between_tools": "enabled"}.get(req.thinking.type,
                                                                                       req.thinking.type)}
    if isinstance(req, MessagesRequest):
        for name in ("temperature", "top_p", "top_k"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        if req.stop_sequences:
            body["stop"] = req.stop_sequences
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise APIError(400, f"the request cannot be served: {e.errors()[0]['msg']}") from e


def served_name(svc: ModelService, name: str) -> str:
    """The model name to run: a name this server knows, else (claude-..., anything) the served model."""
    try:
        svc.resolve_model(name)
        return name
    except APIError:
        return svc.model_id


# ---- errors -----------------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic_path(path: str) -> bool:
    return path.startswith(PREFIXES)


def error_body(err: APIError) -> dict:
    """Anthropic's error envelope: {"type": "error", "error": {"type", "message"}}."""
    kind = ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    message = err.message
    if err.param and err.param not in message:  # Anthropic's envelope has no `param`: name the field in words
        message += f" (at `{err.param}`)"
    return {"type": "error", "error": {"type": kind, "message": message}}


def _overloaded() -> APIError:
    return APIError(529, "the server has no room for this request right now (KV cache full); retry shortly")


# ---- responses --------------------------------------------------------------------------------------------


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict:
    # Anthropic's input_tokens leaves out what was read from the cache
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _stop(c: ChatChoice, d: RequestDelta | None, stop_sequences: list[str]) -> tuple[str, str | None]:
    """stop_reason and stop_sequence for a finished choice."""
    if c.finish_reason == "tool_calls":
        return "tool_use", None
    if c.finish_reason == "length":
        return "max_tokens", None
    if d is not None and isinstance(d.stop_reason, str) and d.stop_reason in stop_sequences:
        return "stop_sequence", d.stop_reason
    return "end_turn", None


def _tool_input(arguments: str) -> dict:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {"_raw_arguments": arguments}  # a malformed call (tool_choice auto): kept for the client to see
    return value if isinstance(value, dict) else {"value": value}


def _content(c: ChatChoice) -> list[dict]:
    out: list[dict] = []
    if c.reasoning_text:
        out.append({"type": "thinking", "thinking": c.reasoning_text, "signature": ""})
    if c.content_text:
        out.append({"type": "text", "text": c.content_text})
    for call in c.tools.calls if c.tools else []:
        out.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                    "input": _tool_input(call["function"]["arguments"])})
    return out


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


class _Blocks:
    """Anthropic content blocks from ChatChoice deltas: a block opens when the kind of output changes
    (thinking, text, one block per tool call) and closes before the next one opens."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None
        self.tool_blocks: dict[int, int] = {}  # tool call index -> block index

    def _open(self, kind: str, block: dict) -> list[bytes]:
        out = self.close()
        self.index += 1
        self.kind = kind
        out.append(_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block}))
        return out

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _delta(self, index: int, delta: dict) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def feed(self, delta: dict) -> list[bytes]:
        out: list[bytes] = []
        if delta.get("reasoning_content"):
            if self.kind != "thinking":
                out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta(self.index, {"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
        if delta.get("content"):
            if self.kind != "text":
                out += self._open("text", {"type": "text", "text": ""})
            out.append(self._delta(self.index, {"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls", []):
            if "id" in call:
                out += self._open("tool_use", {"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                                               "input": {}})
                self.tool_blocks[call["index"]] = self.index
            fragment = call["function"].get("arguments")
            if fragment:
                out.append(self._delta(self.tool_blocks[call["index"]],
                                       {"type": "input_json_delta", "partial_json": fragment}))
        return out


# ---- routes -----------------------------------------------------------------------------------------------


@router.post("/v1/messages")
@router.post("/anthropic/v1/messages")
async def messages(request: Request) -> Response:
    svc = service(request)
    req = await parse_body(request, MessagesRequest)
    chat = chat_request(req, served_name(svc, req.model), req.max_tokens)
    _, prompt, ids, mode, grammar, params = await svc.run_blocking(prepare_chat, svc, chat, cache_salt(request))
    rid = str(uuid.uuid4())
    choice = ChatChoice.for_prompt(0, svc, prompt.reasoning_open, bool(mode), chat.parallel_tool_calls)
    gen = Generation(svc, svc.generate(rid, ids, params, grammar, "messages"), [choice], len(ids),
                     lambda: svc.abort(rid, 1))
    head = {"id": f"msg_{rid.replace('-', '')}", "type": "message", "role": "assistant", "model": req.model}
    stops = req.stop_sequences or []
    if req.stream:
        return Stream(_stream(gen, head, stops), "text/event-stream", on_close=gen.abort)
    await gen.collect(request)
    if choice.finish_reason == "insufficient_system_resource":
        raise _overloaded()
    stop_reason, stop_sequence = _stop(choice, gen.last, stops)
    return JSONResponse({**head, "content": _content(choice), "stop_reason": stop_reason,
                         "stop_sequence": stop_sequence, "usage": _usage(len(ids), gen.cached_tokens, choice.tokens)})


async def _stream(gen: Generation, head: dict, stops: list[str]) -> AsyncIterator[bytes]:
    started = False  # message_start waits for the first delta, which knows the cache hits
    blocks = _Blocks()
    try:
        async for e in gen.events():
            if e is None:  # before message_start only an SSE comment: the SDK refuses any event before it
                yield _event("ping", {"type": "ping"}) if started else KEEP_ALIVE
                continue
            if not started:
                started = True
                usage = _usage(gen.prompt_tokens, gen.cached_tokens, 0)
                yield _event("message_start", {"type": "message_start", "message": {
                    **head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})
                yield _event("ping", {"type": "ping"})
            for event in blocks.feed(e.out[0]):
                yield event
            if not e.finished:
                continue
            if e.choice.finish_reason == "insufficient_system_resource":
                raise _overloaded()
            for event in blocks.close():
                yield event
            stop_reason, stop_sequence = _stop(e.choice, e.delta, stops)
            yield _event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                           "usage": _usage(gen.prompt_tokens, gen.cached_tokens, e.choice.tokens)})
            yield _event("message_stop", {"type": "message_stop"})
    except APIError as err:
        yield _event("error", error_body(err))


@router.post("/v1/messages/count_tokens")
@router.post("/anthropic/v1/messages/count_tokens")
async def count_tokens(request: Request) -> JSONResponse:
    svc = service(request)
    req = await parse_body(request, CountTokensRequest)
    chat = chat_request(req, served_name(svc, req.model), 1)
    _, _, ids, _, _, _ = await svc.run_blocking(prepare_chat, svc, chat, None)
    return JSONResponse({"input_tokens": len(ids)})


@router.get("/anthropic/v1/models")
async def models(request: Request) -> JSONResponse:
    """Anthropic's model list shape (the OpenAI-shaped list stays at /v1/models)."""
    svc = service(request)
    created = datetime.fromtimestamp(svc.created, UTC).isoformat().replace("+00:00", "Z")
    data = [{"type": "model", "id": n, "display_name": n, "created_at": created} for n in svc.model_names()]
    return JSONResponse({"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]})
