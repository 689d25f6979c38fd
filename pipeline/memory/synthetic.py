"""Small synthetic memories (clustered, L2-normalised vectors) for tests and benchmarks.

`make_clusters` draws labelled points around random class centres; `build_synthetic_memory` writes a real
memory from them with the index layer's own pieces (trained IVF index, `save_shard`, `ManifestStore.commit`),
so tests exercise the real on-disk format without embedding any images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.data.ids import stable_id
from pipeline.memory.state import MemoryState, item_rows
from pipeline.index import train as itrain
from pipeline.index.manifest import Manifest, ManifestStore
from pipeline.index.shard import save_shard, sha256_bytes


@dataclass
class Synthetic:
    xb: np.ndarray
    labels: np.ndarray
    keys: List[str]
    ids: np.ndarray
    centres: np.ndarray


def make_clusters(n: int, dim: int = 32, num_classes: int = 10, spread: float = 0.35, seed: int = 0,
                  prefix: str = "item", centres: Optional[np.ndarray] = None) -> Synthetic:
    """n labelled unit vectors around `num_classes` random unit centres (spread = noise std per dim * sqrt(d))."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((num_classes, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, len(centres), n)
    x = centres[labels] + rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = [f"{prefix}-{seed}-{i:07d}" for i in range(n)]
    ids = np.array([stable_id(k) for k in keys], dtype=np.int64)
    return Synthetic(x.astype(np.float32), labels.astype(np.int64), keys, ids, centres)


def build_synthetic_memory(memory_dir: str, data: Synthetic, num_shards: int = 2, index_key: str = "IVF16,Flat",
                           nprobe: int = 16, label_names: Optional[List[str]] = None,
                           source: str = "synthetic", shards: Optional[List[str]] = None,
                           encoder: Optional[dict] = None, build: Optional[dict] = None) -> Manifest:
    """Train `index_key` on the data, populate `num_shards` shards (id % num_shards) and commit version 1.

    Real embeddings of real images may be given too: `shards` (the WebDataset tar of each item, so
    `get_image` works), `encoder` ({"name", "image_size"}) and `build` (e.g. {"split": "train"}) for the manifest.
    """
    dim = data.xb.shape[1]
    trained, _ = itrain.train_index(data.xb, index_key, "ip", prefer_autofaiss=False)
    store = ManifestStore(memory_dir)
    version = store.next_version()
    tb = itrain.serialize(trained)
    trained_rel = f"trained/{sha256_bytes(tb)[:16]}.index"
    storage.atomic_write_bytes(store.url(trained_rel), tb)
    names = label_names or [f"class_{c}" for c in range(int(data.labels.max()) + 1)]
    route = itrain.shard_of(data.ids, num_shards)
    entries = []
    for s in range(num_shards):
        sel = np.flatnonzero(route == s)
        index = itrain.trained_clone(trained)
        itrain.add_vectors(index, data.xb[sel], data.ids[sel])
        meta = pa.table({"id": pa.array(data.ids[sel], pa.int64()), "label": pa.array(data.labels[sel], pa.int64()),
                         "label_name": [names[int(l)] for l in data.labels[sel]],
                         "key": [data.keys[i] for i in sel], "source": [source] * len(sel),
                         "shard": [shards[i] if shards else "" for i in sel]})
        entries.append(save_shard(memory_dir, version, s, index, meta))
    m = Manifest(version=version, shards=entries, index_key=index_key, dim=dim, metric="ip",
                 trained_path=trained_rel, trained_sha256=sha256_bytes(tb), nprobe=nprobe,
                 encoder=encoder or {"name": "synthetic", "dim": dim},
                 build={"trainer": "faiss", "source": "synthetic",
                        "label_names": {str(i): n for i, n in enumerate(names)}, **(build or {})})
    store.commit(m)
    metas = [{"label": int(l), "label_name": names[int(l)], "key": k, "source": source,
              "shard": shards[i] if shards else ""} for i, (l, k) in enumerate(zip(data.labels, data.keys))]
    state = MemoryState(memory_dir)
    state.add_items(item_rows(data.ids.tolist(), metas, indexed=m.version))
    state["items"].index_ids()
    return m
