"""Ollama's native API (api.md §3): /api/chat and /api/generate (NDJSON streams, `options`, `format`,
`think`), /api/tags, /api/show, /api/ps, /api/version. Errors are {"error": "..."}; durations are in
nanoseconds; tool-call arguments are JSON objects, not strings. /api/chat is converted to a chat-completions
request and goes through the one chat normalizer the OpenAI and Anthropic routes use (openai.prepare_chat).

Not supported: images (400), `context` from an earlier /api/generate (ignored: send the conversation),
`template` (the checkpoint's chat template is always used), model management (pull/push/create/delete).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from fastapi import APIRouter
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from selfseek import __version__
from selfseek.sampling_params import SamplingParams
from selfseek.server.common import cache_salt, parse_body, service
from selfseek.server.openai import ChatChoice, prepare_chat
from selfseek.server.protocol import (
    APIError,
    ChatCompletionRequest,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaOptions,
    OllamaRequest,
    OllamaShowRequest,
)
from selfseek.server.reasoning import ReasoningParser
from selfseek.server.service import ModelService
from selfseek.server.sse import Stream, ndjson_line
from selfseek.server.stream import Generation
from selfseek.server.structured import CompiledGrammar

router = APIRouter()

# Ollama option -> SamplingParams field
_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "stop": "stop"}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _thinking(svc: ModelService, req: OllamaRequest) -> bool | None:
    thinking = svc.resolve_model(req.model)
    if req.think is not None:
        thinking = req.think is not False and req.think != "none"
        if thinking and not svc.supports_thinking:  # Ollama's 400: clients retry without `think`
            raise APIError(400, f'"{req.model}" does not support thinking', param="think")
    return thinking


def _params(svc: ModelService, req: OllamaRequest, prompt_len: int, salt: str | None) -> SamplingParams:
    opts = req.options or OllamaOptions()
    kwargs = {field: getattr(opts, name) for name, field in _OPTIONS.items()}
    if opts.seed is not None and opts.seed < 0:  # Ollama's -1: a random seed
        kwargs["seed"] = None
    if isinstance(opts.stop, str):
        kwargs["stop"] = [opts.stop]
    requested = opts.num_predict if opts.num_predict is not None and opts.num_predict > 0 else None
    names = {field: f"options.{name}" for name, field in _OPTIONS.items()}
    return svc.sampling_params(names, max_tokens=svc.max_tokens(requested, prompt_len, "options.num_predict"),
                               cache_salt=salt, lora_name=svc.lora_name(req.model), **kwargs)


def _grammar(svc: ModelService, fmt: str | dict | None, reasoning_open: bool) -> CompiledGrammar | None:
    if not fmt:
        return None
    if fmt == "json":
        return svc.json_grammar(None, reasoning_open, "format")
    if isinstance(fmt, dict):
        return svc.json_grammar(fmt, reasoning_open, "format")
    raise APIError(400, 'format must be "json" or a JSON schema', param="format")


def _stats(start: float, first: float | None, end: float, prompt_tokens: int, tokens: int) -> dict:
    ns = 1_000_000_000
    first = first or end
    return {"total_duration": int((end - start) * ns), "load_duration": 0, "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": int((first - start) * ns), "eval_count": tokens,
            "eval_duration": int((end - first) * ns)}


def _ollama_calls(calls: list[dict]) -> list[dict]:
    out = []
    for i, c in enumerate(calls):
        try:
            args = json.loads(c["function"]["arguments"] or "{}")
        except json.JSONDecodeError:
            args = {}
        out.append({"id": c["id"], "function": {"index": i, "name": c["function"]["name"], "arguments": args}})
    return out


async def _run(request: Request, svc: ModelService, model: str, ids: list[int], params: SamplingParams,
               grammar: CompiledGrammar | None, choice: ChatChoice, stream: bool, shape,
               with_context: bool) -> Response:
    """Generate and answer as NDJSON (stream) or one JSON object. shape(content, thinking, calls) builds
    each object's payload (chat: a message; generate: response and thinking)."""
    rid = str(uuid.uuid4())
    gen = Generation(svc, svc.generate(rid, ids, params, grammar, "messages"), [choice], len(ids),
                     lambda: svc.abort(rid, 1))

    def final_fields() -> dict:
        d = gen.last
        fields = {"done": True, "done_reason": "length" if d and d.finish_reason == "length" else "stop",
                  **_stats(gen.start, gen.first_token, time.perf_counter(), len(ids), choice.tokens)}
        if with_context:
            fields["context"] = ids + choice.token_ids
        return fields

    def line(payload: dict) -> bytes:
        return ndjson_line({"model": model, "created_at": _now(), **payload})

    def calls() -> list[dict]:
        return choice.tools.calls if choice.tools else []

    async def body() -> AsyncIterator[bytes]:
        try:
            async for e in gen.events(keep_alive=False):  # NDJSON has no comment line to keep alive with
                r, c = e.out[0].get("reasoning_content", ""), e.out[0].get("content", "")
                if r or c:
                    yield line({**shape(c, r, []), "done": False})
                if e.finished:
                    if calls():  # Ollama sends complete calls, in a message of their own
                        yield line({**shape("", "", calls()), "done": False})
                    yield line({**shape("", "", []), **final_fields()})
        except APIError as err:
            yield ndjson_line({"error": err.message})

    if stream:
        return Stream(body(), "application/x-ndjson", on_close=gen.abort)
    await gen.collect(request)
    return JSONResponse({"model": model, "created_at": _now(),
                         **shape(choice.content_text, choice.reasoning_text, calls()), **final_fields()})


# Ollama's names of the chat fields, for errors from the one chat normalizer (openai.prepare_chat)
_CHAT_NAMES = {field: f"options.{name}" for name, field in _OPTIONS.items()} | {
    "max_tokens": "options.num_predict", "response_format": "format"}


def chat_request(req: OllamaChatRequest, thinking: bool | None) -> ChatCompletionRequest:
    """The chat-completions request an Ollama /api/chat request means: messages (tool calls with object
    arguments, tool results by name or id, `thinking` as the reasoning), tools, `think`, `format` and the
    sampling options."""
    messages = []
    for i, m in enumerate(req.messages):
        if m.images:
            raise APIError(400, "images are not supported", param=f"messages[{i}].images")
        msg: dict = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.thinking:
            msg["reasoning_content"] = m.thinking
        if m.role == "assistant" and m.tool_calls:
            msg["tool_calls"] = [{"id": c.id or f"call_{k}", "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments or {}}}
                                 for k, c in enumerate(m.tool_calls)]
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id or m.tool_name or "call"
        messages.append(msg)
    body: dict = {"model": req.model, "messages": messages}
    if req.tools:
        body["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
    if req.think is not None:
        body["thinking"] = {"type": "enabled" if thinking else "disabled"}
    if req.format == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(req.format, dict):
        body["response_format"] = {"type": "json_schema", "json_schema": {"schema": req.format}}
    elif req.format:
        raise APIError(400, 'format must be "json" or a JSON schema', param="format")
    opts = req.options or OllamaOptions()
    for name, field in _OPTIONS.items():
        if getattr(opts, name) is not None:
            body[field] = getattr(opts, name)
    if opts.seed is not None and opts.seed < 0:  # Ollama's -1: a random seed
        del body["seed"]
    if opts.num_predict is not None and opts.num_predict > 0:
        body["max_tokens"] = opts.num_predict
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else None
        param = _CHAT_NAMES.get(name, name)
        raise APIError(400, f"Invalid value for `{param}`: {err['msg']}", param=param) from e


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    svc = service(request)
    req = await parse_body(request, OllamaChatRequest)
    thinking = _thinking(svc, req)
    if not req.messages:  # Ollama: an empty chat loads the model
        return JSONResponse({"model": req.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                             "done": True, "done_reason": "load"})
    chat_req = chat_request(req, thinking)
    thinking, prompt, ids, mode, grammar, params = await svc.run_blocking(prepare_chat, svc, chat_req,
                                                                          cache_salt(request), _CHAT_NAMES)
    choice = ChatChoice.for_prompt(0, svc, prompt.reasoning_open, bool(mode))
    show_thinking = thinking is not False

    def shape(content: str, reasoning: str, calls: list[dict]) -> dict:
        msg: dict = {"role": "assistant", "content": content}
        if reasoning and show_thinking:
            msg["thinking"] = reasoning
        if calls:
            msg["tool_calls"] = _ollama_calls(calls)
        return {"message": msg}

    return await _run(request, svc, req.model, ids, params, grammar, choice, req.stream, shape, False)


def _prepare_generate(svc: ModelService, req: OllamaGenerateRequest, thinking: bool | None,
                      salt: str | None) -> tuple:
    """Prompt ids, sampling parameters and constraint (blocking: run off the event loop)."""
    reasoning_open = False
    if req.suffix is not None:
        ids = svc.encode_prompt(svc.fim_prompt(req.prompt, req.suffix), "prompt")
    elif req.raw or svc.tokenizer is None or not svc.tokenizer.chat_template:
        ids = svc.encode(req.prompt, "prompt")  # raw: the caller writes the whole prompt, markers included
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}]
        prompt = svc.chat_prompt(messages, None, thinking, None, None)
        reasoning_open = prompt.reasoning_open
        ids = svc.encode_prompt(prompt, "prompt")
    return reasoning_open, ids, _params(svc, req, len(ids), salt), _grammar(svc, req.format, reasoning_open)


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    svc = service(request)
    req = await parse_body(request, OllamaGenerateRequest)
    thinking = _thinking(svc, req)
    if req.images:
        raise APIError(400, "images are not supported", param="images")
    if not req.prompt and req.suffix is None:
        return JSONResponse({"model": req.model, "created_at": _now(), "response": "", "done": True,
                             "done_reason": "load"})
    reasoning_open, ids, params, grammar = await svc.run_blocking(_prepare_generate, svc, req, thinking,
                                                                  cache_salt(request))
    parse = svc.supports_thinking and not req.raw and req.suffix is None
    choice = ChatChoice(0, svc, ReasoningParser(reasoning_open) if parse else None, None, None)
    show_thinking = thinking is not False

    def shape(content: str, reasoning: str, calls: list[dict]) -> dict:
        out: dict = {"response": content}
        if reasoning and show_thinking:
            out["thinking"] = reasoning
        return out

    return await _run(request, svc, req.model, ids, params, grammar, choice, req.stream, shape, True)


def _details(svc: ModelService) -> dict:
    cfg = svc.model_config
    dtype = str(svc.core.model.lm_head.weight.dtype).removeprefix("torch.")
    source = svc.config.source or ""
    return {"parent_model": "", "format": "gguf" if source.endswith(".gguf") else "safetensors",
            "family": cfg.model_type, "families": [cfg.model_type],
            "parameter_size": _human(svc.num_parameters), "quantization_level": dtype.upper()}


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)


def _entry(svc: ModelService) -> dict:
    name = svc.model_id if ":" in svc.model_id else f"{svc.model_id}:latest"
    size = sum(p.numel() * p.element_size() for p in svc.core.model.parameters())
    return {"name": name, "model": name, "modified_at": datetime.fromtimestamp(svc.created, UTC).isoformat(),
            "size": size, "digest": uuid.uuid5(uuid.NAMESPACE_URL, svc.model_id).hex, "details": _details(svc)}


@router.get("/api/tags")
async def tags(request: Request) -> JSONResponse:
    return JSONResponse({"models": [_entry(service(request))]})


@router.get("/api/ps")
async def ps(request: Request) -> JSONResponse:
    svc = service(request)
    entry = _entry(svc)
    return JSONResponse({"models": [{**entry, "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0}]})


@router.post("/api/show")
async def show(request: Request) -> JSONResponse:
    svc = service(request)
    req = await parse_body(request, OllamaShowRequest)
    name = req.model or req.name
    if name is None:
        raise APIError(400, "model is required", param="model")
    svc.resolve_model(name)
    cfg, arch = svc.model_config, svc.model_config.model_type
    caps = ["completion"]
    if svc.tokenizer is not None and svc.tokenizer.chat_template:
        caps.append("tools")
    if svc.supports_thinking:
        caps.append("thinking")
    if svc.fim is not None:
        caps.append("insert")
    info = {"general.architecture": arch, "general.basename": svc.model_id,
            "general.parameter_count": svc.num_parameters, f"{arch}.context_length": svc.max_model_len,
            f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.block_count": cfg.num_hidden_layers,
            f"{arch}.vocab_size": cfg.vocab_size}
    return JSONResponse({"license": "", "modelfile": f"FROM {svc.config.source or svc.model_id}\n", "parameters": "",
                         "template": (svc.tokenizer and svc.tokenizer.chat_template) or "",
                         "details": _details(svc), "model_info": info, "capabilities": caps,
                         "modified_at": _entry(svc)["modified_at"]})


@router.get("/api/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})
