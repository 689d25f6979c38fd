"""The HTTP API of the visual memory as a FastAPI app (OpenAPI at /docs), built around one memory object.

`create_api(cfg, memory)` needs only the `ServedMemory` protocol (`pipeline.memory.protocol`), so the same app runs inside the Ray Serve
ingress or in any ASGI server (tests, the schemathesis run). The routes live in `pipeline.serve.routes`, one
router per concern; their bodies are the pydantic models of `pipeline.serve.models`.

Concurrency: memory calls run on the replica's thread pool so the event loop stays free; concurrent embedding
queries with equal options share memory calls (`pipeline.serve.batching`); small mutations are serialised
per replica by one lock; queries, adds and deletes keep flowing while a compaction or pruning job runs.
Every error is JSON `{"error": message}`.

Compatibility: API v1 clients posted multipart images to the JSON paths (/v1/classify, /v1/search,
/v1/items); such requests are routed to their typed multipart twins (/image, /upload).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import Config, env_token
from pipeline.errors import NotFound, UserError
from pipeline.memory.protocol import ServedMemory
from pipeline.serve.batching import CountArrivals
from pipeline.serve.limits import ApiError, BodyLimitMiddleware
from pipeline.serve.metrics import ApiMetrics
from pipeline.serve.routes import admin, items, maintenance, query
from pipeline.serve.routes.common import ServeContext, to_jsonable, validation_message

log = logging.getLogger("vmem.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
MULTIPART_TWINS = {"/v1/classify": "/v1/classify/image", "/v1/search": "/v1/search/image",
                   "/v1/items": "/v1/items/upload"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    handlers = {
        ApiError: lambda e: (e.status, e.message),
        NotFound: lambda e: (404, str(e)),
        UserError: lambda e: (422, str(e)),  # DataError and the rest: input the client can fix
        RequestValidationError: lambda e: (422, validation_message(e.errors())),
        StarletteHTTPException: lambda e: (e.status_code, str(e.detail)),
    }
    for exc, to_status in handlers.items():
        async def handle(_: Request, e: Exception, to_status=to_status):
            return _error(*to_status(e))
        app.add_exception_handler(exc, handle)

    async def internal(_: Request, e: Exception):
        log.exception("internal error")
        return _error(500, f"internal error: {type(e).__name__}: {e}")
    app.add_exception_handler(Exception, internal)


class MultipartTwins:
    """Pure ASGI: a multipart POST to a JSON path goes to its multipart twin (see module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in MULTIPART_TWINS:
            ctype = dict(scope.get("headers", ())).get(b"content-type", b"")
            if ctype.startswith(b"multipart/form-data"):
                twin = MULTIPART_TWINS[scope["path"]]
                scope = {**scope, "path": twin, "raw_path": twin.encode()}
        return await self.app(scope, receive, send)


class Observe:
    """Pure ASGI: request count and latency per route template and status into `metrics` (cheaper per request
    than Starlette's BaseHTTPMiddleware, which runs the app in a separate task)."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, scope["method"], status[0], started)


def create_api(cfg: Config, memory: ServedMemory, token: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving `memory` with the limits and auth of `cfg.serve` (token: env_token(cfg))."""
    ctx = ServeContext(cfg, memory, token if token is not None else env_token(cfg))
    metrics = ApiMetrics(stats_fn=lambda: to_jsonable(memory.stats()))
    app = FastAPI(title="visual-memory", version="2",
                  description="Classify images by similarity against an editable kNN visual memory. "
                              "Mutations need `Authorization: Bearer <token>`.")
    app.state.ctx, app.state.metrics, app.state.memory = ctx, metrics, memory
    _add_error_handlers(app)

    app.add_middleware(CountArrivals, batcher=ctx.batcher, paths=query.BATCHED_PATHS)
    app.add_middleware(Observe, metrics=metrics)
    app.add_middleware(MultipartTwins)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.serve.max_request_bytes)  # outermost: before parsing
    for r in (query.router, items.router, maintenance.router, admin.router):
        app.include_router(r)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
