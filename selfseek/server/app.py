"""The FastAPI app and `selfseek serve`.

Security defaults: bound to 127.0.0.1, no CORS unless origins are named, request bodies capped in size,
and with --api-key (or SELFSEEK_API_KEY, or several keys in --api-key-file) every endpoint but the chat page
and --public-endpoints (default /health) needs `Authorization: Bearer <key>`, compared in constant time and
never logged or printed. Errors: an engine error answers by its kind (400/429 + Retry-After/500/503), a 500
never carries exception text (a request id; the traceback goes to the log). Start-up builds the kernels and
runs one forward before listening; SIGTERM/SIGINT drain in-flight streams (--drain-timeout), then exit 0.
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import os
import sys
import uuid
from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from selfseek import __version__
from selfseek.server import anthropic, ollama, openai, openapi, ops, page
from selfseek.server.common import ClientGone
from selfseek.server.errors import api_error
from selfseek.server.protocol import APIError
from selfseek.server.service import ModelService, ServerConfig

log = logging.getLogger("selfseek.server")
_OPEN_PATHS = {"/"}  # and /static/*: the chat page loads before it can send a key; others: config.public_endpoints


def _error_response(path: str, err: APIError) -> JSONResponse:
    # Ollama's clients expect {"error": "message"}; everyone else DeepSeek's/OpenAI's envelope
    body = {"error": err.message} if path.startswith("/api/") else err.body()
    if anthropic.is_anthropic_path(path):  # Anthropic's clients: {"type": "error", "error": {"type", "message"}}
        body = anthropic.error_body(err)
    return JSONResponse(body, status_code=err.status, headers=err.headers or None)


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
        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        # Unexpected errors are answered here rather than by an Exception handler: Starlette re-raises after
        # such a handler, and uvicorn then closes the connection, which a client reusing it sees as ReadError.
        try:
            return await self.app(scope, receive, tracked_send)
        except Exception as exc:
            if started:  # mid-response: nothing more can be said; the server closes the stream
                raise
            rid = uuid.uuid4().hex
            log.error("internal error on %s (request id %s)", scope["path"], rid, exc_info=exc)
            err = api_error(exc, rid)  # an engine error by its kind; anything else a generic 500
            self.service.metrics.http_errors.labels(self.service.model_id, str(err.status)).inc()
            return await _error_response(scope["path"], err)(scope, receive, send)

    def _check(self, scope) -> APIError | None:
        cfg = self.service.config
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        public = path in _OPEN_PATHS or path.startswith("/static/") or path in cfg.public_endpoints
        keys = cfg.keys()
        if keys and not public and scope["method"] != "OPTIONS":
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if "x-api-key" in headers:  # Anthropic's clients send the key this way
                scheme, key = "bearer", headers["x-api-key"]
            if scheme.lower() != "bearer" or not key_matches(key.strip(), keys):
                return APIError(401, "Authentication Fails: a valid API key is needed (Authorization: Bearer <key>)")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_request_bytes:
            return APIError(413, f"the request body is larger than {cfg.max_request_bytes} bytes")
        return None


def key_matches(given: str, keys: list[str]) -> bool:
    """Constant time in the key's content: every key is compared, each with hmac.compare_digest."""
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok


def read_api_keys(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{path}: no API keys in the file")
    return keys


def create_app(service: ModelService) -> FastAPI:
    app = FastAPI(title="selfseek", version=__version__, openapi_url="/openapi.json", docs_url=None, redoc_url=None)
    openapi.install(app)
    app.state.service = service
    for module in (openai, ollama, ops, page, anthropic):
        app.include_router(module.router)

    def count(status: int) -> None:
        service.metrics.http_errors.labels(service.model_id, str(status)).inc()

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        count(exc.status)
        return _error_response(request.url.path, exc)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the client left before its answer

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count(exc.status_code)
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return _error_response(request.url.path, APIError(exc.status_code, message))

    if service.config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=service.config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(_Guard, service=service)
    return app


def build_service(model: str | None, dtype: str = "auto", device: str | None = None, served_name: str | None = None,
                  engine_args: dict | None = None, generation_config: str | Path = "auto", parallel: dict | None = None,
                  **config) -> ModelService:
    """Load the model, start its engine thread, and wrap it for the routes. generation_config: where requests'
    sampling defaults come from ("auto": the model's own, "none"/"vllm": none, or a folder; stores.py)."""
    from selfseek.engine.async_engine import AsyncEngine
    from selfseek.engine.engine import EngineArgs, LLMEngine
    from selfseek.llm import default_device
    from selfseek.weights import load_model

    if parallel:  # tensor / expert parallel ranks in other processes (selfseek/distributed)
        from selfseek.distributed.launch import check_engine_args, load_parallel

        check_engine_args(engine_args or {}, parallel.get("data_parallel_size", 1))
        m, tokenizer = load_parallel(model, dtype, device or default_device(),
                                     sys.stderr.isatty(), None, generation_config, **parallel)
    else:
        m, tokenizer = load_model(model, dtype, device or default_device(), progress=sys.stderr.isatty(),
                                  generation_config=generation_config)
    source = getattr(m, "source", None)
    core = LLMEngine(m, tokenizer, EngineArgs(**(engine_args or {})))
    # the id clients send: a short model name as given (an Ollama store model by its name, not its blob's),
    # else the folder's or file's name
    if served_name:
        name = served_name
    elif source is not None and source.kind == "ollama":
        name = source.name
    else:
        name = Path(str(model)).name.removesuffix(".gguf") if model else _default_model_name()
    config.setdefault("generation_defaults", dict(getattr(m, "generation_defaults", {})))
    return ModelService(AsyncEngine(core), ServerConfig(model_id=name, source=str(model) if model else None,
                                                        **config))


def _default_model_name() -> str:
    import selfseek.weights

    return getattr(selfseek.weights, "DEFAULT_MODEL", "default")


def instructions(host: str, port: int, model_id: str, has_key: bool) -> str:
    """A curl line and an openai-python snippet that work as printed (the key itself is never printed or
    logged: they read it from $SELFSEEK_API_KEY)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{host}:{port}"
    auth = ' -H "Authorization: Bearer $SELFSEEK_API_KEY"' if has_key else ""
    key = 'os.environ["SELFSEEK_API_KEY"]' if has_key else '"none"'
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    return (f"selfseek is serving {model_id} at {url}\n\n"
            f"  curl {url}/v1/chat/completions -H \"Content-Type: application/json\"{auth} -d '{body}'\n\n"
            f"  {'import os; ' if has_key else ''}from openai import OpenAI\n"
            f"  client = OpenAI(base_url=\"{url}/v1\", api_key={key})\n"
            f"  r = client.chat.completions.create(model=\"{model_id}\", "
            f"messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}], max_tokens=64)\n"
            f"  print(r.choices[0].message.content)\n")


def serve(args) -> int:
    """`selfseek serve`: args from the CLI parser (model, host, port, api_key, ...). Options newer than the
    parser may lack are read with getattr and their defaults."""
    import signal

    import uvicorn

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get("SELFSEEK_API_KEY") or None
    key_file = getattr(args, "api_key_file", None)
    engine_args = {k: v for k, v in {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                                     "kv_cache_memory": args.kv_cache_memory,
                                     "max_queue": getattr(args, "max_queue", None),
                                     "prefix_cache_dir": getattr(args, "prefix_cache_dir", None),
                                     "prefix_cache_disk_bytes": getattr(args, "prefix_cache_disk_bytes", None),
                                     "speculative_tokens": getattr(args, "speculative_tokens", None),
                                     "kv_cache_dtype": getattr(args, "kv_cache_dtype", None),
                                     "lora": getattr(args, "lora", None),  # [(name, PEFT folder)]
                                     }.items() if v is not None}
    public = getattr(args, "public_endpoints", None)
    from selfseek.distributed import launch

    parallel = launch.parallel_options(args)
    if parallel is not None and (code := launch.run_if_not_leader(args, parallel)) is not None:
        return code  # a rank that follows rank 0 (another node's, or torchrun's) until the run ends
    svc = build_service(args.model, args.dtype, args.device, args.served_model_name, engine_args,
                        getattr(args, "generation_config", "auto"), api_key=api_key,
                        api_keys=read_api_keys(key_file) if key_file else [],
                        public_endpoints=tuple(public) if public is not None else ("/health",),
                        trust_control_tokens=getattr(args, "trust_control_tokens", False),
                        tool_format=args.tool_call_format, cors_origins=args.cors_origins or [],
                        max_request_bytes=args.max_request_bytes, keep_alive_interval=args.keep_alive,
                        default_max_tokens=args.default_max_tokens, parallel=parallel)
    if parallel is not None:
        launch.stop_server_on_failure(svc.core.model, svc.engine)
    svc.warm_up(grammar=True)  # before listening: no request (and no /health 200) meets a cold model
    # The model, tokenizer and engine live as long as the process: out of the collector's sight, a decode step no
    # longer pays for Python's periodic collections walking them (~3% of a step of the default model, 1 thread).
    gc.collect()
    gc.freeze()
    app = create_app(svc)
    print(instructions(args.host, args.port, svc.model_id, bool(svc.config.keys())), flush=True)
    # uvicorn stops accepting on SIGTERM/SIGINT, lets in-flight streams finish for the drain timeout, then
    # re-raises the signal with the handlers it found: these make that re-raise a no-op, so the exit is 0.
    drained: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: drained.append(signum))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=getattr(args, "drain_timeout", 30.0))
    finally:
        svc.engine.shutdown()
    return launch.server_exit_code(svc.core.model) if parallel is not None else 0
