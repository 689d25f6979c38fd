"""`VisualMemory`: classify, search, explain, add, delete, relabel, compact, prune and intervene on a memory.

State (see `state.py`): the faiss shards of the current manifest (searched through the index layer's
`Router`) + the delta (item-table rows the shards do not hold yet, searched exactly in RAM) - the forget list
(deleted ids, excluded inside faiss) + overlays (interventions, relabels, soft-pruning gamma). All of it lives
in versioned Lance tables and immutable manifests that any number of processes read and write at once: every
mutation is one commit, durable before it returns, and every query first checks the tables' latest versions
(a cheap listing), so an edit made by any process is visible to the next query of every process.
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
from pipeline.memory.base import BaseState, blob_url, merge_neighbors
from pipeline.memory.delta import DeltaIndex
from pipeline.memory.overlays import GammaOverlay, Interventions, load_gamma, load_interventions
from pipeline.memory.results import Neighbor, Neighbors, Prediction
from pipeline.memory.state import FORGET, GAMMA, ITEMS, OVERLAYS, MemoryState, item_rows

log = logging.getLogger("vmem.memory")


class VisualMemory:
    def __init__(self, memory_dir: str, version: Optional[int] = None, cfg=None, follow: Optional[bool] = None,
                 use_ray: bool = False, router_factory=None):
        self.memory_dir = memory_dir
        self.use_ray = use_ray
        self.cfg = cfg
        self.pinned = version is not None
        self.follow = (not self.pinned) if follow is None else follow
        self.state = MemoryState(memory_dir)
        self._router_factory = router_factory
        self._lock = threading.RLock()  # guards this object's caches only; correctness across processes is Lance's
        self._encoder = None
        self._seen = {ITEMS: -1, FORGET: -1, OVERLAYS: -1, GAMMA: -1}
        self.base: Optional[BaseState] = None
        self._load(version)

    @classmethod
    def open(cls, memory_dir: str, version: Optional[int] = None, cfg=None, use_ray: bool = False,
             router_factory=None) -> "VisualMemory":
        """Open the memory at `memory_dir` (its newest version unless `version` pins a manifest).

        `use_ray=True` searches shards in Ray actors (one per shard); the default searches in-process;
        `router_factory(manifest)` supplies another router (Serve deployments).
        """
        return cls(memory_dir, version, cfg, use_ray=use_ray, router_factory=router_factory)

    # ----- following the committed state -----
    def _load(self, version: Optional[int]) -> None:
        base = BaseState(self.memory_dir, version, self.use_ray, self._router_factory)
        with self._lock:
            old = self.base
            self.base = base
            self.delta = DeltaIndex(self.state, base.dim, base.lineage)
            self._seen[ITEMS] = self.delta.table_version
            self._sync_tables(force=True)
            if old is not None:
                old.close()
        log.debug("opened memory %s version %d", self.memory_dir, base.version)

    def _sync_tables(self, force: bool = False) -> bool:
        changed = False
        v = self.state[FORGET].version()
        if force or v != self._seen[FORGET]:
            self.forgotten = self.state.forgotten_ids()
            self._seen[FORGET], changed = v, True
        v = self.state[OVERLAYS].version()
        if force or v != self._seen[OVERLAYS]:
            self.interventions: Interventions = load_interventions(self.state)
            self._seen[OVERLAYS], changed = v, True
        v = self.state[GAMMA].version()
        if force or v != self._seen[GAMMA]:
            self.gamma: Optional[GammaOverlay] = load_gamma(self.state)
            self._seen[GAMMA], changed = v, True
        if self.delta.catch_up():
            changed = True
        return changed

    @property
    def version(self) -> int:
        return self.base.version

    @property
    def dim(self) -> int:
        return self.base.dim

    def refresh(self) -> bool:
        """Follow the newest manifest and table versions; True if anything changed."""
        with self._lock:
            if not self.pinned:
                current = self.base.store.current_version()
                if current != self.base.version:
                    self._load(None)
                    return True
            return self._sync_tables()

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
        """(n, dim) float32 L2-normalised vectors from PIL images / bytes / paths, or checked given embeddings.

        Vectors enter the memory only here, so every search and add sees unit vectors (cosine similarity)."""
        from pipeline.embed.parts import check_vectors

        if (images is None) == (embeddings is None):
            raise UserError("give either images or embeddings (exactly one)")
        if embeddings is not None:
            return normalize(check_vectors(embeddings, self.dim))
        pil = [_to_pil(im) for im in images]
        if not pil:
            raise UserError("no images given")
        return normalize(check_vectors(self.encoder().encode(pil), self.dim, what="encoder output"))

    # ----- search -----
    def search(self, images=None, embeddings=None, k: Optional[int] = None,
               nprobe: Optional[int] = None) -> Neighbors:
        """The k nearest live items of each query (shards and delta merged; deleted ids never returned).
        Labels are the current ones (relabels applied); `stored_labels` keeps what the shards hold."""
        xq = self.embed(images, embeddings)
        k = int(k or self._default("k", 10))
        if k <= 0:
            raise UserError(f"k must be > 0, got {k}")
        self._maybe_follow()
        with self._lock:
            base, delta, exclude, iv = self.base, self.delta, self.forgotten, self.interventions
            tag = self._seen[FORGET]
        nb = base.search(xq, k, nprobe=nprobe, exclude=exclude, exclude_tag=tag)
        if len(delta):
            with self._lock:  # a concurrent refresh may be adding to this delta index
                Dd, Id = delta.search(xq, k, exclude=exclude)
                md = delta.rows(Id.reshape(-1))

            def col(name, fill, dtype):
                return np.array([m.get(name, fill) for m in md], dtype=dtype).reshape(Id.shape)

            rd = Neighbors(Dd, Id, col("label", -1, np.int64), col("label_name", "", object),
                           col("key", "", object), col("source", "", object))
            nb = merge_neighbors(nb, rd, k)
        labels, names = iv.relabel(nb.I, nb.labels, nb.label_names)
        return Neighbors(nb.D, nb.I, np.where(nb.I < 0, -1, labels), names, nb.keys, nb.sources,
                         stored_labels=nb.labels)

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
        stored = nb.stored_labels if nb.stored_labels is not None else nb.labels
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
                    original_label=int(stored[q, j]) if lab != int(stored[q, j]) else None))
            label = int(v.label[q])
            out.append(Prediction(label=label, label_name=name_of.get(label, ""), method=method,
                                  scores={name_of.get(c, str(c)): s for c, s in v.scores(q).items()},
                                  neighbors=neighbors))
        return trust.annotate(out, v, nb, self.memory_dir, self.version, self.cfg)

    def explain(self, image=None, embedding=None, k: Optional[int] = None, method: Optional[str] = None,
                out: Optional[str] = None, **params) -> Prediction:
        """Classify one query and (with `out`) write a picture of it beside its neighbours and the votes."""
        images = None if image is None else [image]
        emb = None if embedding is None else np.atleast_2d(np.asarray(embedding))
        pred = self.classify(images, emb, k=k, method=method, **params)[0]
        if out:
            from pipeline.memory.explain import render_sheet

            render_sheet(self, pred, None if image is None else _to_pil(image), out)
        return pred

    # ----- items -----
    def stats(self) -> dict:
        self._maybe_follow()
        with self._lock:
            ds = self.state[ITEMS].dataset()
            rows = ds.count_rows() if ds is not None else 0
            pending = len(self.forgotten)
            return {"items": rows, "live_items": rows - self._held_count(self.forgotten),
                    "shards": self.base.num_shards, "tombstones": pending, "forgotten_pending_erasure": pending,
                    "delta_items": len(self.delta), "manifest_version": self.version, "version": self.version,
                    "state_versions": dict(self._seen), "dim": self.dim, "encoder": self.base.encoder,
                    "index_key": self.base.index_key,
                    "gamma_version": self.gamma.version if self.gamma else 0,
                    "interventions_version": self.interventions.version}

    def _held_count(self, ids: np.ndarray) -> int:
        """How many of `ids` still have a row in the item table (deleted but not yet erased)."""
        if not len(ids):
            return 0
        return self.state.items(ids.tolist(), ["id"]).num_rows

    def live_rows(self, ids: Sequence[int]):
        """Item-table rows of the `ids` that are live (held and not forgotten), one per id."""
        t = self.state.items([int(i) for i in ids])
        if not t.num_rows:
            return t
        ids_t = t.column("id").to_numpy()
        keep = ~np.isin(ids_t, self.forgotten)
        _, first = np.unique(ids_t, return_index=True)
        mask = np.zeros(len(ids_t), bool)
        mask[first] = True
        return t.filter(keep & mask)

    def require_live(self, ids: Sequence[int]) -> None:
        """NotFound naming the ids that are not live items of this memory."""
        if not len(ids):
            return
        self._maybe_follow()
        held = set(self.live_rows(ids).column("id").to_pylist())
        missing = [i for i in ids if int(i) not in held]
        if missing:
            raise NotFound(f"{len(missing)} id(s) are not live items of the memory, e.g. {missing[:5]}")

    def label_name(self, label: int) -> str:
        name = self.base.label_names.get(int(label))
        if name is None:
            t = self.state[ITEMS].read(["label_name"], f"label = {int(label)}")
            name = t.column("label_name")[0].as_py() if t.num_rows else str(label)
        return name

    def get_item(self, id: int) -> dict:
        """Metadata of a live item (NotFound for unknown or deleted ids)."""
        self._maybe_follow()
        i = int(id)
        t = self.live_rows([i])
        if not t.num_rows:
            raise NotFound(f"no item with id {i} in memory {self.memory_dir}")
        row = t.to_pylist()[0]
        row["in_delta"] = row["indexed"] not in self.base.lineage
        row["shard_no"] = int(i % max(self.base.num_shards, 1))
        it = self.interventions.items.get(i)
        if it:
            row["intervention"] = it
            if "label" in it:
                row["original_label"], row["label"] = row["label"], int(it["label"])
                row["label_name"] = it.get("label_name") or row["label_name"]
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

    # ----- mutations -----
    def add(self, images=None, embeddings=None, labels: Sequence[int] = (), keys: Sequence[str] = (),
            label_names: Optional[Sequence[str]] = None, sources: Optional[Sequence[str]] = None) -> List[int]:
        """Add items durably (one commit to the item table); returns their ids (stable_id(key)).

        Visible to the next query of every process. A key that is live already, or was ever deleted (the
        forget list is final), is refused."""
        from pipeline.data.ids import stable_id

        xb = self.embed(images, embeddings)
        n = xb.shape[0]
        labels, keys = [int(l) for l in labels], [str(k) for k in keys]
        if len(labels) != n or len(keys) != n:
            raise UserError(f"add got {n} items but {len(labels)} labels and {len(keys)} keys")
        names = list(label_names) if label_names is not None else [self.label_name(l) for l in labels]
        srcs = list(sources) if sources is not None else ["api"] * n
        if len(names) != n or len(srcs) != n:
            raise UserError(f"add got {n} items but {len(names)} label_names and {len(srcs)} sources")
        ids = [stable_id(k) for k in keys]
        if len(set(ids)) != n:
            raise UserError("add got the same key twice in one call; keys must be unique")
        gone = self.state.is_forgotten(ids)
        if gone.any():
            j = int(np.flatnonzero(gone)[0])
            raise UserError(f"key {keys[j]!r} (id {ids[j]}) was deleted, and deletion is final: add it under a "
                            f"new key")
        held = self.state.items(ids, ["id"]).column("id").to_pylist()
        if held:
            raise UserError(f"key(s) already in the memory, e.g. id {held[0]}; keys must be unique")
        if images is not None:
            for i, im in zip(ids, images):
                storage.atomic_write_bytes(blob_url(self.memory_dir, i), _png_bytes(im))
        metas = [{"label": l, "label_name": str(nm), "key": k, "source": str(s), "shard": ""}
                 for l, nm, k, s in zip(labels, names, keys, srcs)]
        self.state.add_items(item_rows(ids, metas, xb))
        self.state.record("add", f"{n} item(s), labels {sorted(set(labels))[:10]}")
        self.refresh()
        self._auto_compact()
        return ids

    def delete(self, ids: Optional[Iterable[int]] = None, label: Optional[int] = None,
               source: Optional[str] = None) -> int:
        """Delete items by id, by (current) label or by source: one append to the forget list, durable before
        returning, invisible to the next query of every process, final (a rebuild leaves them out).

        Returns how many live items were deleted. An id the memory never held raises NotFound."""
        if ids is None and label is None and source is None:
            raise UserError("delete needs ids, a label or a source")
        self._maybe_follow()
        targets: List[int] = []
        if ids is not None:
            ids = [int(i) for i in ids]
            held = set(self.state.items(ids, ["id"]).column("id").to_pylist())
            unknown = [i for i in ids if i not in held]
            if unknown:
                raise NotFound(f"{len(unknown)} id(s) are not in the memory, e.g. {unknown[:5]}")
            targets += ids
        if label is not None or source is not None:
            targets += self._select(label, source)
        # The edit history names no item: it must hold nothing erasure would have to find.
        what = "by id" if ids is not None else f"label={label} source={source}"
        return self.forget(targets, reason="delete", detail=what)

    def forget(self, ids: Sequence[int], reason: str = "delete", detail: str = "") -> int:
        """Put the live ones of `ids` on the forget list (one commit); returns how many."""
        rows = self.live_rows(sorted({int(i) for i in ids}))
        if rows.num_rows:
            self.state.forget(rows.select(["id", "key", "shard"]), reason=reason)
            self.state.record(reason, f"{rows.num_rows} item(s) {detail}".strip())
        self.refresh()
        self._auto_compact()
        return rows.num_rows

    def _select(self, label: Optional[int], source: Optional[str]) -> List[int]:
        """Live ids whose current label (relabels applied) is `label` and/or whose source is `source`."""
        relabeled = {i: it["label"] for i, it in self.interventions.items.items() if "label" in it}
        cand = set(self.state.select(label=label, source=source).tolist())
        if label is not None:
            cand = {i for i in cand if relabeled.get(i, label) == int(label)}
            moved_in = [i for i, lab in relabeled.items() if lab == int(label)]
            if source is not None and moved_in:
                moved_in = self.state.select(source=source)[np.isin(self.state.select(source=source), moved_in)]
            cand |= {int(i) for i in moved_in}
        return sorted(cand)

    def relabel(self, ids: Sequence[int], label: int, label_name: Optional[str] = None) -> int:
        """Give live items a new label (an overlay: the vote counts the new label); returns how many."""
        from pipeline.memory.interventions import intervene

        ids = [int(i) for i in ids]
        intervene(self, relabel={i: int(label) for i in ids},
                  label_names={int(label): label_name} if label_name else None)
        return len(ids)

    # ----- maintenance -----
    def needs_compaction(self) -> Optional[str]:
        """Why this memory should be compacted now (None if it need not be)."""
        thr = self._default("compact_threshold", 0.2)
        big = self._default("delta_compact_items", 100000)
        if len(self.delta) >= big:
            return f"delta holds {len(self.delta)} items (>= {big})"
        if self.base.count and len(self.forgotten) / self.base.count >= thr:
            return f"{len(self.forgotten)} deleted items wait for erasure (>= {thr:.0%} of the shards)"
        return None

    def _auto_compact(self) -> None:
        if self.cfg is None or self.pinned or not self._default("auto_compact", True):
            return
        why = self.needs_compaction()
        if why:
            log.info("compacting: %s", why)
            self.compact()

    def compact(self, force: bool = False, grace_s: Optional[float] = None) -> Optional[dict]:
        """Fold the delta and the forget list into new shards (manifest v+1) and erase deleted items; returns
        the compaction report (None when another process committed first or there was nothing to do)."""
        from pipeline.memory.compaction import compact

        return compact(self, force=force, grace_s=grace_s)

    def prune(self, **kwargs) -> dict:
        from pipeline.memory.pruning import prune

        return prune(self, **kwargs)

    def intervene(self, **kwargs) -> int:
        from pipeline.memory.interventions import intervene

        return intervene(self, **kwargs)

    def versions(self) -> List[dict]:
        """The edit history, oldest first: version, at (unix s), op, detail, pid, host."""
        return self.state.edits()

    def rollback(self, version: int) -> dict:
        """Undo the adds, relabels, interventions and prunes committed after edit `version`; deletes stay."""
        from pipeline.memory.history import rollback

        return rollback(self, version)

    def close(self) -> None:
        self.base.close()


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows are refused: they have no direction to compare)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UserError(f"{int((norms == 0).sum())} vector(s) are all zeros; they cannot be compared by cosine")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


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
