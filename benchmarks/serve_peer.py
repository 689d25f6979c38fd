"""The peer of `vmem serve` in benchmarks/serve_load.py: a plain one-process FastAPI + faiss service.

It trains the same faiss index key with the same nprobe on the same embeddings and answers the same
`POST /v1/classify {"embedding": [...], "k": 10}` with a plurality vote over the k nearest neighbours.

  PEER_DATA=/tmp/peer PEER_INDEX=IVF512,SQ8 PEER_NPROBE=16 uvicorn benchmarks.serve_peer:app --port 8001

PEER_DATA holds xb.npy (float32, L2-normalised), labels.npy and ids.npy (int64).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import List

import faiss
import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel


class ClassifyRequest(BaseModel):
    embedding: List[float]
    k: int = 10


def load_index(data_dir: str, index_key: str, nprobe: int):
    xb = np.load(os.path.join(data_dir, "xb.npy"))
    ids = np.load(os.path.join(data_dir, "ids.npy"))
    index = faiss.index_factory(xb.shape[1], index_key, faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index = faiss.IndexIDMap(index) if not index_key.startswith("IVF") else index
    index.add_with_ids(xb, ids)
    faiss.extract_index_ivf(index).nprobe = nprobe
    labels = dict(zip(ids.tolist(), np.load(os.path.join(data_dir, "labels.npy")).tolist()))
    return index, labels


index, labels = load_index(os.environ["PEER_DATA"], os.environ.get("PEER_INDEX", "IVF512,SQ8"),
                           int(os.environ.get("PEER_NPROBE", "16")))
app = FastAPI(title="faiss peer")


@app.post("/v1/classify")
def classify(req: ClassifyRequest):
    if len(req.embedding) != index.d or not 1 <= req.k <= 1000:
        raise HTTPException(422, f"need an embedding of dimension {index.d} and 1 <= k <= 1000")
    D, I = index.search(np.asarray([req.embedding], dtype=np.float32), req.k)
    hits = [(int(i), float(d)) for i, d in zip(I[0], D[0]) if i >= 0]
    votes = Counter(labels[i] for i, _ in hits)
    label = max(votes, key=votes.get) if votes else -1
    return {"label": label, "scores": {str(c): float(n) for c, n in votes.items()},
            "neighbors": [{"id": i, "label": labels[i], "distance": 1.0 - d} for i, d in hits]}


@app.get("/healthz")
def healthz():
    return {"status": "ok", "items": int(index.ntotal)}
