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


def install(app: FastAPI) -> None:
    """Serve /openapi.json with the request models filled in (built once, on first request)."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        bodies = _bodies()
        models = sorted({*bodies.values(), ErrorResponse, OllamaError}, key=lambda m: m.__name__)
        _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
        doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))

        def ref(model: type[BaseModel]) -> dict:
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        schemas = doc["components"]["schemas"]
        names = app.state.service.model_names() if hasattr(app.state, "service") else None
        for name in ("ChatCompletionRequest", "CompletionRequest", "OllamaChatRequest", "OllamaGenerateRequest"):
            if names and "model" in schemas[name].get("properties", {}):  # other names are a 404
                schemas[name]["properties"]["model"] = {"type": "string", "enum": names}
        for path, item in doc["paths"].items():
            op = item.get("post")
            if op is None:
                continue
            model = bodies.get(path)
            err = ref(OllamaError) if path.startswith("/api/") else ref(ErrorResponse) if model else {"type": "object"}
            if model is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(model)}}}
            documented = {
                "200": {"description": "The answer (JSON, or a stream with `stream: true`)",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
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
