"""The FastAPI app and `selfseek serve`.

Security defaults: bound to 127.0.0.1, no CORS unless origins are named, request bodies capped in size,
and with --api-key (or SELFSEEK_API_KEY) every endpoint but /health needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import sys
from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from selfseek import __version__
from selfseek.server import ollama, openai, ops
from selfseek.server.protocol import APIError
from selfseek.server.service import ModelService, ServerConfig

log = logging.getLogger("selfseek.server")
_OPEN_PATHS = {"/health"}


def _error_response(path: str, err: APIError) -> JSONResponse:
    # Ollama's clients expect {"error": "message"}; everyone else DeepSeek's/OpenAI's envelope
    body = {"error": err.message} if path.startswith("/api/") else err.body()
    return JSONResponse(body, status_code=err.status)


class _Guard:
    """ASGI middleware: API key and declared body size, before any route runs (and before a body is read)."""

    def __init__(self, app, service: ModelService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = self._check(scope)
        if err is not None:
            self.service.metrics.http_errors.labels(self.service.model_id, str(err.status)).inc()
            return await _error_response(scope["path"], err)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, scope) -> APIError | None:
        cfg = self.service.config
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if cfg.api_key and scope["path"] not in _OPEN_PATHS and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
                return APIError(401, "Authentication Fails: a valid API key is needed (Authorization: Bearer <key>)")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_request_bytes:
            return APIError(413, f"the request body is larger than {cfg.max_request_bytes} bytes")
        return None


def create_app(service: ModelService) -> FastAPI:
    app = FastAPI(title="selfseek", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.service = service
    for module in (openai, ollama, ops):
        app.include_router(module.router)

    def count(status: int) -> None:
        service.metrics.http_errors.labels(service.model_id, str(status)).inc()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        count(exc.status)
        return _error_response(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count(exc.status_code)
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return _error_response(request.url.path, APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        count(500)
        return _error_response(request.url.path, APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    if service.config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=service.config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(_Guard, service=service)
    return app


def build_service(model: str | None, dtype: str = "auto", device: str | None = None, served_name: str | None = None,
                  engine_args: dict | None = None, **config) -> ModelService:
    """Load the model, start its engine thread, and wrap it for the routes."""
    from selfseek.engine.async_engine import AsyncEngine
    from selfseek.engine.engine import EngineArgs, LLMEngine
    from selfseek.llm import default_device
    from selfseek.weights import load_model

    m, tokenizer = load_model(model, dtype, device or default_device(), progress=sys.stderr.isatty())
    core = LLMEngine(m, tokenizer, EngineArgs(**(engine_args or {})))
    # the id clients send: a short model name as given, else the folder's or file's name
    name = served_name or (Path(str(model)).name.removesuffix(".gguf") if model else _default_model_name())
    return ModelService(AsyncEngine(core), ServerConfig(model_id=name, source=str(model) if model else None,
                                                        **config))


def _default_model_name() -> str:
    import selfseek.weights

    return getattr(selfseek.weights, "DEFAULT_MODEL", "default")


def instructions(host: str, port: int, model_id: str, api_key: str | None) -> str:
    """A curl line and an openai-python snippet that work as printed."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{host}:{port}"
    key = api_key or "none"
    auth = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    return (f"selfseek is serving {model_id} at {url}\n\n"
            f"  curl {url}/v1/chat/completions -H \"Content-Type: application/json\"{auth} -d '{body}'\n\n"
            f"  from openai import OpenAI\n"
            f"  client = OpenAI(base_url=\"{url}/v1\", api_key=\"{key}\")\n"
            f"  r = client.chat.completions.create(model=\"{model_id}\", "
            f"messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}], max_tokens=64)\n"
            f"  print(r.choices[0].message.content)\n")


def serve(args) -> int:
    """`selfseek serve`: args from the CLI parser (model, host, port, api_key, ...)."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get("SELFSEEK_API_KEY") or None
    engine_args = {k: v for k, v in {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                                     "kv_cache_memory": args.kv_cache_memory}.items() if v is not None}
    svc = build_service(args.model, args.dtype, args.device, args.served_model_name, engine_args, api_key=api_key,
                        tool_format=args.tool_call_format, cors_origins=args.cors_origins or [],
                        max_request_bytes=args.max_request_bytes, keep_alive_interval=args.keep_alive,
                        default_max_tokens=args.default_max_tokens)
    if args.warm_grammar and svc.grammars is not None:
        svc.grammars.check("start: %json {}")  # builds llguidance's token index now, not on the first request
    app = create_app(svc)
    print(instructions(args.host, args.port, svc.model_id, api_key), flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        svc.engine.shutdown()
    return 0
