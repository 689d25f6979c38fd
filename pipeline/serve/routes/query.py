"""Reads that answer queries: classify, search and explain, for one or many embeddings (JSON) or images
(multipart `UploadFile`). k is capped by `serve.max_k`, a batch by `serve.max_batch`."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from pydantic import ValidationError
from starlette.responses import Response

from pipeline.serve import models as m
from pipeline.serve.limits import ApiError, parse_image
from pipeline.serve.routes.common import (JSONRoute, ServeContext, hits, need_read, prediction_json, to_jsonable,
                                          validation_message)

router = APIRouter(route_class=JSONRoute, tags=["query"], responses=m.ERRORS)
# The JSON query routes whose embeddings go through the replica's QueryBatcher.
BATCHED_PATHS = ("/v1/classify", "/v1/classify/batch", "/v1/search", "/v1/search/batch")


# ---- inputs ----------------------------------------------------------------------------------------------

def _batch(ctx: ServeContext, n: int) -> None:
    if n > ctx.cfg.serve.max_batch:
        raise ApiError(422, f"a batch holds at most {ctx.cfg.serve.max_batch} queries (serve.max_batch), got {n}")


def vectors(ctx: ServeContext, rows: List[List[float]]) -> np.ndarray:
    """(n, dim) float32 from JSON rows; 422 when a row's dimension is not the memory's."""
    _batch(ctx, len(rows))
    dim = ctx.dim
    for r in rows:
        if dim is not None and len(r) != dim:
            raise ApiError(422, f"embedding has dimension {len(r)}, the memory expects {dim}")
    with np.errstate(over="ignore"):
        xq = np.asarray(rows, dtype=np.float32)
    if xq.ndim != 2:
        raise ApiError(422, "embeddings must all have the same dimension")
    if not np.isfinite(xq).all():
        raise ApiError(422, "embedding values must be finite 32-bit floats (|x| < 3.4e38)")
    return xq


async def images(ctx: ServeContext, uploads: List[UploadFile]) -> list:
    _batch(ctx, len(uploads))
    return [parse_image(await u.read()) for u in uploads]


def _form(model, **fields):
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise ApiError(422, validation_message(e.errors()))


K_FORM = Form(None, description="neighbours (default memory.k)")
NPROBE_FORM = Form(None, description="IVF lists probed")


async def query_form(k: Optional[int] = K_FORM, nprobe: Optional[int] = NPROBE_FORM) -> m.QueryOptions:
    """The search options of a multipart request, checked by the same model as the JSON bodies."""
    return _form(m.QueryOptions, k=k, nprobe=nprobe)


async def vote_form(k: Optional[int] = K_FORM, nprobe: Optional[int] = NPROBE_FORM,
                    method: Optional[str] = Form(None, description="vote method (default memory.method)"),
                    params: Optional[str] = Form(None, description='vote parameters as JSON, e.g. {"tau": 0.07}')
                    ) -> m.VoteOptions:
    """The vote options of a multipart request, checked by the same model as the JSON bodies."""
    try:
        p = json.loads(params) if params else {}
    except ValueError:
        raise ApiError(422, 'params must be a JSON object, e.g. {"tau": 0.07}')
    return _form(m.VoteOptions, k=k, nprobe=nprobe, method=method, params=p)


def _k(ctx: ServeContext, k: Optional[int]) -> int:
    k = int(k or ctx.cfg.memory.k)
    if not 1 <= k <= ctx.cfg.serve.max_k:
        raise ApiError(422, f"k must be between 1 and {ctx.cfg.serve.max_k} (serve.max_k), got {k}")
    return k


def _vote_args(ctx: ServeContext, opts: m.VoteOptions) -> Dict[str, Any]:
    from pipeline.memory.votes import get_method

    method = opts.method or ctx.cfg.memory.method
    get_method(method)  # UserError -> 422 listing the methods, before any work
    params = {n: v for n, v in opts.params.model_dump().items() if v is not None}
    return {"k": _k(ctx, opts.k), "method": method, "nprobe": opts.nprobe, **params}


# ---- the three operations ----------------------------------------------------------------------------------

async def _answer(ctx: ServeContext, key: tuple, run, query: dict) -> list:
    """`run(**query)` (one JSON result per query row) on the replica's pool. Embedding queries go through
    the batcher, where concurrent queries with an equal `key` (the options) share one memory call; the
    JSON is built in the worker thread too, so the event loop only moves bytes."""
    if "embeddings" in query:
        return await ctx.batcher.run(key, lambda xq: run(embeddings=xq), query["embeddings"])
    return await ctx.read(lambda: run(**query))


async def classify(ctx: ServeContext, query: dict, opts: m.VoteOptions) -> Tuple[int, str, List[dict]]:
    args = _vote_args(ctx, opts)

    def run(**q) -> List[dict]:
        return [prediction_json(p, args["k"]) for p in ctx.memory.classify(**q, **args)]

    key = ("classify", *sorted((n, str(v)) for n, v in args.items()))
    return args["k"], args["method"], await _answer(ctx, key, run, query)


async def search(ctx: ServeContext, query: dict, opts: m.QueryOptions) -> Tuple[int, List[List[dict]]]:
    k = _k(ctx, opts.k)

    def run(**q) -> List[List[dict]]:
        res = ctx.memory.search(**q, k=k, nprobe=opts.nprobe)
        return [hits(res, r) for r in range(res.I.shape[0])]

    return k, await _answer(ctx, ("search", k, opts.nprobe), run, query)


async def explain(ctx: ServeContext, query: dict, opts: m.VoteOptions, fmt: str):
    """The prediction with every neighbour's weight, or (fmt=png) the picture of it."""
    args = _vote_args(ctx, opts)
    args.pop("nprobe")
    if fmt == "json":
        pred = await ctx.read(lambda: ctx.memory.explain(**query, **args))
        return to_jsonable(prediction_json(pred, args["k"]))  # no response model here: NaN/inf -> null

    def picture() -> bytes:
        fd, path = tempfile.mkstemp(suffix=".png")
        os.close(fd)
        try:
            ctx.memory.explain(**query, **args, out=path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)

    return Response(await ctx.read(picture), media_type="image/png")


FORMAT = Query("json", pattern="^(json|png)$", description="json: neighbours and weights; png: the picture")
EXPLAIN = {200: {"content": {"application/json": {"schema": m.Prediction.model_json_schema(
    ref_template="#/components/schemas/{model}")}, "image/png": {}},
    "description": "the explanation as JSON, or as a PNG picture with format=png"}}


# ---- routes ------------------------------------------------------------------------------------------------

@router.post("/v1/classify", response_model=m.Prediction, summary="classify one embedding")
async def classify_one(body: m.ClassifyRequest, ctx: ServeContext = Depends(need_read)):
    """The label, the vote per class and the k neighbours that voted (id, label, distance, weight, image_url)."""
    return (await classify(ctx, {"embeddings": vectors(ctx, [body.embedding])}, body))[2][0]


@router.post("/v1/classify/batch", response_model=m.PredictionBatch, summary="classify many embeddings")
async def classify_batch(body: m.ClassifyBatchRequest, ctx: ServeContext = Depends(need_read)):
    k, method, preds = await classify(ctx, {"embeddings": vectors(ctx, body.embeddings)}, body)
    return {"k": k, "method": method, "predictions": preds}


@router.post("/v1/classify/image", response_model=m.Prediction, summary="classify one uploaded image")
async def classify_image(image: UploadFile = File(description="PNG, JPEG, WebP..."),
                         opts: m.VoteOptions = Depends(vote_form), ctx: ServeContext = Depends(need_read)):
    return (await classify(ctx, {"images": await images(ctx, [image])}, opts))[2][0]


@router.post("/v1/classify/images", response_model=m.PredictionBatch, summary="classify many uploaded images")
async def classify_images(images_: List[UploadFile] = File(alias="images", description="one file per query"),
                          opts: m.VoteOptions = Depends(vote_form), ctx: ServeContext = Depends(need_read)):
    k, method, preds = await classify(ctx, {"images": await images(ctx, images_)}, opts)
    return {"k": k, "method": method, "predictions": preds}


@router.post("/v1/search", response_model=m.SearchResponse, summary="the k nearest live items of an embedding")
async def search_one(body: m.SearchRequest, ctx: ServeContext = Depends(need_read)):
    k, rows = await search(ctx, {"embeddings": vectors(ctx, [body.embedding])}, body)
    return {"k": k, "neighbors": rows[0]}


@router.post("/v1/search/batch", response_model=m.SearchBatchResponse, summary="search many embeddings")
async def search_batch(body: m.SearchBatchRequest, ctx: ServeContext = Depends(need_read)):
    k, rows = await search(ctx, {"embeddings": vectors(ctx, body.embeddings)}, body)
    return {"k": k, "results": rows}


@router.post("/v1/search/image", response_model=m.SearchResponse, summary="search with one uploaded image")
async def search_image(image: UploadFile = File(), opts: m.QueryOptions = Depends(query_form),
                       ctx: ServeContext = Depends(need_read)):
    k, rows = await search(ctx, {"images": await images(ctx, [image])}, opts)
    return {"k": k, "neighbors": rows[0]}


@router.post("/v1/search/images", response_model=m.SearchBatchResponse, summary="search with many images")
async def search_images(images_: List[UploadFile] = File(alias="images"), opts: m.QueryOptions = Depends(query_form),
                        ctx: ServeContext = Depends(need_read)):
    k, rows = await search(ctx, {"images": await images(ctx, images_)}, opts)
    return {"k": k, "results": rows}


@router.post("/v1/explain", responses=EXPLAIN, summary="why an embedding gets its label: neighbours, weights, "
                                                         "picture")
async def explain_embedding(body: m.ClassifyRequest, format: str = FORMAT, ctx: ServeContext = Depends(need_read)):
    vectors(ctx, [body.embedding])
    return await explain(ctx, {"embedding": np.asarray(body.embedding, np.float32)}, body, format)


@router.post("/v1/explain/image", responses=EXPLAIN, summary="why an uploaded image gets its label")
async def explain_image(image: UploadFile = File(), opts: m.VoteOptions = Depends(vote_form), format: str = FORMAT,
                        ctx: ServeContext = Depends(need_read)):
    return await explain(ctx, {"image": (await images(ctx, [image]))[0]}, opts, format)
