"""`VisualMemory`: the facade over one memory. Open/close, follow the committed state, turn inputs (images,
vectors) into unit vectors, send writes to the state tables, and start maintenance.

Reads go through an immutable `Snapshot` (`snapshot.py`): `snapshot()` returns the newest committed state
(following it costs a version poll; a new snapshot is built only when something changed) and every query
runs on that value without a lock. Writes are single commits to the Lance state tables (`state.py`), durable
before they return and visible to the next query of every process. Maintenance (compaction, erasure, table
upkeep) never runs inside an edit: `needs_compaction()` says when it is due, and the caller (the CLI after it
has answered, the server's background task, a scheduled job) runs `compact()`.
"""
from __future__ import annotations

import io
import logging
from typing import Iterable, List, Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.config import Config
from pipeline.data.ids import stable_id
from pipeline.embed.parts import check_vectors
from pipeline.errors import DataError, NotFound, UserError
from pipeline.index.neighbors import Neighbors
from pipeline.memory import compaction, deletes, history, interventions, pruning, votes
from pipeline.memory.base import blob_url
from pipeline.memory.erasure import workdir_of
from pipeline.memory.explain import render_sheet
from pipeline.memory.rerankers import create_reranker
from pipeline.memory.results import Prediction
from pipeline.memory.snapshot import Follower, Snapshot
from pipeline.memory.state import MemoryState, item_rows
from pipeline.memory.upkeep import TableUpkeep

log = logging.getLogger("vmem.memory")


class VisualMemory:
    def __init__(self, memory_dir: str, version: Optional[int] = None, cfg: Optional[Config] = None,
                 follow: Optional[bool] = None, use_ray: bool = False, router_factory=None,
                 upkeep: bool = True):
        self.memory_dir = memory_dir
        # The config schema is the only source of defaults: without a config, the schema's own values.
        self.cfg = cfg if cfg is not None else Config(workdir=workdir_of(memory_dir))
        self.pinned = version is not None
        self.follow = (not self.pinned) if follow is None else follow
        self.state = MemoryState(memory_dir)
        # The state tables' upkeep after this process's writes (off the writer's path); off for a server,
        # whose background thread runs `maintain()` (tables and compaction) after every write anyway.
        self._upkeep = TableUpkeep(self.state) if upkeep else None
        self._encoder = None
        name = self.cfg.memory.reranker
        self._follower = Follower(memory_dir, self.cfg, self.state, version, use_ray, router_factory,
                                  reranker=(lambda base: create_reranker(name, self.cfg, base.image_size))
                                  if name else None)

    @classmethod
    def open(cls, memory_dir: str, version: Optional[int] = None, cfg: Optional[Config] = None,
             use_ray: bool = False, router_factory=None, upkeep: bool = True) -> "VisualMemory":
        """Open the memory at `memory_dir` (its newest version unless `version` pins a manifest).

        `use_ray=True` searches shards in Ray actors (one per shard); the default searches in-process;
        `router_factory(manifest)` supplies another router (Serve deployments). `upkeep` (default on): the
        state tables are kept small after this process's writes by a background thread (`upkeep.py`).
        """
        return cls(memory_dir, version, cfg, use_ray=use_ray, router_factory=router_factory, upkeep=upkeep)

    # ----- following the committed state -----
    def snapshot(self) -> Snapshot:
        """The newest committed state (the pinned one without `follow`), as an immutable value."""
        return self._follower.refresh() if self.follow else self._follower.current

    def refresh(self) -> bool:
        """Follow the newest manifest and table versions; True if anything changed."""
        before = self._follower.current
        return self._follower.refresh() is not before

    @property
    def version(self) -> int:
        return self._follower.current.version

    @property
    def dim(self) -> int:
        return self._follower.current.dim

    # ----- inputs -----
    def encoder(self):
        """The encoder this memory was built with (created lazily; images need it, vectors do not)."""
        if self._encoder is None:
            from pipeline.embed.encoders import create_encoder  # lazy: torch costs seconds to import

            base = self._follower.current.base
            self._encoder = create_encoder(base.encoder, pretrained=self.cfg.embed.pretrained,
                                           image_size=base.image_size)
        return self._encoder

    def embed(self, images=None, embeddings=None) -> np.ndarray:
        """(n, dim) float32 L2-normalised vectors from PIL images / bytes / paths, or checked given embeddings.

        Vectors enter the memory only here, so every search and add sees unit vectors (cosine similarity)."""
        if (images is None) == (embeddings is None):
            raise UserError("give either images or embeddings (exactly one)")
        if embeddings is not None:
            return normalize(check_vectors(embeddings, self.dim))
        pil = [_to_pil(im) for im in images]
        if not pil:
            raise UserError("no images given")
        return normalize(check_vectors(self.encoder().encode(pil), self.dim, what="encoder output"))

    # ----- reads (each on one snapshot) -----
    def search(self, images=None, embeddings=None, k: Optional[int] = None,
               nprobe: Optional[int] = None) -> Neighbors:
        """The k nearest live items of each query (see `Snapshot.search`)."""
        xq = self.embed(images, embeddings)
        return self.snapshot().search(xq, int(self.cfg.memory.k if k is None else k), nprobe=nprobe)

    def classify(self, images=None, embeddings=None, k: Optional[int] = None, method: Optional[str] = None,
                 nprobe: Optional[int] = None, **params) -> List[Prediction]:
        """One `Prediction` per query: winning label, per-class totals and the neighbours that voted."""
        xq = self.embed(images, embeddings)
        return self.snapshot().classify(xq, images, k=k, method=method, nprobe=nprobe, **params)

    def vote(self, nb: Neighbors, method: Optional[str] = None, **params) -> votes.Votes:
        """The vote over neighbours this memory searched (see `Snapshot.vote`)."""
        return self.snapshot().vote(nb, method, **params)

    def explain(self, image=None, embedding=None, k: Optional[int] = None, method: Optional[str] = None,
                out: Optional[str] = None, **params) -> Prediction:
        """Classify one query and (with `out`) write a picture of it beside its neighbours and the votes."""
        images = None if image is None else [image]
        xq = self.embed(images, None if embedding is None else np.atleast_2d(np.asarray(embedding)))
        snap = self.snapshot()
        pred = snap.classify(xq, images, k=k, method=method, **params)[0]
        if out:
            render_sheet(snap.load_image, pred, None if image is None else _to_pil(image), out)
        return pred

    def stats(self) -> dict:
        return self.snapshot().stats()

    def get_item(self, id: int) -> dict:
        """Metadata of a live item (NotFound for unknown or deleted ids)."""
        return self.snapshot().item(id)

    def get_image(self, id: int) -> bytes:
        """The stored image bytes of a live item."""
        return self.snapshot().load_image(id)

    def versions(self) -> List[dict]:
        """The edit history, oldest first: version, at (unix s), op, detail, pid, host."""
        return self.state.edits()

    # ----- writes (one commit each; visible to the next query of every process) -----
    def add(self, images=None, embeddings=None, labels: Sequence[int] = (), keys: Sequence[str] = (),
            label_names: Optional[Sequence[str]] = None, sources: Optional[Sequence[str]] = None) -> List[int]:
        """Add items durably (one commit to the item table); returns their ids (stable_id(key)).

        A key that is live already, or was ever deleted (the forget list is final), is refused."""
        xb = self.embed(images, embeddings)
        n = xb.shape[0]
        if n == 0:
            raise UserError("add got no items (an empty batch of vectors or images)")
        labels, keys = [int(l) for l in labels], [str(k) for k in keys]
        if len(labels) != n or len(keys) != n:
            raise UserError(f"add got {n} item(s) but {len(labels)} label(s) and {len(keys)} key(s)")
        if any(l < 0 for l in labels):
            raise UserError(f"labels must be >= 0 (-1 marks a missing label), got {min(labels)}")
        snap = self.snapshot()
        names = list(label_names) if label_names is not None else [snap.label_name(l) for l in labels]
        srcs = list(sources) if sources is not None else ["api"] * n
        if len(names) != n or len(srcs) != n:
            raise UserError(f"add got {n} item(s) but {len(names)} label_names and {len(srcs)} sources")
        ids = [stable_id(k) for k in keys]
        if len(set(ids)) != n:
            raise UserError("add got the same key twice in one call; keys must be unique")
        metas = [{"label": l, "label_name": str(nm), "key": k, "source": str(s), "shard": ""}
                 for l, nm, k, s in zip(labels, names, keys, srcs)]
        # One commit: the rows and their history line. The state refuses keys that are live or were ever
        # deleted, decided at commit time (unique across processes), and then changes nothing.
        self.state.add_items(item_rows(ids, metas, xb), keys, detail=f"{n} item(s), labels {sorted(set(labels))[:10]}")
        if images is not None:  # after the add won: a racing add of the same key never overwrites the winner's
            for i, im in zip(ids, images):
                storage.atomic_write_bytes(blob_url(self.memory_dir, i), _png_bytes(im))
        return self._wrote(ids)

    def delete(self, ids: Optional[Iterable[int]] = None, label: Optional[int] = None,
               source: Optional[str] = None) -> int:
        """Delete the items that exactly one of `ids`, `label` or `source` selects (rules: `deletes.py`): one
        append to the forget list, durable before returning, invisible to the next query of every process,
        final. Returns how many live items were deleted; an id the memory never held raises NotFound."""
        snap = self.snapshot()
        targets = deletes.select(snap, ids, label, source)
        what = "by id" if ids is not None else (f"label={label}" if label is not None else f"source={source}")
        return self._wrote(deletes.forget(self.state, snap, targets, reason="delete", detail=what))

    def forget(self, ids: Sequence[int], reason: str = "delete", detail: str = "") -> int:
        """Put the live ones of `ids` on the forget list (one commit); returns how many."""
        return self._wrote(deletes.forget(self.state, self.snapshot(), ids, reason=reason, detail=detail))

    def relabel(self, ids: Sequence[int], label: int, label_name: Optional[str] = None) -> int:
        """Give live items a new label (an overlay: the vote counts the new label); returns how many."""
        ids = [int(i) for i in ids]
        self.intervene(relabel={i: int(label) for i in ids}, label_names={int(label): label_name} if label_name
                       else None)
        return len(ids)

    def intervene(self, **kwargs) -> int:
        """Commit vote multipliers / relabels (see `interventions.intervene`); returns the overlay version."""
        return self._wrote(interventions.intervene(self.state, self.snapshot(), **kwargs))

    def rollback(self, version: int) -> dict:
        """Undo the adds, relabels, interventions and prunes committed after edit `version`; deletes stay."""
        return self._wrote(history.rollback(self.state, self.snapshot(), version))

    # ----- maintenance (never run inside an edit) -----
    def needs_compaction(self) -> Optional[str]:
        """Why this memory should be compacted now (None if it need not be)."""
        return self.snapshot().needs_compaction()

    def maintain(self) -> dict:
        """The maintenance an edit may have made due, run beside requests (the server's background thread,
        the CLI after it has answered), never inside an edit: state-table upkeep (`MemoryState.maintain`,
        cheap when nothing is due), then a compaction when `needs_compaction()` says so and
        `memory.auto_compact` allows. Returns what was done: {"tables": ..., "compaction": report or None,
        "why": reason or None}."""
        out = {"tables": self.state.maintain(), "compaction": None, "why": None}
        if self.cfg.memory.auto_compact and not self.pinned:
            out["why"] = self.needs_compaction()
            if out["why"]:
                log.info("compacting: %s", out["why"])
                out["compaction"] = self.compact()
        return out

    def compact(self, force: bool = False, grace_s: Optional[float] = None) -> Optional[dict]:
        """Fold the delta and the forget list into new shards (manifest v+1) and erase deleted items; returns
        the compaction report (None when another process committed first or there was nothing to do)."""
        report = compaction.compact(self.state, self.snapshot(), force=force, grace_s=grace_s)
        self.refresh()
        return report

    def prune(self, **kwargs) -> dict:
        """Self-query the memory and apply hard and/or soft pruning (see `pruning.prune`)."""
        return pruning.prune(self.state, self.snapshot(), **kwargs)

    def _wrote(self, result):
        """After a write committed: count it for the state-table upkeep; returns `result`."""
        if self._upkeep is not None:
            self._upkeep.wrote()
        return result

    def close(self) -> None:
        if self._upkeep is not None:
            self._upkeep.close()
        self._follower.close()


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
