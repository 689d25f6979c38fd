"""The HTTP API of the visual memory as a FastAPI app (OpenAPI at /docs), built around one memory object.

`create_api(cfg, memory)` needs only the `VisualMemory` methods (`classify`, `search`, `add`, `delete`,
`compact`, `intervene`, `stats`, `get_item`, `get_image`), so the same app runs inside the Ray Serve ingress
(where the memory searches through the shard deployments) or in any ASGI server.

Concurrency: memory calls run in a thread pool so the event loop stays free; mutations are serialised by one
lock (the memory's logs are single-writer), queries take no lock, so queries keep flowing during compaction.
Every error is JSON `{"error": message}`.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import Config, env_token
from pipeline.errors import DataError, NotFound, UserError
from pipeline.serve.auth import check_bearer
from pipeline.serve.limits import (ApiError, BodyLimitMiddleware, new_key, parse_embedding, parse_ids,
                                   parse_image, parse_int, parse_k, parse_label_name, parse_params, parse_token)
from pipeline.serve.metrics import ApiMetrics

log = logging.getLogger("vmem.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
INT64_MAX = 2**63 - 1


def to_jsonable(obj: Any) -> Any:
    """Dataclasses / numpy values from the memory layer as plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _image_url(item_id: int) -> str:
    return f"/v1/items/{item_id}/image"


def _prediction_json(p: Any) -> dict:
    d = to_jsonable(p)
    for n in d["neighbors"]:
        n["image_url"] = _image_url(int(n["id"]))
    return d


def _search_rows(res: Any, row: int) -> List[dict]:
    """Row `row` of a `Neighbors` result ((nq, k) arrays) as a list of neighbour dicts, best first."""
    out = []
    for j in range(res.I.shape[1]):
        i = int(res.I[row, j])
        if i < 0:
            continue
        sim = float(res.D[row, j])
        out.append({"id": i, "label": int(res.labels[row, j]), "label_name": str(res.label_names[row, j]),
                    "similarity": sim, "distance": 1.0 - sim, "key": str(res.keys[row, j]),
                    "source": str(res.sources[row, j]), "image_url": _image_url(i)})
    return out


def _memory_dim(memory: Any) -> Optional[int]:
    dim = getattr(memory, "dim", None)
    return int(dim) if isinstance(dim, (int, np.integer)) else None


def _item_id(item_id: int) -> int:
    if not 0 <= item_id <= INT64_MAX:
        raise ApiError(404, f"no item with id {item_id}")
    return item_id


def _image_response(img: Any) -> Response:
    """PNG/JPEG bytes for an image the memory returns as bytes or a PIL image."""
    if isinstance(img, (bytes, bytearray)):
        data = bytes(img)
        media = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg" if data[:2] == b"\xff\xd8" \
            else "application/octet-stream"
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})


def create_api(cfg: Config, memory: Any, token: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving `memory` with the limits and auth of `cfg.serve` (token: env_token(cfg))."""
    sc = cfg.serve
    token = token if token is not None else env_token(cfg)
    write_lock = threading.Lock()
    metrics = ApiMetrics(stats_fn=lambda: to_jsonable(memory.stats()))
    app = FastAPI(title="visual-memory", version="1",
                  description="Classify images by similarity against an editable kNN visual memory. "
                              "Mutations need `Authorization: Bearer <token>`.")
    app.add_middleware(BodyLimitMiddleware, max_bytes=sc.max_request_bytes)

    # ---- errors: one JSON shape for everything --------------------------------------------------------
    def err(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return err(e.status, e.message)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, e: NotFound):
        return err(404, str(e))

    @app.exception_handler(UserError)  # DataError and the rest: input the client can fix
    async def _user_error(_: Request, e: UserError):
        return err(422, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in d.get('loc', ()))}: {d.get('msg')}" for d in e.errors()]
        return err(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return err(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("internal error")
        return err(500, f"internal error: {type(e).__name__}: {e}")

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.observe(route, request.method, response.status_code, started)
        return response

    # ---- auth helpers -----------------------------------------------------------------------------------
    def need_write(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), token)

    def need_read(request: Request) -> None:
        if sc.protect_reads:
            check_bearer(request.headers.get("authorization"), token, what="reads (serve.protect_reads is on)")

    async def write(fn, *args, **kwargs):
        def locked():
            with write_lock:
                return fn(*args, **kwargs)
        return await run_in_threadpool(locked)

    async def read_input(request: Request, form_fields, wrong_type: str):
        """({"images": [...]} or {"embeddings": array}, other fields) from a multipart image upload (with
        `form_fields` as form fields) or a JSON body with an `embedding`; 422 with `wrong_type` otherwise."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            if upload is None or not hasattr(upload, "read"):
                raise ApiError(422, "multipart requests need an `image` file field")
            return {"images": [parse_image(await upload.read())]}, {k: form.get(k) for k in form_fields}
        if ctype.startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(422, "request body is not valid JSON")
            if not isinstance(body, dict) or "embedding" not in body:
                raise ApiError(422, "JSON requests need an `embedding` field (a list of numbers)")
            return {"embeddings": parse_embedding(body["embedding"], _memory_dim(memory))}, body
        raise ApiError(422, wrong_type)

    async def read_query(request: Request):
        """A classify/search body, multipart (image file + form fields) or JSON (embedding), as (the memory
        call's arguments: k and images or embeddings, the other fields)."""
        data, fields = await read_input(request, ("k", "method", "params"),
                                        "send an image as multipart/form-data (field `image`) or an embedding "
                                        "as JSON")
        return {"k": parse_k(fields.get("k"), sc.max_k, cfg.memory.k), **data}, fields

    # ---- pages ------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", summary="liveness: 200 when the memory answers")
    async def healthz():
        s = await run_in_threadpool(memory.stats)
        return {"status": "ok", "version": to_jsonable(s).get("version")}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        body, ctype = await run_in_threadpool(metrics.render)
        return Response(body, media_type=ctype)

    # ---- reads ------------------------------------------------------------------------------------------
    @app.post("/v1/classify", summary="classify an image (multipart `image`) or an embedding (JSON)")
    async def classify(request: Request):
        """Body: multipart with `image` (+ optional form fields k, method, params as JSON) or JSON
        `{"embedding": [...], "k": 10, "method": "plurality", "params": {"tau": 0.07}}`. Returns the label, the
        vote per class and the k neighbours (id, label, distance, weight, image_url)."""
        need_read(request)
        args, q = await read_query(request)
        method = q.get("method") or cfg.memory.method
        from pipeline.memory.votes import get_method

        get_method(method)  # 422 listing the methods before any work
        params = parse_params(q.get("params"))
        preds = await run_in_threadpool(lambda: memory.classify(method=method, **args, **params))
        out = _prediction_json(preds[0])
        out.update(k=args["k"], method=method)
        return out

    @app.post("/v1/search", summary="the k nearest live items of an image or embedding")
    async def search(request: Request):
        need_read(request)
        args, _ = await read_query(request)
        res = await run_in_threadpool(lambda: memory.search(**args))
        return {"k": args["k"], "neighbors": _search_rows(res, 0)}

    @app.get("/v1/items/{item_id}", summary="metadata of one item")
    async def get_item(item_id: int, request: Request):
        need_read(request)
        item = await run_in_threadpool(memory.get_item, _item_id(item_id))
        out = to_jsonable(item)
        out["image_url"] = _image_url(item_id)
        return out

    @app.get("/v1/items/{item_id}/image", summary="the stored image of one item")
    async def get_image(item_id: int, request: Request):
        need_read(request)
        img = await run_in_threadpool(memory.get_image, _item_id(item_id))
        return _image_response(img)

    @app.get("/v1/stats", summary="items, shards, tombstones, delta size, manifest version")
    async def stats(request: Request):
        need_read(request)
        return to_jsonable(await run_in_threadpool(memory.stats))

    # ---- mutations --------------------------------------------------------------------------------------
    @app.post("/v1/items", status_code=201, summary="add one item: multipart `image` + `label`, or JSON embedding")
    async def add_item(request: Request):
        """Multipart fields: image, label (int), label_name?, source? (default `api`), key? (generated if
        absent). Or JSON `{"embedding": [...], "label": 3, ...}`. Returns the new item's id and key."""
        need_write(request)
        data, fields = await read_input(request, ("label", "label_name", "source", "key"),
                                        "send multipart/form-data (image + label) or JSON (embedding + label)")
        if fields.get("label") in (None, ""):
            raise ApiError(422, "label (an integer class id) is required")
        label = parse_int(fields.get("label"), "label")
        label_name = parse_label_name(fields.get("label_name"))
        source = parse_token(fields.get("source") or "api", "source")
        key = parse_token(fields["key"], "key") if fields.get("key") else new_key()
        kwargs: Dict[str, Any] = dict(labels=[label], keys=[key], sources=[source])
        if label_name is not None:
            kwargs["label_names"] = [label_name]
        ids = await write(lambda: memory.add(**data, **kwargs))
        return {"id": int(np.asarray(ids).reshape(-1)[0]), "key": key, "label": label}

    @app.delete("/v1/items/{item_id}", summary="forget one item (invisible to the very next query)")
    async def delete_item(item_id: int, request: Request):
        need_write(request)
        item_id = _item_id(item_id)
        await run_in_threadpool(memory.get_item, item_id)  # 404 for unknown ids
        n = await write(lambda: memory.delete(ids=[item_id]))
        return {"deleted": int(n)}

    @app.post("/v1/delete", summary="forget items by ids, label or source")
    async def delete_many(request: Request):
        """JSON with exactly one of `{"ids": [...]}`, `{"label": 3}`, `{"source": "api"}`."""
        need_write(request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(422, "request body must be JSON: {\"label\": 3} or {\"source\": \"api\"}")
        if not isinstance(body, dict):
            raise ApiError(422, "request body must be a JSON object")
        given = [k for k in ("ids", "label", "source") if body.get(k) is not None]
        if len(given) != 1:
            raise ApiError(422, "give exactly one of ids, label or source")
        if given[0] == "ids":
            kw: Dict[str, Any] = {"ids": parse_ids(body["ids"])}
        elif given[0] == "label":
            kw = {"label": parse_int(body["label"], "label")}
        else:
            kw = {"source": parse_token(body["source"], "source")}
        n = await write(lambda: memory.delete(**kw))
        return {"deleted": int(n)}

    @app.post("/v1/items/{item_id}/relabel", summary="change the label one item votes for")
    async def relabel(item_id: int, request: Request):
        """JSON `{"label": 3, "label_name": "dress"}`: an intervention overlay, effective at once."""
        need_write(request)
        item_id = _item_id(item_id)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(422, "request body must be JSON: {\"label\": 3}")
        if not isinstance(body, dict) or body.get("label") is None:
            raise ApiError(422, "label (an integer class id) is required")
        label = parse_int(body["label"], "label")
        label_name = parse_label_name(body.get("label_name"))
        await run_in_threadpool(memory.get_item, item_id)
        out = await write(lambda: relabel_item(memory, item_id, label, label_name))
        return to_jsonable(out)

    @app.post("/v1/compact", summary="fold the delta and drop tombstones into a new manifest version")
    async def compact(request: Request):
        need_write(request)
        report = await write(memory.compact)
        return to_jsonable(report) if report is not None else {"ok": True}

    app.state.metrics = metrics
    app.state.memory = memory
    return app


def relabel_item(memory: Any, item_id: int, label: int, label_name: Optional[str]) -> Any:
    """Relabel through the memory layer's intervention overlay (no re-embedding, reversible)."""
    version = memory.intervene(relabel={item_id: label},
                               label_names={label: label_name} if label_name else None)
    return {"id": item_id, "label": label, "interventions_version": int(version)}
