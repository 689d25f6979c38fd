"""Training the one IVF index a memory shares, and the faiss mechanics around it (GPU, serialize, add, routing).

`train_index` trains on a sample and returns the trained-but-EMPTY index. Keys that autofaiss builds as faiss
would (`IVF*,Flat`; for the l2 metric also its own `OPQ*,IVF*,PQ*` forms) are trained by
`autofaiss.build_index` (which also fills the index with the sample; we `reset()` it, keeping the trained
quantizer and codebooks). Every other key is trained by faiss directly on the same sample: keys autofaiss
refuses for inner product (`IVF*,SQ8`, plain `IVF*,PQ*`) or has no memory heuristics for (plain PQ, RaBitQ,
fast-scan: "we don't have heuristics for that kind of index"), explicit config keys, and `OPQ*,IVF*,PQ*` for
inner product. The last ones autofaiss 2.18 builds with its own factory, `faiss.OPQMatrix(d, M=..., d2=...)`:
faiss 1.14 renamed that keyword (`M_in`), so on faiss >= 1.14 autofaiss fails with "OPQMatrix.__init__() got
an unexpected keyword argument 'M'". faiss's own `index_factory` builds the same OPQ + IVF-PQ with an
inner-product coarse quantizer (checked on 1.15.1: quantizer and IVF metric are METRIC_INNER_PRODUCT), so the
project trains these keys itself rather than patching either library. autofaiss still proposes keys
(`pipeline.index.keys.autofaiss_key`) and list counts (`nlist_for`): that part is arithmetic on the sizes and
works on every faiss.

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

# Keys autofaiss builds as faiss would, per metric. Not OPQ for inner product: see the module docstring.
_AUTOFAISS_KEYS = {"ip": (r"^IVF\d+,Flat$",),
                   "l2": (r"^IVF\d+,Flat$", r"^OPQ\d+_\d+,IVF\d+(_HNSW\d+)?,PQ\d+(x\d+)?$")}


def autofaiss_can_build(key: str, metric: str) -> bool:
    """Whether autofaiss builds `key` as faiss would (it knows only some forms, fewer for inner product)."""
    return any(re.match(p, key) for p in _AUTOFAISS_KEYS.get(metric, ()))


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

