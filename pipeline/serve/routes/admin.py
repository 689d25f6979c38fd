"""Health, stats, Prometheus metrics, and the memory's version history with rollback."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from pipeline.serve import models as m
from pipeline.serve.routes.common import JSONRoute, ServeContext, context, need_read, need_write, to_jsonable

router = APIRouter(route_class=JSONRoute, tags=["admin"], responses=m.ERRORS)


@router.get("/healthz", response_model=m.Health, summary="liveness: 200 when the memory answers")
async def healthz(ctx: ServeContext = Depends(context)):
    s = to_jsonable(await ctx.read(ctx.memory.stats))
    return {"status": "ok", "version": s.get("version")}


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request):
    body, ctype = await request.app.state.ctx.read(request.app.state.metrics.render)
    return Response(body, media_type=ctype)


@router.get("/v1/stats", response_model=m.Stats, summary="items, shards, tombstones, delta size, version")
async def stats(ctx: ServeContext = Depends(need_read)):
    return to_jsonable(await ctx.read(ctx.memory.stats))


@router.get("/v1/versions", response_model=m.Versions, summary="one row per committed edit, oldest first")
async def versions(ctx: ServeContext = Depends(need_read)):
    return {"versions": to_jsonable(await ctx.read(ctx.memory.versions))}


@router.post("/v1/rollback", response_model=m.Report,
             summary="undo adds, relabels, interventions and pruning committed after a version")
async def rollback(body: m.RollbackRequest, ctx: ServeContext = Depends(need_write)):
    return to_jsonable(await ctx.write(lambda: ctx.memory.rollback(body.version)))
