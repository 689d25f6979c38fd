"""Maintenance jobs over HTTP: compaction, pruning, interventions (all need the bearer token)."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from pipeline.serve import models as m
from pipeline.serve.routes.common import JSONRoute, ServeContext, need_write, to_jsonable

router = APIRouter(route_class=JSONRoute, tags=["maintenance"], responses=m.ERRORS)


@router.post("/v1/compact", response_model=m.Report,
             summary="fold added and deleted items into new shards (a new committed version)")
async def compact(ctx: ServeContext = Depends(need_write)):
    report = await ctx.job(ctx.memory.compact)
    return to_jsonable(report) if report is not None else {"ok": True}


@router.post("/v1/prune", response_model=m.Report, summary="hard/soft pruning: the memory queries itself")
async def prune(body: m.PruneRequest, ctx: ServeContext = Depends(need_write)):
    return to_jsonable(await ctx.job(lambda: ctx.memory.prune(**body.model_dump())))


@router.post("/v1/interventions", response_model=m.InterventionVersion,
             summary="vote multipliers per item/label/source and label overrides")
async def intervene(body: m.InterventionRequest, ctx: ServeContext = Depends(need_write)):
    version = await ctx.write(lambda: ctx.memory.intervene(**body.model_dump()))
    return {"interventions_version": int(version)}
