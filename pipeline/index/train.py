"""Training the one IVF index a memory shares, and the faiss mechanics around it (GPU, serialize, add, routing).

`train_index` trains on a sample and returns the trained-but-EMPTY index. Keys that autofaiss itself builds
(its own choice, `IVF*,Flat`, `OPQ*,IVF*,PQ*`) are trained by `autofaiss.build_index` (which also fills the
index with the sample; we `reset()` it, keeping the trained quantizer, OPQ and PQ codebooks). Keys autofaiss
refuses for inner product (`IVF*,SQ8`, plain `IVF*,PQ*`) and explicit config keys are trained by faiss
directly on the same sample.

Reusable by the memory layer (compaction, synthetic memories): `serialize`, `trained_clone`, `add_vectors`,
`shard_of`.
"""
from __future__ import annotations

import logging
import re
import tempfile
from typing import Tuple

import faiss
import numpy as np

from pipeline.index.keys import metric_of
from pipeline.index.units import to_autofaiss

log = logging.getLogger("vmem.index")

_AUTOFAISS_IP_KEYS = (r"^OPQ\d+_\d+,IVF\d+(_HNSW\d+)?,PQ\d+(x\d+)?$", r"^IVF\d+,Flat$")


def autofaiss_can_build(key: str, metric: str) -> bool:
    """Whether autofaiss builds `key` as faiss would (for inner product it supports only some forms)."""
    return metric != "ip" or any(re.match(p, key) for p in _AUTOFAISS_IP_KEYS)


def use_gpu(requested: bool) -> bool:
    """True when GPU faiss was requested and a GPU is visible; warns (and falls back to CPU) otherwise."""
    if not requested:
        return False
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n <= 0:
        log.warning("index.gpu is true but faiss sees no GPU (faiss-cpu build or no device): using CPU")
        return False
    return True


def to_gpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_cpu_to_all_gpus(index)


def train_index(xt: np.ndarray, key: str, metric: str = "ip", gpu: bool = False, budget_bytes: int = 2**30,
                prefer_autofaiss: bool = True) -> Tuple[faiss.Index, str]:
    """Train `key` on `xt`; return (trained empty index, "autofaiss" | "faiss")."""
    xt = np.ascontiguousarray(xt, dtype=np.float32)
    gpu = use_gpu(gpu)
    if prefer_autofaiss and autofaiss_can_build(key, metric):
        from autofaiss import build_index

        with tempfile.TemporaryDirectory() as tmp:  # autofaiss writes temporary files in the cwd otherwise
            index, _ = build_index(
                xt, index_key=key, index_param="nprobe=1", save_on_disk=False, metric_type=metric,
                max_index_memory_usage=to_autofaiss(budget_bytes), current_memory_available="4G",
                use_gpu=gpu, verbose=logging.WARNING, index_path=f"{tmp}/knn.index",
                index_infos_path=f"{tmp}/infos.json")
        if index is None:
            raise RuntimeError(f"autofaiss could not build {key}")
        index.reset()
        return index, "autofaiss"
    index = faiss.index_factory(xt.shape[1], key, metric_of(metric))
    if gpu:
        gindex = to_gpu(index)
        gindex.train(xt)
        index = faiss.index_gpu_to_cpu(gindex)
    else:
        index.train(xt)
    return index, "faiss"


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def add_vectors(index: faiss.Index, xb: np.ndarray, ids: np.ndarray) -> None:
    """Add vectors under their external int64 ids (the ids live in the inverted lists: no row positions)."""
    index.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def shard_of(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard number of each id: `id % num_shards`, so adds and deletes route deterministically."""
    return np.asarray(ids, dtype=np.int64) % int(num_shards)


def trained_clone(trained: faiss.Index) -> faiss.Index:
    """A fresh empty copy of the trained index (quantizer and codebooks shared by value)."""
    return faiss.clone_index(trained)

