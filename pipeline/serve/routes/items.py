"""Items: read one (metadata, image), add (JSON embedding, uploaded image, or a batch), delete, relabel.

Mutations need the bearer token and are durable and visible to the next query when they return."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Path, UploadFile

from pipeline.serve import models as m
from pipeline.serve.limits import ApiError, new_key, parse_image, parse_label_name, parse_token
from pipeline.serve.routes.common import (PNG, JSONRoute, ServeContext, image_response, image_url, need_read,
                                          need_write, to_jsonable)
from pipeline.serve.routes.query import vectors

router = APIRouter(route_class=JSONRoute, tags=["items"], responses=m.ERRORS)
ItemId = Path(ge=0, le=m.INT64_MAX, description="item id")


@router.get("/v1/items/{item_id}", response_model=m.Item, summary="metadata of one item")
async def get_item(item_id: int = ItemId, ctx: ServeContext = Depends(need_read)):
    item = to_jsonable(await ctx.read(ctx.memory.get_item, item_id))
    return {**item, "image_url": image_url(item_id)}


@router.get("/v1/items/{item_id}/image", responses=PNG, summary="the stored image of one item")
async def get_image(item_id: int = ItemId, ctx: ServeContext = Depends(need_read)):
    return image_response(await ctx.read(ctx.memory.get_image, item_id))


async def _add(ctx: ServeContext, data: dict, labels: List[int], keys: List[str], source: str,
               label_names: Optional[List[Optional[str]]]) -> List[dict]:
    if len(labels) != len(keys):
        raise ApiError(422, f"got {len(keys)} items but {len(labels)} labels")
    kwargs: Dict[str, Any] = dict(labels=labels, keys=keys, sources=[source] * len(keys))
    if label_names is not None:
        if len(label_names) != len(keys) or any(n is None for n in label_names):
            raise ApiError(422, f"give one label_name per item ({len(keys)}) or none")
        kwargs["label_names"] = label_names
    ids = await ctx.write(lambda: ctx.memory.add(**data, **kwargs))
    return [{"id": int(i), "key": k, "label": int(lab)} for i, k, lab in zip(np.asarray(ids).reshape(-1), keys,
                                                                                labels)]


@router.post("/v1/items", status_code=201, response_model=m.NewItem, summary="add one item (JSON embedding)")
async def add_item(body: m.AddItemRequest, ctx: ServeContext = Depends(need_write)):
    data = {"embeddings": vectors(ctx, [body.embedding])}
    names = None if body.label_name is None else [body.label_name]
    return (await _add(ctx, data, [body.label], [body.key or new_key()], body.source, names))[0]


@router.post("/v1/items/upload", status_code=201, response_model=m.NewItem, summary="add one uploaded image")
async def upload_item(image: UploadFile = File(), label: int = Form(ge=-m.INT64_MAX, le=m.INT64_MAX),
                      label_name: Optional[str] = Form(None), source: Optional[str] = Form(None),
                      key: Optional[str] = Form(None), ctx: ServeContext = Depends(need_write)):
    """Multipart: image, label (int), label_name?, source? (default `api`), key? (generated if absent)."""
    name = parse_label_name(label_name)
    data = {"images": [parse_image(await image.read())]}
    return (await _add(ctx, data, [label], [parse_token(key, "key") if key else new_key()],
                       parse_token(source or "api", "source"), None if name is None else [name]))[0]


@router.post("/v1/items/batch", status_code=201, response_model=m.NewItems, summary="add many items at once")
async def add_items(body: m.AddItemsRequest, ctx: ServeContext = Depends(need_write)):
    data = {"embeddings": vectors(ctx, body.embeddings)}
    keys = [parse_token(k, "key") for k in body.keys] if body.keys is not None else \
        [new_key() for _ in body.embeddings]
    names = [parse_label_name(n) for n in body.label_names] if body.label_names is not None else None
    if len(keys) != len(body.embeddings):
        raise ApiError(422, f"got {len(body.embeddings)} embeddings but {len(keys)} keys")
    return {"items": await _add(ctx, data, body.labels, keys, body.source, names)}


@router.delete("/v1/items/{item_id}", response_model=m.Deleted,
               summary="forget one item (invisible to the very next query)")
async def delete_item(item_id: int = ItemId, ctx: ServeContext = Depends(need_write)):
    return {"deleted": int(await ctx.write(lambda: ctx.memory.delete(ids=[item_id])))}


@router.post("/v1/delete", response_model=m.Deleted, summary="forget items by ids, label or source")
async def delete_many(body: m.DeleteRequest, ctx: ServeContext = Depends(need_write)):
    # What a delete may select (exactly one of ids, label, source) is decided by the memory layer
    # (`pipeline.memory.deletes`), the same rule for Python, the CLI and HTTP: a UserError answers 422.
    return {"deleted": int(await ctx.write(lambda: ctx.memory.delete(**body.model_dump())))}


def relabel(memory: Any, ids: List[int], label: int, label_name: Optional[str]) -> dict:
    """Relabel through the memory layer (an overlay row per item; NotFound -> 404 for deleted ids)."""
    return {"relabelled": int(memory.relabel(ids, label, label_name=label_name)), "label": label}


@router.post("/v1/items/{item_id}/relabel", response_model=m.Relabelled, summary="change one item's label")
async def relabel_item(body: m.RelabelOne, item_id: int = ItemId, ctx: ServeContext = Depends(need_write)):
    return await ctx.write(relabel, ctx.memory, [item_id], body.label, body.label_name)


@router.post("/v1/relabel", response_model=m.Relabelled, summary="change the label of many items")
async def relabel_many(body: m.RelabelRequest, ctx: ServeContext = Depends(need_write)):
    return await ctx.write(relabel, ctx.memory, body.ids, body.label, body.label_name)
