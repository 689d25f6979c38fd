"""Look for any trace of erased items in every file under a workdir, independently of the product's own report.

Each file is read as what it is AND as raw bytes:
- Parquet: every integer column (an id) and every string column (a key or an id written as text);
- tar (WebDataset): member names (tar_key of a key) and, inside json/txt members, the key or id;
- JSON / JSONL: any integer equal to an id, any string (also an object key) equal to a key or a decimal id;
- faiss indexes (any file faiss can read): inverted-list ids of IVF indexes, `id_map` of IDMap/IDMap2;
- Lance datasets (a folder with `_versions/`): every version still on disk, every integer/string column;
- every file: its path (blobs are named by id), its bytes for the id's 8-byte little-endian form and its
  decimal string (catches uncompressed formats nobody thought of: Lance data files, logs, caches).

By design (issue 9, the lead's decision) the memory's forget list keeps a *salted hash* of each erased id, never
the id itself, so a rebuild can refuse the id; a salted hash matches none of the forms above, so the scan needs
no exception for it, and an unsalted id in the forget list is reported like any other trace.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Set

import numpy as np


@dataclass
class Hit:
    path: str
    how: str
    id: int

    def __str__(self) -> str:
        return f"{self.path}: {self.how} (id {self.id})"


@dataclass
class Scan:
    files: List[str] = field(default_factory=list)
    hits: List[Hit] = field(default_factory=list)

    def summary(self, root: str = "") -> str:
        """One line per file with traces: how many erased ids, and how they were found."""
        by_file: Dict[str, tuple] = {}
        for h in self.hits:
            ids, hows = by_file.setdefault(h.path.replace(root.rstrip("/") + "/", "", 1), (set(), set()))
            ids.add(h.id)
            hows.add(re.sub(r"tar member \S+", "tar member", h.how.split(" (")[0]))
        return "\n".join(f"{p}: {len(ids)} id(s) via {', '.join(sorted(hows))}"
                         for p, (ids, hows) in sorted(by_file.items()))


class Needles:
    """The erased items: ids, their keys, and the forms they take in files."""

    def __init__(self, keys_by_id: Dict[int, str]):
        from pipeline.data.shards import tar_key

        self.ids: Set[int] = {int(i) for i in keys_by_id}
        self.by_text: Dict[str, int] = {}
        for i, k in keys_by_id.items():
            self.by_text[str(int(i))] = int(i)
            self.by_text[k] = int(i)
        self.by_tar_key = {tar_key(k): int(i) for i, k in keys_by_id.items()}
        self.raw = {int(i).to_bytes(8, "little", signed=True): int(i) for i in self.ids}
        self.raw.update({str(int(i)).encode(): int(i) for i in self.ids})

    def in_ints(self, values: Iterable[int]) -> Set[int]:
        return self.ids & {int(v) for v in values}

    def in_texts(self, values: Iterable) -> Set[int]:
        return {self.by_text[v] for v in values if isinstance(v, str) and v in self.by_text}


def list_files(root: str) -> List[str]:
    """Every file under `root` (a local path or s3://...), as URLs/paths in `root`'s form."""
    from pipeline import storage

    fs, path = storage.filesystem(root)
    found = fs.find(path)
    return [f"s3://{p}" if storage.is_remote(root) else p for p in sorted(found)]


def scan_tree(root: str, needles: Needles, extra_files: Iterable[str] = (), skip: Iterable[str] = ()) -> Scan:
    """Scan every file under `root` (plus `extra_files`, e.g. a local cache; but `skip`, e.g. a file broken on
    purpose) and every Lance dataset in it."""
    from pipeline import storage

    out = Scan()
    files = [f for f in list_files(root) + list(extra_files) if f not in set(skip)]
    for url in files:
        out.files.append(url)
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:  # removed while we listed (should not happen after compaction)
            continue
        for how, i in scan_bytes(url, data, needles):
            out.hits.append(Hit(url, how, i))
    for ds in sorted({u.split("/_versions/")[0] for u in files if "/_versions/" in u}):
        for how, i in scan_lance(ds, needles):
            out.hits.append(Hit(ds, how, i))
    return out


def scan_bytes(name: str, data: bytes, needles: Needles):
    """(how, id) for every trace of a needle in one file's name and bytes."""
    for text, i in needles.by_text.items():
        if text.isdigit() and text in name:
            yield "file name", i
    for raw, i in needles.raw.items():
        if raw in data:
            yield f"raw bytes ({'decimal' if raw.isdigit() else 'int64 LE'})", i
    lower = name.lower()
    if lower.endswith(".parquet") or data[:4] == b"PAR1":
        yield from scan_parquet(data, needles)
    elif lower.endswith(".tar") or _is_tar(data):
        yield from scan_tar(data, needles)
    elif lower.endswith((".json", ".jsonl")):
        yield from scan_json(data, needles)
    if not lower.endswith((".parquet", ".tar", ".json", ".jsonl", ".png", ".jpg", ".lance", ".txn", ".manifest")):
        yield from scan_faiss(data, needles)


def scan_parquet(data: bytes, needles: Needles):
    import pyarrow.parquet as pq

    yield from _scan_table(pq.read_table(io.BytesIO(data)), needles, "parquet")


def _scan_table(table, needles: Needles, what: str):
    import pyarrow as pa

    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_integer(col.type):
            for i in needles.in_ints(col.drop_null().to_numpy()):
                yield f"{what} column {name!r}", i
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            for i in needles.in_texts(col.drop_null().to_pylist()):
                yield f"{what} column {name!r}", i


def _is_tar(data: bytes) -> bool:
    return len(data) > 262 and data[257:262] == b"ustar"


def scan_tar(data: bytes, needles: Needles):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar:
            base = m.name.rsplit("/", 1)[-1].split(".", 1)[0]
            if base in needles.by_tar_key:
                yield f"tar member {m.name}", needles.by_tar_key[base]
            if m.isfile() and m.name.endswith((".json", ".txt", ".cls", ".id")):
                body = tar.extractfile(m).read()
                for how, i in scan_json(body, needles):
                    yield f"tar member {m.name} {how}", i


def scan_json(data: bytes, needles: Needles):
    text = data.decode("utf-8", errors="replace")
    docs = []
    try:
        docs = [json.loads(text)]
    except ValueError:
        for line in text.splitlines():
            try:
                docs.append(json.loads(line))
            except ValueError:
                docs.append(line.strip())
    for doc in docs:
        for i in sorted(_json_needles(doc, needles)):
            yield "json value", i


def _json_needles(doc, needles: Needles) -> Set[int]:
    out: Set[int] = set()
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            out |= needles.in_texts(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int):
            out |= needles.in_ints([v])
        elif isinstance(v, str):
            out |= needles.in_texts([v])
    return out


def faiss_ids(data: bytes) -> np.ndarray:
    """External ids held by a serialized faiss index (IVF inverted lists, IDMap id_map); empty if none/unreadable."""
    import faiss

    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except Exception:  # not a faiss index
        return np.zeros(0, np.int64)
    out = []
    inner = index  # `index` stays referenced: it owns the sub-index of an IDMap
    if hasattr(index, "id_map"):
        out.append(faiss.vector_to_array(index.id_map))
        inner = faiss.downcast_index(index.index)
    ivf = faiss.try_extract_index_ivf(inner)  # None when it has no inverted lists
    if ivf is not None:
        inv = ivf.invlists
        for lst in range(ivf.nlist):
            n = inv.list_size(lst)
            if n:
                ptr = inv.get_ids(lst)
                try:
                    out.append(faiss.rev_swig_ptr(ptr, n).copy())
                finally:
                    inv.release_ids(lst, ptr)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def scan_faiss(data: bytes, needles: Needles):
    if len(data) < 8 or not data[:4].isalnum():  # faiss files open with a 4-letter code ("IwFl", "IxM2")
        return
    for i in needles.in_ints(faiss_ids(data)):
        yield "faiss index ids", i


def scan_lance(uri: str, needles: Needles):
    """Every version of a Lance dataset still on disk (time travel reads what a reader could still see)."""
    import lance

    from pipeline import storage

    opts = lance_storage_options() if storage.is_remote(uri) else None
    ds = lance.dataset(uri, storage_options=opts)
    for v in ds.versions():
        table = lance.dataset(uri, version=v["version"], storage_options=opts).to_table()
        for how, i in _scan_table(table, needles, f"lance v{v['version']}"):
            yield how, i


def lance_storage_options() -> dict:
    """Lance's object-store settings for the S3 server the tests start (from the same env vars)."""
    import os

    return {"aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", ""),
            "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            "aws_endpoint": os.environ.get("VMEM_S3_ENDPOINT_URL", ""),
            "aws_region": os.environ.get("VMEM_S3_REGION", "us-east-1"), "allow_http": "true"}


# ------------------------------------------------------------------------------ a synthetic workdir

N_TARS, PER_TAR, DIM = 12, 30, 16


def write_samples(root, data, per_tar, source="synthetic"):
    """`data` as the train split `vmem shards/embed` would write it: tars of samples (png + json key) and one
    embedding part per tar, listed in `embeddings/train/_manifest.json`. Returns (tar URLs, part URLs)."""
    import io
    import json
    import tarfile

    from pipeline import storage
    from pipeline.data.shards import tar_key
    from pipeline.embed import parts
    from pipeline.embed.stage import part_name

    n_tars = len(data.ids) // per_tar
    tars = [storage.join(root, "shards", "train", f"train-{t:05d}.tar") for t in range(n_tars)]
    part_urls = [storage.join(root, "embeddings", "train", part_name(t)) for t in range(n_tars)]
    manifest = {"shards": {}}
    for t in range(n_tars):
        sel = range(t * per_tar, (t + 1) * per_tar)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in sel:
                k = data.keys[i]
                for ext, body in (("png", b"\x89PNG" + bytes(200)),
                                  ("json", json.dumps({"key": k, "label": int(data.labels[i])}).encode())):
                    info = tarfile.TarInfo(f"{tar_key(k)}.{ext}")
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
        storage.atomic_write_bytes(tars[t], buf.getvalue())
        meta = {"id": [int(data.ids[i]) for i in sel], "key": [data.keys[i] for i in sel],
                "label": [int(data.labels[i]) for i in sel], "label_name": [f"class_{data.labels[i]}" for i in sel],
                "source": [source] * per_tar, "shard": [tars[t]] * per_tar}
        parts.write_part(parts.to_table(meta, data.xb[list(sel)]), part_urls[t])
        manifest["shards"][f"train-{t:05d}"] = {"url": tars[t], "part": part_name(t), "status": "done",
                                                "rows": per_tar}
    storage.atomic_write_json(storage.join(root, "embeddings", "train", parts.MANIFEST_NAME), manifest)
    return tars, part_urls


def synthetic_workdir(root, n_tars=N_TARS, per_tar=PER_TAR, seed=5):
    """Tars of samples (png + json key), one embedding part per tar with its `_manifest.json` entry, and a
    memory (4 shards) whose items name their tar: the layout `vmem shards/embed/build` writes."""
    from pipeline import storage
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

    data = make_clusters(n_tars * per_tar, DIM, 4, seed=seed, prefix="train/img")
    tars, part_urls = write_samples(root, data, per_tar)
    item_tar = [tars[i // per_tar] for i in range(len(data.ids))]
    build_synthetic_memory(storage.join(root, "memory"), data, num_shards=4, index_key="IVF8,Flat", nprobe=8,
                           shards=item_tar, build={"split": "train"})
    return data, tars, part_urls
