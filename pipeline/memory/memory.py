"""`VisualMemory`: classify, search, explain, add, delete, compact, prune and intervene on a built memory.

State of a memory at manifest version N = the committed shards of vN (searched through the index layer's
`Router`) + the delta log of vN (items added since, searched exactly in RAM) - the tombstone log of vN
(deleted ids, excluded inside faiss) + overlays (soft-pruning gamma, interventions). Every mutation is
durable before it returns and visible to the next query. Compaction folds delta and tombstones into the
shards of version N+1; an open memory follows `CURRENT` and switches on its next query.

Single-writer: mutations of one memory should come from one process at a time (readers may be many).
"""
from __future__ import annotations

import io
import logging
import threading
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.errors import DataError, NotFound, UserError
from pipeline.memory import rerankers, trust, votes
from pipeline.memory.base import blob_url, merge_neighbors, open_base
from pipeline.memory.delta import DeltaIndex
from pipeline.memory.overlays import GammaOverlay, Interventions, load_gamma, load_interventions
from pipeline.memory.results import Neighbor, Neighbors, Prediction
from pipeline.memory.tombstones import TombstoneSet

log = logging.getLogger("vmem.memory")


class VisualMemory:
    def __init__(self, memory_dir: str, version: Optional[int] = None, cfg=None, follow: Optional[bool] = None,
                 use_ray: bool = False):
        self.memory_dir = memory_dir
        self.use_ray = use_ray
        self.cfg = cfg
        self.pinned = version is not None
        self.follow = (not self.pinned) if follow is None else follow
        self._lock = threading.RLock()
        self._encoder = None
        self._compactor: Optional[threading.Thread] = None
        self._load(version)

    @classmethod
    def open(cls, memory_dir: str, version: Optional[int] = None, cfg=None, use_ray: bool = False) -> "VisualMemory":
        """Open the memory at `memory_dir` (its CURRENT version unless `version` pins an older one).

        `use_ray=True` searches shards in Ray actors (one per shard); the default searches in-process.
        """
        return cls(memory_dir, version, cfg, use_ray=use_ray)

    # ----- state -----
    def _load(self, version: Optional[int]) -> None:
        base = open_base(self.memory_dir, version, self.use_ray)
        delta = DeltaIndex(base.log_url("delta"), base.dim)
        tomb = TombstoneSet(base.log_url("tombstones"))
        with self._lock:
            old = getattr(self, "base", None)
            self.base, self.delta, self.tombstones = base, delta, tomb
            if old is not None:
                old.close()
            self.gamma: Optional[GammaOverlay] = load_gamma(self.memory_dir)
            self.interventions: Interventions = load_interventions(self.memory_dir)
        log.debug("opened memory %s version %d", self.memory_dir, base.version)

    @property
    def version(self) -> int:
        return self.base.version

    @property
    def dim(self) -> int:
        return self.base.dim

    def refresh(self) -> bool:
        """Follow CURRENT (a newer manifest after compaction) and tail the logs; True if anything changed."""
        with self._lock:
            changed = False
            if not self.pinned:
                current = self.base.store_current_version()
                if current != self.base.version:
                    self._load(None)
                    return True
            changed |= bool(self.tombstones.catch_up())
            changed |= bool(self.delta.catch_up())
            return changed

    def _maybe_follow(self) -> None:
        if self.follow:
            self.refresh()

    def _params(self, params: dict) -> dict:
        m = self.cfg.memory if self.cfg is not None else None
        out = {name: getattr(m, name, value) for name, value in votes.DEFAULT_PARAMS.items()}
        out.update({k: v for k, v in params.items() if v is not None})
        return out

    def _default(self, name: str, fallback):
        return getattr(self.cfg.memory, name) if self.cfg is not None else fallback

    # ----- inputs -----
    def encoder(self):
        """The encoder this memory was built with (created lazily; images need it, vectors do not)."""
        if self._encoder is None:
            from pipeline.embed.encoders import create_encoder

            pretrained = self.cfg.embed.pretrained if self.cfg is not None else True
            self._encoder = create_encoder(self.base.encoder, pretrained=pretrained,
                                           image_size=self.base.image_size)
        return self._encoder

    def embed(self, images=None, embeddings=None) -> np.ndarray:
        """(n, dim) float32 query vectors from PIL images / bytes / paths, or checked given embeddings."""
        from pipeline.embed.parts import check_vectors

        if (images is None) == (embeddings is None):
            raise UserError("give either images or embeddings (exactly one)")
        if embeddings is not None:
            return check_vectors(embeddings, self.dim)
        pil = [_to_pil(im) for im in images]
        if not pil:
            raise UserError("no images given")
        return check_vectors(self.encoder().encode(pil), self.dim, what="encoder output")

    # ----- search -----
    def search(self, images=None, embeddings=None, k: Optional[int] = None,
               nprobe: Optional[int] = None) -> Neighbors:
        """The k nearest live items of each query (shards and delta merged; deleted ids never returned)."""
        xq = self.embed(images, embeddings)
        k = int(k or self._default("k", 10))
        if k <= 0:
            raise UserError(f"k must be > 0, got {k}")
        self._maybe_follow()
        with self._lock:
            base, delta, tomb = self.base, self.delta, self.tombstones
            exclude, tag = tomb.ids, tomb.position
        rb = base.search(xq, k, nprobe=nprobe, exclude=exclude, exclude_tag=tag)
        if not len(delta):
            return rb
        Dd, Id = delta.search(xq, k, exclude=exclude)
        md = [delta.meta.get(int(i), {}) for i in Id.reshape(-1)]

        def col(name, fill, dtype):
            return np.array([m.get(name, fill) for m in md], dtype=dtype).reshape(Id.shape)

        rd = Neighbors(Dd, Id, col("label", -1, np.int64), col("label_name", "", object), col("key", "", object),
                       col("source", "", object))
        return merge_neighbors(rb, rd, k)

    def vote(self, nb: Neighbors, method: Optional[str] = None, **params) -> votes.Votes:
        """Apply interventions and (soft methods) gamma, then the vote method, to searched neighbours."""
        return self._vote(nb, method or self._default("method", "plurality"), params)[0]

    def _vote(self, nb: Neighbors, method: str, params: dict):
        """(votes, multipliers, labels, label_names, gamma or None) after interventions and soft pruning."""
        m = votes.get_method(method)
        mult, labels, names = self.interventions.apply(nb.I, nb.labels, nb.label_names, nb.sources)
        if nb.weights is not None:  # a reranker's vote factors
            mult = mult * nb.weights
        gamma = None
        if m.soft:
            if self.gamma is None:
                raise UserError(f"vote method {method!r} needs soft-pruning weights: run `vmem prune` first")
            gamma = self.gamma.lookup(nb.I)
        v = votes.vote(method, nb.distances, np.where(nb.I < 0, -1, labels), gamma=gamma, multipliers=mult,
                       **self._params(params))
        return v, mult, labels, names, gamma

    def classify(self, images=None, embeddings=None, k: Optional[int] = None, method: Optional[str] = None,
                 nprobe: Optional[int] = None, **params) -> List[Prediction]:
        """One `Prediction` per query: winning label, per-class totals and the neighbours that voted."""
        method = method or self._default("method", "plurality")
        nb = rerankers.rerank_search(self, images, embeddings, k=k, nprobe=nprobe)
        return self.predictions(nb, method, **params)

    def predictions(self, nb: Neighbors, method: str, **params) -> List[Prediction]:
        v, mult, labels, names, gamma = self._vote(nb, method, params)
        if gamma is None:
            gamma = np.ones(nb.I.shape)
        dist = nb.distances
        out = []
        for q in range(nb.I.shape[0]):
            name_of: Dict[int, str] = {}
            neighbors = []
            for j in range(nb.I.shape[1]):
                if nb.I[q, j] < 0:
                    continue
                lab = int(labels[q, j])
                name_of.setdefault(lab, str(names[q, j]))
                neighbors.append(Neighbor(
                    id=int(nb.I[q, j]), label=lab, label_name=str(names[q, j]), distance=float(dist[q, j]),
                    weight=float(v.weights[q, j]), key=str(nb.keys[q, j]), source=str(nb.sources[q, j]),
                    multiplier=float(mult[q, j]), gamma=float(gamma[q, j]),
                    original_label=int(nb.labels[q, j]) if lab != int(nb.labels[q, j]) else None))
            label = int(v.label[q])
            out.append(Prediction(label=label, label_name=name_of.get(label, ""), method=method,
                                  scores={name_of.get(c, str(c)): s for c, s in v.scores(q).items()},
                                  neighbors=neighbors))
        return trust.annotate(out, v, nb, self.memory_dir, self.version, self.cfg)

    def explain(self, image=None, embedding=None, k: Optional[int] = None, method: Optional[str] = None,
                out: Optional[str] = None, **params) -> Prediction:
        """Classify one query and (with `out`) write a picture of it beside its neighbours and the votes."""
        images = None if image is None else [image]
        pred = self.classify(images, None if embedding is None else np.asarray(embedding)[None] if np.ndim(
            embedding) == 1 else embedding, k=k, method=method, **params)[0]
        if out:
            from pipeline.memory.explain import render_sheet

            render_sheet(self, pred, None if image is None else _to_pil(image), out)
        return pred

    # ----- items -----
    def stats(self) -> dict:
        self._maybe_follow()
        with self._lock:
            items = self.base.count + len(self.delta)
            return {"items": items, "live_items": items - len(self.tombstones), "shards": self.base.num_shards,
                    "tombstones": len(self.tombstones), "delta_items": len(self.delta),
                    "manifest_version": self.version, "version": self.version, "dim": self.dim,
                    "encoder": self.base.encoder, "index_key": self.base.index_key,
                    "gamma_version": self.gamma.version if self.gamma else 0,
                    "interventions_version": self.interventions.version}

    def _exists(self, i: int) -> bool:
        return self.base.has_id(i) or i in self.delta.meta

    def get_item(self, id: int) -> dict:
        """Metadata of a live item (NotFound for unknown or deleted ids)."""
        self._maybe_follow()
        i = int(id)
        if i in self.tombstones or not self._exists(i):
            raise NotFound(f"no item with id {i} in memory {self.memory_dir} (version {self.version})")
        if i in self.delta.meta:
            row = dict(self.delta.meta[i])
        else:
            row = self.base.item(i)
        row = {"id": i, **row, "in_delta": i in self.delta.meta}
        it = self.interventions.items.get(i)
        if it:
            row["intervention"] = it
        if self.gamma is not None:
            row["gamma"] = float(self.gamma.lookup(np.array([i]))[0])
        return row

    def get_image(self, id: int) -> bytes:
        """The stored image bytes of an item: memory/blobs/<id>.png, or its member in the WebDataset tar."""
        item = self.get_item(id)
        blob = blob_url(self.memory_dir, id)
        if storage.exists(blob):
            return storage.read_bytes(blob)
        shard = item.get("shard")
        if not shard:
            raise NotFound(f"item {id} has no stored image (added as an embedding only)")
        return _read_tar_member(shard, item["key"])

    # ----- mutations (see add.py / delete in this class / compaction.py) -----
    def add(self, images=None, embeddings=None, labels: Sequence[int] = (), keys: Sequence[str] = (),
            label_names: Optional[Sequence[str]] = None, sources: Optional[Sequence[str]] = None) -> List[int]:
        """Add items durably into the delta; returns their ids (stable_id(key)). Visible to the next query."""
        from pipeline.data.ids import stable_id

        xb = self.embed(images, embeddings)
        n = xb.shape[0]
        labels, keys = list(labels), [str(k) for k in keys]
        if len(labels) != n or len(keys) != n:
            raise UserError(f"add got {n} items but {len(labels)} labels and {len(keys)} keys")
        names = list(label_names) if label_names is not None else [self.base.label_name(int(l)) for l in labels]
        srcs = list(sources) if sources is not None else ["api"] * n
        if len(names) != n or len(srcs) != n:
            raise UserError(f"add got {n} items but {len(names)} label_names and {len(srcs)} sources")
        ids = [stable_id(k) for k in keys]
        if len(set(ids)) != n:
            raise UserError("add got the same key twice in one call; keys must be unique")
        with self._lock:
            self._maybe_follow()
            for i, key in zip(ids, keys):
                if i in self.tombstones:
                    raise UserError(f"key {key!r} (id {i}) was deleted and is not yet erased: run `vmem compact` "
                                    f"before adding it again")
                if self._exists(i):
                    raise UserError(f"key {key!r} is already in the memory (id {i}); keys must be unique")
            if images is not None:
                for i, im in zip(ids, images):
                    storage.atomic_write_bytes(blob_url(self.memory_dir, i), _png_bytes(im))
            metas = [{"label": int(l), "label_name": str(nm), "key": k, "source": str(s), "shard": ""}
                     for l, nm, k, s in zip(labels, names, keys, srcs)]
            self.delta.add(xb, ids, metas)
        self._auto_compact()
        return ids

    def delete(self, ids: Optional[Iterable[int]] = None, label: Optional[int] = None,
               source: Optional[str] = None) -> int:
        """Delete items by id, by label or by source; durable before returning, invisible to the next query.

        Returns how many live items were deleted. An id the memory never held raises NotFound.
        """
        if ids is None and label is None and source is None:
            raise UserError("delete needs ids, a label or a source")
        with self._lock:
            self._maybe_follow()
            targets: List[int] = []
            if ids is not None:
                ids = [int(i) for i in ids]
                unknown = [i for i in ids if not self._exists(i)]
                if unknown:
                    raise NotFound(f"{len(unknown)} id(s) are not in the memory, e.g. {unknown[:5]}")
                targets += ids
            if label is not None or source is not None:
                targets += self.base.select(label=label, source=source).tolist()
                targets += [i for i, m in self.delta.meta.items()
                            if (label is None or m["label"] == int(label))
                            and (source is None or m["source"] == source)]
            n = self.tombstones.add(targets)
        self._auto_compact()
        return n

    # ----- maintenance -----
    def needs_compaction(self) -> Optional[str]:
        """Why this memory should be compacted now (None if it need not be)."""
        thr = self._default("compact_threshold", 0.2)
        big = self._default("delta_compact_items", 100000)
        if len(self.delta) >= big:
            return f"delta holds {len(self.delta)} items (>= {big})"
        ratios = self.base.deleted_ratios(self.tombstones.ids)
        worst = max(ratios) if ratios else 0.0
        if worst >= thr and worst > 0:
            return f"a shard has {worst:.0%} of its items deleted (>= {thr:.0%})"
        return None

    def _auto_compact(self) -> None:
        if self.cfg is None or self.pinned:
            return
        why = self.needs_compaction()
        if why and (self._compactor is None or not self._compactor.is_alive()):
            log.info("starting compaction in the background: %s", why)
            self._compactor = threading.Thread(target=self.compact, name="vmem-compact", daemon=True)
            self._compactor.start()

    def wait_compaction(self) -> None:
        if self._compactor is not None:
            self._compactor.join()

    def compact(self, force: bool = False) -> Optional[dict]:
        """Fold delta and tombstones into new shards (manifest v+1); returns the compaction report."""
        from pipeline.memory.compaction import compact

        return compact(self, force=force)

    def prune(self, **kwargs) -> dict:
        from pipeline.memory.pruning import prune

        return prune(self, **kwargs)

    def intervene(self, **kwargs) -> int:
        from pipeline.memory.interventions import intervene

        return intervene(self, **kwargs)

    def close(self) -> None:
        self.wait_compaction()
        self.base.close()


def _to_pil(im):
    from PIL import Image

    if isinstance(im, Image.Image):
        return im
    if isinstance(im, (bytes, bytearray)):
        return Image.open(io.BytesIO(im))
    try:
        return Image.open(io.BytesIO(storage.read_bytes(str(im))))
    except FileNotFoundError:
        raise NotFound(f"image not found: {im}") from None
    except Exception as e:
        raise DataError(f"cannot read image {im}: {e}") from e


def _png_bytes(im) -> bytes:
    buf = io.BytesIO()
    _to_pil(im).save(buf, format="PNG")
    return buf.getvalue()


def _read_tar_member(shard_url: str, key: str) -> bytes:
    """The image member of sample `key` in a WebDataset tar (png/jpg/jpeg/webp, whichever is there)."""
    import tarfile

    from pipeline.data.shards import tar_key

    fs, path = storage.filesystem(shard_url)
    names = {key, tar_key(key)}  # the writer stores members under tar_key(key) ('/' -> '__' etc.)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            base, _, ext = member.name.rpartition(".")
            if (base in names or base.rsplit("/", 1)[-1] in names) and \
                    ext.lower() in ("png", "jpg", "jpeg", "webp"):
                return tar.extractfile(member).read()
    raise NotFound(f"sample {key!r} has no image in {shard_url}")
