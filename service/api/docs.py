"""``/docs`` (Swagger UI) and ``/redoc`` that work offline: every script, style and icon is served
by the service itself, from the static files of the ``fastapi-offline`` package, never a CDN.

FastAPI's own pages load Swagger UI and ReDoc from jsDelivr (and ReDoc's fonts from Google), so
on a machine or cluster without internet access they stay blank. The HTML is FastAPI's; only the
asset URLs point here, Swagger UI's validator badge is off (it calls validator.swagger.io) and
ReDoc uses the system fonts.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


def install(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and their assets; build the app with ``docs_url=None,
    redoc_url=None`` so FastAPI's CDN pages do not take the paths first."""
    static = files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(static)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root, assets, spec = _urls(app, request)
        return get_swagger_ui_html(
            openapi_url=spec,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + OAUTH2_REDIRECT,
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        _, assets, spec = _urls(app, request)
        js, icon = f"{assets}/redoc.standalone.js", f"{assets}/favicon.png"
        title = f"{app.title} - ReDoc"
        return get_redoc_html(
            openapi_url=spec,
            title=title,
            redoc_js_url=js,
            redoc_favicon_url=icon,
            with_google_fonts=False,
        )


def _urls(app: FastAPI, request: Request) -> tuple[str, str, str]:
    """The path prefix the app is mounted under (``root_path``, as FastAPI's own pages use it),
    the assets' URL and the OpenAPI document's URL."""
    root: str = request.scope.get("root_path", "").rstrip("/")
    return root, root + ASSETS, root + (app.openapi_url or "/openapi.json")
