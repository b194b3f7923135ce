"""The playground: one self-contained page (playground.html, inline JS and CSS, no build step, no
external assets) at `GET /`. It streams POST /v1/completions and colours each token by the
layer it left at, with a live exit histogram and tokens/s against full decoding.

The API key guards the page like every other route. A browser cannot send an Authorization
header when it opens a page, so `GET /?api_key=KEY` is accepted too (Jupyter's `?token=`):
the key is moved into the header before the gate checks it, and the page reuses it for its
API calls.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from urllib.parse import parse_qs

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PATH = "/"


@lru_cache(maxsize=1)
def page() -> str:
    return resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")


def add_playground(app: FastAPI) -> None:
    """Serve the page at `/`; call after the API-key gate is added (this wrapper must run before it)."""

    @app.get(PATH, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page(), headers={"Cache-Control": "no-cache"})

    app.add_middleware(_KeyFromQuery)


class _KeyFromQuery:
    """Pure ASGI: on `GET /?api_key=KEY` without an Authorization header, add `Bearer KEY`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH and scope["method"] in ("GET", "HEAD"):
            headers = list(scope.get("headers") or [])
            key = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key", [""])[0]
            if key and not any(name == b"authorization" for name, _ in headers):
                headers.append((b"authorization", f"Bearer {key}".encode("latin-1")))
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)
