"""``/docs`` (Swagger UI) and ``/redoc`` with their JavaScript, CSS and favicon served by this server,
so the pages work without internet (FastAPI's defaults load them from a CDN).

The assets are the ones the ``fastapi-offline`` package ships (Swagger UI 5, Apache-2.0; ReDoc 2,
MIT; FastAPI's favicon, MIT); only its files are used, not its FastAPI subclass. Open without an API
key, like ``/openapi.json``.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

router = APIRouter(include_in_schema=False)

ASSETS_PATH = "/docs/assets"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
"""The files served under ``ASSETS_PATH`` and their content types."""


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    base, app = _base(request), request.app
    return get_swagger_ui_html(
        openapi_url=base + app.openapi_url, title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{base}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{base}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{base}{ASSETS_PATH}/favicon.png",
        oauth2_redirect_url=base + "/docs/oauth2-redirect",
        # No online validator badge: it would load an image from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})})


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    base, app = _base(request), request.app
    page = get_redoc_html(openapi_url=base + app.openapi_url, title=f"{app.title} - ReDoc",
                          redoc_js_url=f"{base}{ASSETS_PATH}/redoc.standalone.js",
                          redoc_favicon_url=f"{base}{ASSETS_PATH}/favicon.png", with_google_fonts=False)
    # ReDoc's sidebar footer always loads a logo from cdn.redoc.ly (and hides it when that fails):
    # images from this server only, so the browser does not even try.
    page.headers["Content-Security-Policy"] = "img-src 'self' data:"
    return page


@router.get(ASSETS_PATH + "/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no docs asset {name!r}")
    path = resources.files("fastapi_offline").joinpath("static", name)
    return FileResponse(str(path), media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})
