"""The manifest: the single source of truth of what a memory contains, and the store that commits it.

Layout under `memory_dir` (see docs/design.md):

  manifests/v000001.json        one immutable `Manifest` per version; creating it exclusively IS the commit
  CURRENT                       {"version": N}: a hint written after each commit (readers probe past it)
  CHANGED                       the change token, rewritten after every commit readers must see (changes.py)
  trained/<sha>.index           the trained, empty IVF index every shard was populated from
  shards/v000001/shard-000.index, shard-000.meta.parquet, shard-000.vectors.npy (re-rank vectors, optional)

All paths inside a manifest are RELATIVE to `memory_dir` (use `ManifestStore.url(rel)`), so a memory can be
copied or moved (local <-> s3://) whole, and a later version may point at shard files of an earlier one (what
compaction does for shards it leaves untouched).

`ManifestStore.commit` creates `manifests/vN.json` exclusively (of two writers of vN exactly one wins) and
then rewrites the `CURRENT` hint; a writer killed in between has committed (readers probe forward from the
hint), one killed before has changed nothing.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from pipeline import storage
from pipeline.errors import IntegrityError, NotFound, UserError
from pipeline.index import changes

CURRENT = "CURRENT"
MANIFESTS = "manifests"
_VERSION_FILE = re.compile(r"^v(\d{6,})\.json$")


def version_name(version: int) -> str:
    return f"v{int(version):06d}"


@dataclass
class ShardEntry:
    """One populated shard: index + metadata (+ re-rank vectors) files (relative paths), item count, sha256s.

    `vectors_path` is the shard's re-rank file (`pipeline.index.rerank`), None for shards written without one
    (exact codes, or versions written before re-ranking existed)."""
    shard: int
    path: str
    meta_path: str
    count: int
    sha256: str
    meta_sha256: str
    vectors_path: Optional[str] = None
    vectors_sha256: Optional[str] = None

    def files(self) -> List[tuple]:
        """(relative path, sha256) of every file of the shard."""
        out = [(self.path, self.sha256), (self.meta_path, self.meta_sha256)]
        if self.vectors_path:
            out.append((self.vectors_path, self.vectors_sha256))
        return out


@dataclass
class Manifest:
    version: int
    shards: List[ShardEntry]
    index_key: str
    dim: int
    metric: str
    trained_path: str
    trained_sha256: str
    nprobe: int
    parent: Optional[int] = None
    rerank_k: int = 0  # candidates per shard re-ranked with exact similarities; 0 = the codes' own order
    created_at: float = field(default_factory=time.time)
    encoder: Dict[str, Any] = field(default_factory=dict)  # name, image_size, preprocessing, dim (if known)
    recall: List[Dict[str, Any]] = field(default_factory=list)  # rows: nprobe, recall@10, recall@100, ms...
    build: Dict[str, Any] = field(default_factory=dict)  # how it was built: trainer, timings, source split
    extra: Dict[str, Any] = field(default_factory=dict)  # unknown keys of newer writers, kept on round-trip

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Manifest":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names and k != "extra"}
        known["shards"] = [ShardEntry(**s) for s in d.get("shards", [])]
        known["extra"] = {k: v for k, v in d.items() if k not in names}
        return cls(**known)

    def next_version(self, **changes) -> "Manifest":
        """A copy for the next version (parent = this one, fresh created_at); `changes` replace fields."""
        return dataclasses.replace(self, version=0, parent=self.version, created_at=time.time(), **changes)


class ManifestStore:
    """Versions of one memory: `commit`, `load`, `versions`, `current_version`, `url`."""

    def __init__(self, memory_dir: str):
        self.memory_dir = str(memory_dir).rstrip("/")

    def url(self, rel: str) -> str:
        """Absolute URL of a path stored (relative) in a manifest."""
        return storage.join(self.memory_dir, rel)

    def manifest_url(self, version: int) -> str:
        return storage.join(self.memory_dir, MANIFESTS, f"{version_name(version)}.json")

    def versions(self) -> List[int]:
        """Committed manifest versions (ascending), including ones newer than CURRENT from a killed commit."""
        out = []
        for name in storage.listdir(storage.join(self.memory_dir, MANIFESTS)):
            m = _VERSION_FILE.match(name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def next_version(self) -> int:
        return max(self.versions(), default=0) + 1

    def current_version(self) -> Optional[int]:
        """The newest committed version, or None for an empty memory directory.

        CURRENT is a hint written after each commit; the commit itself is the exclusive creation of the
        manifest file, so versions after the hint (a crash before the hint, or two committers' hints landing
        out of order) are found by probing forward."""
        url = storage.join(self.memory_dir, CURRENT)
        if not storage.exists(url):
            v = max(self.versions(), default=0)
            return v or None
        try:
            v = int(storage.read_json(url)["version"])
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{url} is corrupt ({e}); expected {{\"version\": N}}") from e
        while storage.exists(self.manifest_url(v + 1)):
            v += 1
        return v

    def load(self, version: Optional[int] = None) -> Manifest:
        """The manifest of `version` (default: the one CURRENT points at)."""
        if version is None:
            version = self.current_version()
            if version is None:
                raise NotFound(f"no memory at {self.memory_dir} (no {CURRENT} file): run `vmem build` first")
        url = self.manifest_url(version)
        if not storage.exists(url):
            raise NotFound(f"memory version {version} does not exist at {url}; versions: {self.versions()}")
        try:
            return Manifest.from_dict(storage.read_json(url))
        except (json.JSONDecodeError, TypeError) as e:
            raise IntegrityError(f"manifest {url} is corrupt: {e}") from e

    def commit(self, manifest: Manifest, renumber: bool = False) -> int:
        """Commit the manifest as version `manifest.version` (0: the next free one); returns the version.

        The manifest file is created exclusively (a compare-and-swap on its name, local or S3), so of two
        writers committing the same version exactly one wins; the other gets `CommitConflict` — or, with
        `renumber`, takes the next free number (a build, whose files do not depend on its parent)."""
        if not manifest.version:
            manifest.version = self.next_version()
            renumber = True
        while True:
            try:
                storage.create_exclusive(self.manifest_url(manifest.version),
                                         json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode())
                break
            except storage.AlreadyExists:
                if not renumber:
                    raise CommitConflict(f"memory version {manifest.version} was committed by another writer "
                                         f"first (manifests are immutable)") from None
                manifest.version = self.next_version()
        storage.atomic_write_json(storage.join(self.memory_dir, CURRENT), {"version": manifest.version})
        changes.bump(self.memory_dir)
        return manifest.version


class CommitConflict(UserError):
    """Another writer committed the version this one meant to commit (retry from the new version)."""
