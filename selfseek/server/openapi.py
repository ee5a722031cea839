"""/openapi.json: FastAPI's document, with the request bodies the routes parse themselves (protocol.py's
models, so fuzzers and client generators see the real fields and bounds) and the error envelopes."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from selfseek.server import protocol as p


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """DeepSeek's and OpenAI's error envelope."""

    error: ErrorDetail


class OllamaError(BaseModel):
    error: str


def _bodies() -> dict[str, type[BaseModel]]:
    out: dict[str, type[BaseModel]] = {}
    for prefix in ("", "/v1", "/beta"):
        out[f"{prefix}/chat/completions"] = p.ChatCompletionRequest
        out[f"{prefix}/completions"] = p.CompletionRequest
    out |= {"/api/chat": p.OllamaChatRequest, "/api/generate": p.OllamaGenerateRequest,
            "/api/show": p.OllamaShowRequest, "/tokenize": p.TokenizeRequest, "/detokenize": p.DetokenizeRequest}
    return out


# One item of a stream. Before OpenAPI 3.2 an event stream's `schema` describes each event (its fields, the
# data a JSON chunk or "[DONE]"), not the stream's text; an NDJSON stream's, each line.
_STREAM_ITEM: dict[str, dict] = {
    "text/event-stream": {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
        "retry": {"type": "integer"}}},
    "application/x-ndjson": {"type": "string"},
}


def _responses() -> dict[str, tuple[type[BaseModel], str | None]]:
    """Path -> (its 200 JSON body, the media type of its stream with `stream: true`, if it has one)."""
    out: dict[str, tuple[type[BaseModel], str | None]] = {}
    for prefix in ("", "/v1", "/beta"):
        out[f"{prefix}/chat/completions"] = (p.ChatCompletion, "text/event-stream")
        out[f"{prefix}/completions"] = (p.TextCompletion, "text/event-stream")
    for prefix in ("", "/anthropic"):
        out[f"{prefix}/v1/messages"] = (p.AnthropicMessage, "text/event-stream")
        out[f"{prefix}/v1/messages/count_tokens"] = (p.AnthropicTokenCount, None)
    out |= {"/models": (p.ModelList, None), "/v1/models": (p.ModelList, None),
            "/models/{name}": (p.ModelCard, None), "/v1/models/{name}": (p.ModelCard, None),
            "/tokenize": (p.TokenizeResponse, None), "/detokenize": (p.DetokenizeResponse, None),
            "/version": (p.OllamaVersion, None), "/api/version": (p.OllamaVersion, None),
            "/api/chat": (p.OllamaChatResponse, "application/x-ndjson"),
            "/api/generate": (p.OllamaGenerateResponse, "application/x-ndjson"),
            "/api/tags": (p.OllamaTags, None), "/api/ps": (p.OllamaTags, None),
            "/api/show": (p.OllamaShowResponse, None)}
    return out


def install(app: FastAPI) -> None:
    """Serve /openapi.json with the request models filled in (built once, on first request)."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        bodies = _bodies()
        responses = _responses()
        models = sorted({*bodies.values(), ErrorResponse, OllamaError}, key=lambda m: m.__name__)
        outs = sorted({m for m, _ in responses.values()}, key=lambda m: m.__name__)
        _, defs = models_json_schema([(m, "validation") for m in models] + [(m, "serialization") for m in outs],
                                     ref_template="#/components/schemas/{model}")
        doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))

        def ref(model: type[BaseModel]) -> dict:
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        schemas = doc["components"]["schemas"]
        names = app.state.service.model_names() if hasattr(app.state, "service") else None
        for name in ("ChatCompletionRequest", "CompletionRequest", "OllamaChatRequest", "OllamaGenerateRequest"):
            if names and "model" in schemas[name].get("properties", {}):  # other names are a 404
                schemas[name]["properties"]["model"] = {"type": "string", "enum": names}
        for path, item in doc["paths"].items():
            if path in responses and (op := item.get("post") or item.get("get")) is not None:
                model, stream = responses[path]
                content = {"application/json": {"schema": ref(model)}}
                if stream:
                    content[stream] = {"schema": _STREAM_ITEM[stream]}
                op.setdefault("responses", {})["200"] = {
                    "description": "The answer" + (" (a stream with `stream: true`)" if stream else ""),
                    "content": content}
            op = item.get("post")
            if op is None:
                continue
            model = bodies.get(path)
            err = ref(OllamaError) if path.startswith("/api/") else ref(ErrorResponse) if model else {"type": "object"}
            if model is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(model)}}}
            documented = {
                **op.get("responses", {}),
                **{str(code): {"description": why, "content": {"application/json": {"schema": err}}}
                   for code, why in ((400, "Invalid request"), (401, "Authentication fails"),
                                     (404, "Unknown model"), (413, "Body too large"),
                                     (422, "Invalid parameters"), (429, "At capacity (Retry-After)"),
                                     (500, "Server error (a request id to find it in the log)"),
                                     (503, "The engine has stopped"))},
            }
            if model is not None:
                op["responses"] = documented
            else:  # a route documented elsewhere (FastAPI's models): add only the statuses it lacks
                for code, response in documented.items():
                    op.setdefault("responses", {}).setdefault(code, response)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
