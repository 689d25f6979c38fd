"""Reads through an immutable snapshot of the committed state, and the follower that makes the next one.

A `Snapshot` is a value: one manifest version (its shards, searched through a router), a view of the delta,
the forget list, the overlays (interventions, relabels), the soft-pruning gamma and the memory config, all as
of one moment. Nothing in it changes, so any number of threads search it without a lock, and an answer
computed on it cannot be torn by an edit, a compaction or an erasure running elsewhere.

`Snapshot.search(xq, k) -> Neighbors` is the memory's search: shards + delta merged exactly, deleted ids
excluded inside faiss, relabels applied once. `Snapshot.predict(nb, method) -> [Prediction]` is **the one
place the vote is assembled**: intervention multipliers, a reranker's weights, gamma (soft methods), the
vote method, then the trust fields (confidence, calibrated probability, OOD, abstain).

`Follower` turns "whatever was committed last" into snapshots: when the memory's change token moved (or a
second passed), it polls the versions of the manifest and of the state tables (no lock: each thread uses its
own Lance handle) and builds a new snapshot only when one changed (under a lock that only the builders of
snapshots take).
"""
from __future__ import annotations

import logging
import tarfile
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import Config
from pipeline.data.shards import tar_key
from pipeline.errors import NotFound, UserError
from pipeline.index import changes
from pipeline.index.neighbors import Neighbors, merge
from pipeline.index.shard import ExcludeSet
from pipeline.memory import trust, votes
from pipeline.memory.base import BaseState, blob_url
from pipeline.memory.delta import DeltaFollower, DeltaView
from pipeline.memory.overlays import GammaOverlay, Interventions, load_gamma, load_interventions
from pipeline.memory.rerankers import Reranker, reorder
from pipeline.memory.results import Neighbor, Prediction
from pipeline.memory.state import FORGET, GAMMA, ITEMS, OVERLAYS, MemoryState

log = logging.getLogger("vmem.memory")

FULL_POLL_S = 1.0  # a follower polls every version at least this often, whatever the change token says


@dataclass(frozen=True)
class Snapshot:
    """The committed state of a memory as of one moment (see module docstring). Never changes."""
    memory_dir: str
    cfg: Config
    state: MemoryState  # for look-ups by id (item rows, images); what a snapshot *searches* is frozen
    base: BaseState
    delta: DeltaView
    forgotten: np.ndarray  # sorted ids deleted but still held by some shard (excluded inside faiss)
    forget_version: int
    interventions: Interventions
    gamma: Optional[GammaOverlay]
    reranker: Optional[Reranker] = None
    versions: Dict[str, int] = field(default_factory=dict)  # the state tables' versions it reflects

    @property
    def version(self) -> int:
        """The manifest version whose shards this snapshot searches."""
        return self.base.version

    @property
    def dim(self) -> int:
        return self.base.dim

    @cached_property
    def _exclude(self) -> Optional[ExcludeSet]:
        return ExcludeSet((self.version, self.forget_version), self.forgotten) if len(self.forgotten) else None

    @cached_property
    def _delta_dead(self):
        return self.delta.dead_rows(self.forgotten) if len(self.forgotten) and len(self.delta) else None

    # ----- search and vote -----
    def search(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None) -> Neighbors:
        """The k nearest live items of each unit vector in `xq` (shards and delta merged; deleted ids never
        returned). `labels` are the current ones (relabels applied), `stored_labels` what the shards hold."""
        if int(k) <= 0:
            raise UserError(f"k must be > 0, got {k}")
        nb = self.base.search(xq, int(k), nprobe=nprobe, exclude=self._exclude)
        nd = self.delta.search(xq, int(k), self._delta_dead)
        if nd is not None:
            nb = merge([nb, nd], int(k), dedupe=True)
        labels, names = self.interventions.relabel(nb.I, nb.labels, nb.label_names)
        return nb.with_(labels=np.where(nb.I < 0, -1, labels), label_names=names, stored_labels=nb.labels)

    def rerank(self, nb: Neighbors, xq: np.ndarray, images: Optional[List], k: int) -> Neighbors:
        """The configured reranker's order of `nb`, first k kept (`nb.first(k)` without a reranker)."""
        if self.reranker is None:
            return nb.first(k)
        if self.reranker.needs_images and images is None:
            raise UserError(f"reranker {type(self.reranker).__name__} needs the query images: classify images, "
                            f"not vectors, or set memory.reranker=null")
        order, weights = self.reranker.rerank(images, xq, nb, self.load_image)
        return reorder(nb, order, weights, k)

    def candidates(self, k: int) -> int:
        """How many neighbours to search so that a reranker has its `memory.rerank_k` candidates."""
        return max(int(k), self.cfg.memory.rerank_k) if self.reranker is not None else int(k)

    def classify(self, xq: np.ndarray, images: Optional[List] = None, k: Optional[int] = None,
                 method: Optional[str] = None, nprobe: Optional[int] = None, **params) -> List[Prediction]:
        """search -> rerank (when configured) -> predict, for unit vectors `xq` (and their images, if any)."""
        k = int(self.cfg.memory.k if k is None else k)
        if k <= 0:
            raise UserError(f"k must be > 0, got {k}")
        nb = self.search(xq, self.candidates(k), nprobe=nprobe)
        return self.predict(self.rerank(nb, xq, images, k), method, **params)

    def vote(self, nb: Neighbors, method: Optional[str] = None, **params) -> votes.Votes:
        """The vote of `method` over searched neighbours (interventions, reranker weights, gamma applied)."""
        return self._vote(nb, method or self.cfg.memory.method, params)[0]

    def _vote(self, nb: Neighbors, method: str, params: dict):
        m = votes.get_method(method)
        mult = self.interventions.multipliers(nb.I, nb.labels, nb.sources)
        if nb.weights is not None:
            mult = mult * nb.weights
        gamma = None
        if m.soft:
            if self.gamma is None:
                raise UserError(f"vote method {method!r} needs soft-pruning weights: run `vmem prune` first")
            gamma = self.gamma.lookup(nb.I)
        mc = self.cfg.memory
        p = {"xi": mc.xi, "tau": mc.tau, "alpha": mc.alpha, **{k: v for k, v in params.items() if v is not None}}
        return votes.vote(method, nb.distances, np.where(nb.I < 0, -1, nb.labels), gamma=gamma, multipliers=mult,
                          **p), mult, gamma

    def predict(self, nb: Neighbors, method: Optional[str] = None, **params) -> List[Prediction]:
        """One `Prediction` per row of `nb`: the winning label, per-class totals, the neighbours that voted
        (with their weights and factors) and the trust fields."""
        method = method or self.cfg.memory.method
        v, mult, gamma = self._vote(nb, method, params)
        gamma = np.ones(nb.I.shape) if gamma is None else gamma
        stored = nb.stored_labels if nb.stored_labels is not None else nb.labels
        dist = nb.distances
        out = []
        for q in range(nb.I.shape[0]):
            name_of: Dict[int, str] = {}
            neighbors = []
            for j in np.flatnonzero(nb.I[q] >= 0):
                lab, name = int(nb.labels[q, j]), str(nb.label_names[q, j])
                name_of.setdefault(lab, name)
                neighbors.append(Neighbor(
                    id=int(nb.I[q, j]), label=lab, label_name=name, distance=float(dist[q, j]),
                    weight=float(v.weights[q, j]), key=str(nb.keys[q, j]), source=str(nb.sources[q, j]),
                    multiplier=float(mult[q, j]), gamma=float(gamma[q, j]),
                    original_label=int(stored[q, j]) if lab != int(stored[q, j]) else None,
                    rank_before=None if nb.rank_before is None else int(nb.rank_before[q, j])))
            label = int(v.label[q])
            out.append(Prediction(label=label, label_name=name_of.get(label, ""), method=method,
                                  scores={name_of.get(c, str(c)): s for c, s in v.scores(q).items()},
                                  neighbors=neighbors))
        return trust.annotate(out, v, nb, self.memory_dir, self.version, self.cfg)

    # ----- items -----
    def live_rows(self, ids: Sequence[int], columns: Optional[List[str]] = None) -> pa.Table:
        """Item-table rows of the `ids` that are live (held and not deleted), one per id."""
        t = self.state.items([int(i) for i in ids], columns if columns is None or "id" in columns
                             else ["id", *columns])
        if not t.num_rows:
            return t
        ids_t = t.column("id").to_numpy()
        _, first = np.unique(ids_t, return_index=True)
        keep = np.zeros(len(ids_t), bool)
        keep[first] = True
        keep &= ~np.isin(ids_t, self.forgotten)
        return t.filter(pa.array(keep))

    def require_live(self, ids: Sequence[int]) -> None:
        """NotFound naming the ids that are not live items of this memory."""
        if not len(ids):
            return
        held = set(self.live_rows(ids, ["id"]).column("id").to_pylist())
        missing = [i for i in ids if int(i) not in held]
        if missing:
            raise NotFound(f"{len(missing)} id(s) are not live items of the memory, e.g. {missing[:5]}")

    def label_name(self, label: int) -> str:
        name = self.base.label_names.get(int(label))
        if name is None:
            t = self.state[ITEMS].read(["label_name"], f"label = {int(label)}")
            name = t.column("label_name")[0].as_py() if t.num_rows else str(label)
        return name

    def item(self, id: int) -> dict:
        """Metadata of a live item, with its overlays (NotFound for unknown or deleted ids)."""
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

    def load_image(self, id: int) -> bytes:
        """The stored image bytes of a live item: memory/blobs/<id>.png, or its member in the WebDataset tar."""
        item = self.item(id)
        blob = blob_url(self.memory_dir, id)
        if storage.exists(blob):
            return storage.read_bytes(blob)
        if not item.get("shard"):
            raise NotFound(f"item {id} has no stored image (added as an embedding only)")
        return read_tar_member(item["shard"], item["key"])

    def stats(self) -> dict:
        ds = self.state[ITEMS].dataset()
        rows = ds.count_rows() if ds is not None else 0
        pending = len(self.forgotten)
        held = self.state.items(self.forgotten.tolist(), ["id"]).num_rows if pending else 0
        return {"items": rows, "live_items": rows - held, "shards": self.base.num_shards, "tombstones": pending,
                "forgotten_pending_erasure": pending, "delta_items": len(self.delta),
                "manifest_version": self.version, "version": self.version, "state_versions": dict(self.versions),
                "dim": self.dim, "encoder": self.base.encoder, "index_key": self.base.index_key,
                "gamma_version": self.gamma.version if self.gamma else 0,
                "interventions_version": self.interventions.version}

    def needs_compaction(self) -> Optional[str]:
        """Why this memory should be compacted now (None if it need not be)."""
        m = self.cfg.memory
        if len(self.delta) >= m.delta_compact_items:
            return f"delta holds {len(self.delta)} items (>= {m.delta_compact_items})"
        if self.base.count and len(self.forgotten) / self.base.count >= m.compact_threshold:
            return (f"{len(self.forgotten)} deleted items wait for erasure (>= {m.compact_threshold:.0%} of the "
                    f"items in the shards)")
        return None


def read_tar_member(shard_url: str, key: str) -> bytes:
    """The image member of sample `key` in a WebDataset tar (png/jpg/jpeg/webp, whichever is there)."""
    fs, path = storage.filesystem(shard_url)
    names = {key, tar_key(key)}  # the writer stores members under tar_key(key) ('/' -> '__' etc.)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            base, _, ext = member.name.rpartition(".")
            if (base in names or base.rsplit("/", 1)[-1] in names) and \
                    ext.lower() in ("png", "jpg", "jpeg", "webp"):
                return tar.extractfile(member).read()
    raise NotFound(f"sample {key!r} has no image in {shard_url}")


class Follower:
    """Makes snapshots of one memory: the newest committed state (or a pinned manifest version)."""

    def __init__(self, memory_dir: str, cfg: Config, state: MemoryState, version: Optional[int] = None,
                 use_ray: bool = False, router_factory: Optional[Callable] = None,
                 reranker: Optional[Callable[[BaseState], Optional[Reranker]]] = None):
        self.memory_dir, self.cfg, self.state = memory_dir, cfg, state
        self.pinned = version is not None
        self._use_ray, self._router_factory, self._make_reranker = use_ray, router_factory, reranker
        self._lock = threading.Lock()  # taken only to build the next snapshot; readers never wait on it
        self._base: Optional[BaseState] = None
        self._delta: Optional[DeltaFollower] = None
        self._reranker: Optional[Reranker] = None
        # The change token read before the last full poll that found the snapshot current, and when.
        self._token: Optional[bytes] = None
        self._polled_at = float("-inf")
        self.current: Snapshot = self._build(version)

    def _versions(self) -> Dict[str, int]:
        return {name: self.state[name].version() for name in (ITEMS, FORGET, OVERLAYS, GAMMA)}

    def _build(self, version: Optional[int] = None, versions: Optional[Dict[str, int]] = None,
               old: Optional[Snapshot] = None) -> Snapshot:
        if self._base is None or (version is not None and version != self._base.version) or \
                (version is None and not self.pinned and self._base.store.current_version() != self._base.version):
            previous = self._base
            self._base = BaseState(self.memory_dir, version, self._use_ray, self._router_factory)
            self._delta = DeltaFollower(self.state, self._base.dim, self._base.lineage)
            if self._make_reranker is not None and self._reranker is None:
                self._reranker = self._make_reranker(self._base)
            old = None
            if previous is not None and self._use_ray:
                # Ray actors are stopped now; in-process searchers are freed with the last snapshot using them
                # (a reader may still be searching one: closing them under it would break its answer).
                previous.close()
            log.debug("memory %s: following manifest v%d", self.memory_dir, self._base.version)
        versions = versions or self._versions()
        same = lambda name: old is not None and old.versions.get(name) == versions[name]  # noqa: E731
        forget_version = versions[FORGET]
        snap = Snapshot(
            memory_dir=self.memory_dir, cfg=self.cfg, state=self.state, base=self._base,
            delta=self._delta.catch_up(),
            forgotten=old.forgotten if same(FORGET) else self.state.forgotten_ids(),
            forget_version=forget_version,
            interventions=old.interventions if same(OVERLAYS) else load_interventions(self.state),
            gamma=old.gamma if same(GAMMA) else load_gamma(self.state),
            reranker=self._reranker, versions=versions)
        return snap

    def refresh(self) -> Snapshot:
        """The snapshot of the newest committed state (the current one when nothing changed).

        While the memory's change token (`pipeline.index.changes`) is the one read before the last full poll,
        nothing was acknowledged since: the current snapshot is returned without polling. Otherwise, and at
        least every `FULL_POLL_S` (a writer killed between its commit and its token), the versions of the
        state tables and the manifest are polled."""
        snap = self.current
        token = changes.read(self.memory_dir)
        now = time.monotonic()
        if token is not None and token == self._token and now - self._polled_at < FULL_POLL_S:
            return snap
        versions = self._versions()
        manifest_moved = not self.pinned and self._base.store.current_version() != snap.version
        if versions == snap.versions and not manifest_moved:
            self._token, self._polled_at = token, now
            return snap
        with self._lock:
            if self.current is not snap:  # another thread built a newer one meanwhile; is it new enough?
                snap = self.current
                if versions == {n: min(v, snap.versions[n]) for n, v in versions.items()} and not (
                        not self.pinned and self._base.store.current_version() != snap.version):
                    return snap
            self.current = self._build(None if not self.pinned else snap.version, None, snap)
            self._token, self._polled_at = token, now
            return self.current

    def close(self) -> None:
        if self._base is not None:
            self._base.close()


def open_snapshot(cfg: Config, version: Optional[int] = None) -> Snapshot:
    """The committed state of `cfg`'s memory (its newest, or manifest `version`) for a job that only reads."""
    return Follower(cfg.memory_dir, cfg, MemoryState(cfg.memory_dir), version).current
