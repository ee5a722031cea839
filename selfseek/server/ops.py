"""Operations endpoints: models, health, tokenize/detokenize, Prometheus metrics, version, balance stub."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from selfseek import __version__
from selfseek.server.common import parse_body, service
from selfseek.server.openai import chat_messages, chat_tools
from selfseek.server.protocol import APIError, ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from selfseek.server.service import ModelService

router = APIRouter()


def _model_card(svc: ModelService, name: str) -> dict:
    return {"id": name, "object": "model", "created": svc.created, "owned_by": "selfseek", "root": svc.model_id,
            "max_model_len": svc.max_model_len}


@router.get("/models")
@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    svc = service(request)
    return JSONResponse({"object": "list", "data": [_model_card(svc, n) for n in svc.model_names()]})


@router.get("/models/{name:path}")
@router.get("/v1/models/{name:path}")
async def model(request: Request, name: str) -> JSONResponse:
    svc = service(request)
    svc.resolve_model(name)
    return JSONResponse(_model_card(svc, name))


@router.get("/health")
async def health(request: Request) -> Response:
    """200 once the model is warm and while the engine serves; 503 when it cannot (its loop died, or an
    unrecoverable error): load balancers take the server out of rotation instead of sending it requests."""
    svc = service(request)
    return Response(status_code=200 if svc.ready and svc.healthy() else 503)


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})


@router.get("/user/balance")
async def balance() -> JSONResponse:
    """DeepSeek's balance endpoint, which some clients call before anything else: self-hosted is unmetered."""
    return JSONResponse({"is_available": True, "balance_infos": [
        {"currency": "USD", "total_balance": "0.00", "granted_balance": "0.00", "topped_up_balance": "0.00"}]})


def _tokenize(svc: ModelService, req: TokenizeRequest) -> list[int]:
    if req.prompt is not None:  # raw text, as /completions takes it: control strings are control tokens
        return svc.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    chat = ChatCompletionRequest(model=svc.model_id, messages=req.messages, tools=req.tools)
    messages, prefix = chat_messages(chat)
    functions, _ = chat_tools(chat)
    # the ids a chat request with these messages would get
    return svc.chat_prompt(messages, functions, None, req.chat_template_kwargs or {}, prefix).encode(svc.tokenizer)


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    svc = service(request)
    req = await parse_body(request, TokenizeRequest)
    svc.require_tokenizer()
    if req.model is not None:
        svc.resolve_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "send either `prompt` or `messages`", param="prompt")
    ids = await svc.run_blocking(_tokenize, svc, req)
    out = {"count": len(ids), "max_model_len": svc.max_model_len, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = [svc.tokenizer.id_to_token(t) for t in ids]
    return JSONResponse(out)


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    svc = service(request)
    req = await parse_body(request, DetokenizeRequest)
    svc.require_tokenizer()
    if any(not 0 <= t < svc.model_config.vocab_size for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {svc.model_config.vocab_size})", param="tokens")
    return JSONResponse({"prompt": await svc.run_blocking(svc.tokenizer.decode, req.tokens)})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(service(request).metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
