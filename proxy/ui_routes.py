"""The dashboard: a static page (proxy/ui/: index.html, app.js, app.css; no build step, nothing from a CDN) that
reads the JSON API with the admin key the user types once (kept in the tab's sessionStorage).

    GET /               -> redirect to /ui
    GET /ui             the page
    GET /ui/app.js, /ui/app.css

The static files carry no data, so they are served without a key; every number on the page comes from the
read API (/stats, /sessions, /train/steps, ...), which checks the admin key as usual.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import RedirectResponse, Response

from trainwire.proxy.errors import ApiError

router = APIRouter(include_in_schema=False)

UI_DIR = files("trainwire.proxy") / "ui"  # a package resource, also in a wheel or zip
FILES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# The page must keep working offline and must not be framed by another site.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


@cache
def _read(name: str) -> bytes:
    return (UI_DIR / name).read_bytes()


@router.get("/")
async def root() -> Response:
    return RedirectResponse("ui", status_code=307)  # relative: also right behind a path prefix


@router.get("/ui")
async def page() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/ui/")
async def page_slash() -> Response:
    return RedirectResponse("../ui", status_code=307)  # the page's relative links assume /ui


@router.get("/ui/{name}")
async def asset(name: str) -> Response:
    if name not in FILES:
        raise ApiError(404, f"no dashboard file {name!r}", code="not_found")
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)
