"""Rerankers: reorder (or reweight) a query's neighbours before the vote, chosen by name (`memory.reranker`).

A reranker is a name in a registry (like the encoders'): `@register_reranker("name")` on an entry function
`fn(cfg, image_size) -> Reranker`. A `Reranker` gets the query (its images when given, always its vectors
`xq`) and its searched candidates `nb` (`memory.rerank_k` of them: ids, distances, labels; images through
`load_image(id)`, the snapshot's stored-image reader) and returns `(order, weights)`: `order` (nq, n) is a
permutation of each row's columns, best first; `weights` (nq, n) or None are vote factors aligned with the
new order. `Snapshot.rerank` turns that into `Neighbors` again with `reorder` (the first k of the new order,
so the vote of every method uses it; each neighbour remembers its search rank, `Neighbor.rank_before`). A
reranker never calls back into the memory: it sees neighbours and images, nothing else.

Shipped: `encoder` re-embeds the query and the candidates' stored images with a second, stronger encoder
from the encoder registry (`memory.rerank_encoder`, default efficientnet_lite2; weights ship on PyPI) and
orders them by cosine similarity in that space (vectors are cached per item id).

A VLM reranker (the paper's Gemini re-ranking of the 50 nearest neighbours) plugs in the same way: register
an entry whose `rerank` sends the query image and the candidates' images with their labels to the model
and turns its answer into an order (candidates it picked first) or into weights (e.g. 1 for the candidates
whose label it agrees with, 0 else); `needs_images = True`.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from pipeline import storage
from pipeline.errors import UserError
from pipeline.embed.preprocess import decode_image
from pipeline.index.neighbors import Neighbors

log = logging.getLogger("vmem.memory")
Order = Tuple[np.ndarray, Optional[np.ndarray]]
_REGISTRY: Dict[str, Callable[..., "Reranker"]] = {}


class Reranker:
    """Base class: `rerank(images, xq, nb, load_image) -> (order, weights or None)`."""

    needs_images = False

    def rerank(self, images: Optional[List], xq: np.ndarray, nb: Neighbors,
               load_image: Callable[[int], bytes]) -> Order:
        raise NotImplementedError


def register_reranker(name: str) -> Callable:
    """Decorator: register an entry function `fn(cfg, image_size) -> Reranker` under `name`."""
    def wrap(fn):
        assert name not in _REGISTRY, f"reranker {name!r} registered twice"
        _REGISTRY[name] = fn
        return fn
    return wrap


def available_rerankers() -> List[str]:
    return sorted(_REGISTRY)


def create_reranker(name: str, cfg, image_size: Optional[int] = None) -> Reranker:
    """The reranker `name` for memories embedded at `image_size` px (UserError naming the choices if unknown)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown reranker {name!r} (memory.reranker): choose one of "
                        f"{', '.join(available_rerankers())} or leave it unset")
    return _REGISTRY[name](cfg, image_size)


def reorder(nb: Neighbors, order: np.ndarray, weights: Optional[np.ndarray], k: int) -> Neighbors:
    """`nb` rows permuted by `order`, the first k kept, each neighbour's previous rank in `rank_before`."""
    order = np.asarray(order, dtype=np.int64)
    assert order.shape == nb.I.shape, f"order {order.shape} must match the candidates {nb.I.shape}"
    assert (np.sort(order, axis=1) == np.arange(order.shape[1])).all(), "each order row must be a permutation"
    take = lambda a: None if a is None else np.take_along_axis(a, order, axis=1)  # noqa: E731
    before = np.broadcast_to(np.arange(order.shape[1]), order.shape) if nb.rank_before is None else nb.rank_before
    w = take(nb.weights)
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64) * (1.0 if w is None else w)
    out = nb.take(order).with_(weights=w, rank_before=take(np.asarray(before)))
    return out.first(k)


def to_pil(image):
    """A PIL RGB image from PIL / bytes / a path or URL."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image))
    return decode_image(storage.read_bytes(str(image)))  # a local path or an s3:// URL


class EncoderReranker(Reranker):
    """Orders candidates by cosine similarity under a second encoder (query and candidate images re-embedded)."""

    needs_images = True

    def __init__(self, encoder, cache_items: int = 200_000):
        self.encoder = encoder
        self.cache: Dict[int, np.ndarray] = {}
        self.cache_items = cache_items

    def vectors(self, ids: np.ndarray, load_image: Callable[[int], bytes]) -> np.ndarray:
        """(n, dim) embeddings of items `ids` under the second encoder (cached per id)."""
        missing = [int(i) for i in dict.fromkeys(ids.tolist()) if int(i) not in self.cache]
        if missing:
            x = self.encoder.encode([to_pil(load_image(i)) for i in missing])
            if len(self.cache) + len(missing) > self.cache_items:
                self.cache.clear()
            self.cache.update(zip(missing, x))
        return np.stack([self.cache[int(i)] for i in ids]) if len(ids) else np.zeros((0, self.encoder.dim))

    def rerank(self, images, xq, nb, load_image) -> Order:
        xr = self.encoder.encode([to_pil(im) for im in images])
        order = np.tile(np.arange(nb.I.shape[1]), (nb.I.shape[0], 1))
        for q in range(nb.I.shape[0]):
            valid = np.flatnonzero(nb.I[q] >= 0)
            sims = self.vectors(nb.I[q, valid], load_image) @ xr[q]
            order[q, :len(valid)] = valid[np.argsort(-sims, kind="stable")]  # missing ones stay last
        return order, None


@register_reranker("encoder")
def _encoder_reranker(cfg, image_size: Optional[int]) -> Reranker:
    from pipeline.embed.encoders import create_encoder  # lazy: torch costs seconds to import

    m = cfg.memory
    size = m.rerank_image_size or image_size
    enc = create_encoder(m.rerank_encoder, pretrained=cfg.embed.pretrained, image_size=size)
    log.info("reranker: %s at %s px re-embeds the query and its %d candidates", m.rerank_encoder, size, m.rerank_k)
    return EncoderReranker(enc)
