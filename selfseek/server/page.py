"""The chat page: GET / serves index.html, GET /static/<name> the files beside it (selfseek/server/static).

The page is plain HTML, CSS and JavaScript shipped in the package: no build step, nothing loaded from
elsewhere (the Content-Security-Policy says so to the browser, which also stops any script a model's
answer might smuggle in). It talks to the server's own /v1 API, so an API key works as for any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse, Response

from selfseek.server.protocol import APIError

router = APIRouter()
STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Only the page's own files and same-origin requests; data: for the favicon.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}  # revalidate: a new selfseek version brings new files


def _files() -> dict[str, Path]:
    """The files the page may load, by name; nothing else under the package is reachable."""
    return {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in _TYPES}


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return FileResponse(STATIC / "index.html", media_type=_TYPES[".html"], headers=_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    path = _files().get(name)
    if path is None:
        raise APIError(404, f"no static file {name!r}")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)
