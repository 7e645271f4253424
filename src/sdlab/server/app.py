"""The app factory: `create_app(settings)` builds one FastAPI app with its own Server (models, job
queue, worker thread), so any number can live in one process (tests) or one per Ray replica.

    from sdlab.server.app import create_app
    from sdlab.server.settings import ServerSettings
    app = create_app(ServerSettings(models_dir="models"))   # then: uvicorn.run(app)

Routes: `/sdapi/v1/*` (the popular web UI's API), `/api/v1/*` (sdlab's own), `/docs` (OpenAPI), the
page at `/` with its assets under `/static/`. HTTP Basic guards all of them when credentials are
set; CORS stays closed unless origins are allowed; request bodies are capped.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from . import native_api, webui_api
from .http import ApiError, BasicAuth, BodyLimit, install_error_handlers
from .service import Server
from .settings import ServerSettings

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


def create_app(settings: ServerSettings = ServerSettings()) -> FastAPI:
    server = Server(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="sdlab", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion from scratch: sdlab's own API (/api/v1) and the popular SD web "
                              "UI's (/sdapi/v1).")
    app.state.server = server
    install_error_handlers(app)
    app.include_router(webui_api.router)
    app.include_router(native_api.router)

    @app.get("/", include_in_schema=False)
    async def page():
        index = os.path.join(STATIC_DIR, "index.html")
        if not os.path.isfile(index):
            raise ApiError(404, "NotFound", "this sdlab has no web page installed; the APIs are at /docs")
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    if os.path.isdir(STATIC_DIR):
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # added innermost first: CORS answers preflight requests before authentication is asked for
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BasicAuth, credentials=settings.api_auth)
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allow_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    return app
