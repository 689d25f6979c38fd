"""Index scale benchmark: build a sharded memory of synthetic clustered vectors and measure it.

  .venv/bin/python benchmarks/index_scale.py --items 5000000 --dim 256 --shards 4        (the full run)
  .venv/bin/python benchmarks/index_scale.py --items 200000 --dim 256 --shards 4          (a quick run)
  .venv/bin/python benchmarks/index_scale.py --data hard --items 1M --queries 2000 --bytes-per-item 48 --peers
                                                    (issue #11: hard data, the project beside plain faiss peers)

Data: `latent` (default) = clusters in a 24-d subspace lifted to `dim` (image embeddings have a low intrinsic
dimension); `hard` = L2-normalised points around 4096 random unit centres with isotropic noise in all `dim`
directions (`--noise`), so a point's neighbours are nearly equidistant and PQ codes alone cap recall.

Prints: build time, bytes/item (target <= PQ code size + 16), recall@10 vs exact search (exact = faiss flat over
all vectors in chunks), router QPS (batched) and p50/p99 single-query latency, and the same figures for ONE
faiss index holding all vectors (same trained index, same nprobe, same re-rank depth) in the same run, with
the router/single ratio. `--peers` adds, in the same run and on the same vectors and queries: plain faiss
`IVF4096,PQ32` at nprobe 16, the same + `IndexRefineFlat` (100 candidates re-ranked from float vectors in
RAM), `IVF4096,RaBitQ`, `IVF4096,RaBitQfs` and `IVF4096,PQ{d/4}x4fs` + this project's re-rank (100
candidates, vectors on disk), and prints one table:
recall@10, QPS, RAM bytes/item, disk bytes/item, build seconds.
Writes the figures as JSON next to the memory (`<workdir>/index_scale.json`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402
from pipeline.embed.parts import to_table, write_part  # noqa: E402
from pipeline.index.units import parse_count  # noqa: E402


LATENT = 24  # intrinsic dimension of the synthetic data


def clustered(rng, space, n: int, noise: float, labels: bool = False):
    """Unit vectors around cluster centres in a LATENT-dim subspace, lifted to `dim` with a little ambient noise.

    Real image embeddings have a low intrinsic dimension; isotropic noise in all `dim` directions would make
    every point of a cluster nearly equidistant from the others, a case no compressed index (nor any real
    workload) resembles.
    """
    centers, lift = space
    c = rng.integers(0, len(centers), n)
    z = centers[c] + noise * rng.standard_normal((n, LATENT), dtype=np.float32)
    x = z @ lift + 0.02 * rng.standard_normal((n, lift.shape[1]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x, c) if labels else x  # labels: the cluster of each point (benchmarks/scale.py votes on them)


def write_data(emb_dir: str, n: int, dim: int, rows_per_part: int, seed: int = 0):
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(100, n // 2000), LATENT), dtype=np.float32)
    lift = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)
    space = (centers, lift)
    os.makedirs(emb_dir, exist_ok=True)
    for p, start in enumerate(tqdm(range(0, n, rows_per_part), desc="write parts", unit="part")):
        m = min(rows_per_part, n - start)
        x = clustered(rng, space, m, 0.35)
        ids = np.arange(start, start + m, dtype=np.int64) * 2654435761 % (1 << 61) + 1  # spread, unique
        meta = {"id": ids, "key": [""] * m, "label": (ids % 100), "label_name": [""] * m,
                "source": [""] * m, "shard": [""] * m}
        write_part(to_table(meta, x), os.path.join(emb_dir, f"part-{p:05d}.parquet"))
    return clustered(rng, space, 10000, 0.35)


def hard_space(rng, dim: int, centers: int = 4096) -> np.ndarray:
    c = rng.standard_normal((centers, dim), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def hard(rng, centers: np.ndarray, n: int, noise: float):
    """(unit vectors, cluster labels): centres + isotropic noise of norm ~`noise` in every dimension."""
    lab = rng.integers(0, len(centers), n)
    x = centers[lab] + (noise / np.sqrt(centers.shape[1])) * rng.standard_normal((n, centers.shape[1]),
                                                                                 dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), lab


def write_hard(emb_dir: str, n: int, dim: int, rows_per_part: int, noise: float, seed: int = 0):
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    centers = hard_space(rng, dim)
    os.makedirs(emb_dir, exist_ok=True)
    for p, start in enumerate(tqdm(range(0, n, rows_per_part), desc="write parts", unit="part")):
        m = min(rows_per_part, n - start)
        x, lab = hard(rng, centers, m, noise)
        ids = np.arange(start, start + m, dtype=np.int64) * 2654435761 % (1 << 61) + 1
        meta = {"id": ids, "key": [""] * m, "label": lab, "label_name": [""] * m, "source": [""] * m,
                "shard": [""] * m}
        write_part(to_table(meta, x), os.path.join(emb_dir, f"part-{p:05d}.parquet"))
    return hard(rng, centers, 10000, noise)[0]


def latencies(fn, xq, n):
    out = []
    for q in xq[:n]:
        t = time.perf_counter()
        fn(q[None, :])
        out.append((time.perf_counter() - t) * 1000)
    return np.percentile(out, 50), np.percentile(out, 99)


def qps(fn, xq, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(xq)
        best = min(best, time.perf_counter() - t)
    return len(xq) / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="5M")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--bytes-per-item", type=int, default=48, help="memory budget per item given to autofaiss")
    ap.add_argument("--index-key", default=None, help="explicit faiss key instead of autofaiss's choice")
    ap.add_argument("--train-sample", type=int, default=200000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--workdir", default="/tmp/vmem-index-scale")
    ap.add_argument("--data", choices=("latent", "hard"), default="latent", help="synthetic data kind (see above)")
    ap.add_argument("--noise", type=float, default=0.5, help="hard data: norm of the isotropic noise")
    ap.add_argument("--peers", action="store_true", help="also measure plain faiss IVF-PQ, + refine, RaBitQ")
    ap.add_argument("--peer-nprobe", type=int, default=16)
    ap.add_argument("--peer-nlist", type=int, default=4096, help="inverted lists of the faiss peers")
    ap.add_argument("--peer-candidates", type=int, default=100)
    ap.add_argument("--peer-pq", type=int, default=32, help="PQ code bytes of the faiss peers")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and memory")
    args = ap.parse_args()

    import faiss
    import ray

    from pipeline.index.build import build_index, vector_batches
    from pipeline.index.keys import key_cost
    from pipeline.index.manifest import ManifestStore
    from pipeline.index.recall import exact_knn, recall_at
    from pipeline.index.rerank import rerank
    from pipeline.index.router import Router
    from pipeline.index.shard import read_index
    from pipeline.index.train import add_vectors
    from pipeline.runtime import setup_logging

    setup_logging("INFO")
    n, d = parse_count(args.items), args.dim
    shutil.rmtree(args.workdir, ignore_errors=True)
    overrides = [f"workdir={args.workdir}", f"index.num_shards={args.shards}", "index.recall_queries=200",
                 f"index.max_index_memory={n * args.bytes_per_item}", f"index.train_sample={args.train_sample}",
                 "index.memory_per_node=64GiB", f"ray.num_cpus={os.cpu_count()}", "index.build_batch_rows=100000",
                 f"memory.k={args.k}", f"eval.ks=[{args.k}]"]  # recall measured where this run's votes are: @k
    if args.index_key:
        overrides.append(f"index.index_key={args.index_key}")
    cfg = load_config(None, overrides)
    emb_dir = cfg.embeddings_dir("train")
    t = time.perf_counter()
    if args.data == "hard":
        pool = write_hard(emb_dir, n, d, rows_per_part=250000, noise=args.noise)
    else:
        pool = write_data(emb_dir, n, d, rows_per_part=250000)
    gen_s = time.perf_counter() - t
    xq = np.ascontiguousarray(pool[: args.queries])

    t = time.perf_counter()
    m = build_index(cfg, "train")
    build_s = time.perf_counter() - t
    ivf_code = key_cost(m.index_key, d).code_size

    t = time.perf_counter()
    _, gt = exact_knn(xq, vector_batches(emb_dir, 250000), args.k)
    exact_s = time.perf_counter() - t

    router = Router(cfg.memory_dir)
    rres = router.search(xq, args.k)
    r_qps = qps(lambda q: router.search(q, args.k), xq)
    r_p50, r_p99 = latencies(lambda q: router.search(q, args.k), xq, 200)
    router.close()

    store = ManifestStore(cfg.memory_dir)
    single = read_index(store.url(m.trained_path), m.trained_sha256, mmap=False)
    t = time.perf_counter()
    all_ids, all_x = [], []
    for x, ids in vector_batches(emb_dir, 250000):
        add_vectors(single, x, ids)
        all_ids.append(ids)
        all_x.append(x)
    single_add_s = time.perf_counter() - t
    all_ids, all_x = np.concatenate(all_ids).astype(np.int64), np.concatenate(all_x)
    order = np.argsort(all_ids)
    sorted_ids, single_vecs = all_ids[order], None
    if m.rerank_k:  # the same re-rank stage over one vectors file holding every item, memory-mapped
        np.save(os.path.join(args.workdir, "single.vectors.npy"), all_x[order])
        single_vecs = np.load(os.path.join(args.workdir, "single.vectors.npy"), mmap_mode="r")
    params = faiss.SearchParametersIVF(nprobe=m.nprobe)

    def single_search(q):  # re-ranks as many candidates as the router's shards together
        _, I = single.search(q, max(args.k, m.rerank_k * args.shards), params=params)
        return rerank(q, I, sorted_ids, single_vecs, args.k)[1] if m.rerank_k else I[:, :args.k]

    sI = single_search(xq)
    s_qps = qps(single_search, xq)
    s_p50, s_p99 = latencies(single_search, xq, 200)
    disk_bytes = sum(os.path.getsize(store.url(rel)) for e in m.shards for rel, _ in e.files())

    fig = {
        "items": n, "dim": d, "data": args.data, "noise": args.noise if args.data == "hard" else None,
        "shards": args.shards, "index_key": m.index_key, "nprobe": m.nprobe, "rerank_k": m.rerank_k,
        "index_choice": m.build.get("index_choice"), "recall_status": m.build.get("recall_status"),
        "disk_bytes_per_item": round(disk_bytes / n, 2), "queries": len(xq),
        "cpus": os.cpu_count(), "generate_s": round(gen_s, 1), "build_s": round(build_s, 1),
        "build_timings": m.build.get("timings"), "bytes_per_item": round(m.build["bytes_per_item"], 2),
        "code_size": int(ivf_code), "bytes_per_item_target": int(ivf_code) + 16,
        "router_recall@10": recall_at(rres.I, gt, args.k), "single_recall@10": recall_at(sI, gt, args.k),
        "router_equals_single": bool((rres.I == sI).all()), "exact_search_s": round(exact_s, 1),
        "router_qps": round(r_qps), "router_p50_ms": round(r_p50, 2), "router_p99_ms": round(r_p99, 2),
        "single_qps": round(s_qps), "single_p50_ms": round(s_p50, 2), "single_p99_ms": round(s_p99, 2),
        "single_add_s": round(single_add_s, 1), "router_vs_single_qps": round(r_qps / s_qps, 3),
        "build_recall_table": m.recall,
    }
    if args.peers:
        fig["peers"] = peers(args, all_x, all_ids, xq, gt)
    print(json.dumps({k: v for k, v in fig.items() if k != "build_recall_table"}, indent=2))
    if args.peers:
        print(side_by_side(fig))
    with open(os.path.join(args.workdir, "index_scale.json"), "w") as f:
        json.dump(fig, f, indent=2)
    ray.shutdown()
    if not args.keep:
        shutil.rmtree(os.path.join(args.workdir, "embeddings"), ignore_errors=True)
        shutil.rmtree(os.path.join(args.workdir, "memory"), ignore_errors=True)
    return 0


def peers(args, xb: np.ndarray, xids: np.ndarray, xq: np.ndarray, gt: np.ndarray) -> dict:
    """Plain faiss on the same vectors and queries: IVF-PQ, IVF-PQ + IndexRefineFlat, IVF-RaBitQ + re-rank.

    The peers number the vectors 0..n-1 (row order of `xb`); `xids` maps rows to the external ids of `gt`."""
    import faiss

    from pipeline.index.recall import recall_at as recall_ext
    from pipeline.index.rerank import rerank

    def recall_at(I, gt, k):
        return recall_ext(np.where(I >= 0, xids[np.maximum(I, 0)], -1), gt, k)

    n, d, k, c = len(xb), xb.shape[1], args.k, args.peer_candidates
    rng = np.random.default_rng(2)
    xt = xb[rng.choice(n, size=min(n, args.train_sample), replace=False)]
    nlist = int(args.peer_nlist)
    out = {}
    t = time.perf_counter()
    pq = faiss.index_factory(d, f"IVF{nlist},PQ{args.peer_pq}", faiss.METRIC_INNER_PRODUCT)
    pq.train(xt)
    pq.add(xb)
    pq_build = time.perf_counter() - t
    pq_bytes = len(faiss.serialize_index(pq))
    params = faiss.SearchParametersIVF(nprobe=args.peer_nprobe)
    _, I = pq.search(xq, k, params=params)
    out[f"faiss IVF{nlist},PQ{args.peer_pq} nprobe {args.peer_nprobe}"] = {
        "recall@10": recall_at(I, gt, 10), "qps": round(qps(lambda q: pq.search(q, k, params=params), xq)),
        "ram_bytes_per_item": round(pq_bytes / n, 1), "disk_bytes_per_item": 0.0, "build_s": round(pq_build, 1)}
    t = time.perf_counter()
    refine = faiss.IndexRefineFlat(pq, faiss.swig_ptr(np.ascontiguousarray(xb)))  # float vectors in RAM
    refine_build = pq_build + time.perf_counter() - t
    rparams = faiss.IndexRefineSearchParameters(k_factor=c / k, base_index_params=params)
    _, I = refine.search(xq, k, params=rparams)
    out[f"faiss IVF{nlist},PQ{args.peer_pq} + IndexRefineFlat ({c} cand.)"] = {
        "recall@10": recall_at(I, gt, 10), "qps": round(qps(lambda q: refine.search(q, k, params=rparams), xq)),
        "ram_bytes_per_item": round((pq_bytes + 4 * d * n) / n, 1), "disk_bytes_per_item": 0.0,
        "build_s": round(refine_build, 1)}
    t = time.perf_counter()
    rbq = faiss.IndexIVFRaBitQ(faiss.downcast_index(pq.quantizer), d, nlist, faiss.METRIC_INNER_PRODUCT)
    rbq.own_fields = False
    rbq.train(xt)
    rbq.add(xb)
    rbq_build = time.perf_counter() - t
    ids = np.arange(n, dtype=np.int64)
    rb = faiss.IVFRaBitQSearchParameters()
    rb.nprobe = args.peer_nprobe

    def rbq_search(q):
        _, I = rbq.search(q, c, params=rb)
        return rerank(q, I, ids, xb, k)[1]

    out[f"faiss IVF{nlist},RaBitQ + re-rank ({c} cand.)"] = {
        "recall@10": recall_at(rbq_search(xq), gt, 10), "qps": round(qps(rbq_search, xq)),
        "ram_bytes_per_item": round(len(faiss.serialize_index(rbq)) / n, 1),
        "disk_bytes_per_item": 4.0 * d, "build_s": round(rbq_build, 1)}  # + the PQ peer's quantizer
    # faiss 1.15's other codes at about the same bytes, on the PQ peer's trained quantizer (IndexIVF::train
    # skips a quantizer that is trained and full): fast-scan RaBitQ and fast-scan PQ, + the same re-rank
    for code in ("RaBitQfs", f"PQ{d // 4}x4fs"):
        t = time.perf_counter()
        other = faiss.index_factory(d, f"IVF{nlist},{code}", faiss.METRIC_INNER_PRODUCT)
        other.quantizer = pq.quantizer  # pq outlives `other`; not owned, so not freed twice
        other.own_fields = False
        other.train(xt)
        other.add(xb)
        other_build = time.perf_counter() - t

        def other_search(q, index=other):
            _, I = index.search(q, c, params=params)
            return rerank(q, I, ids, xb, k)[1]

        out[f"faiss IVF{nlist},{code} + re-rank ({c} cand.)"] = {
            "recall@10": recall_at(other_search(xq), gt, 10), "qps": round(qps(other_search, xq)),
            "ram_bytes_per_item": round(len(faiss.serialize_index(other)) / n, 1),
            "disk_bytes_per_item": 4.0 * d, "build_s": round(other_build, 1)}
    return out


def side_by_side(fig: dict) -> str:
    rows = [(f"vmem build + router ({fig['index_key']}, nprobe {fig['nprobe']}, rerank_k {fig['rerank_k']})",
             {"recall@10": fig["router_recall@10"], "qps": fig["router_qps"],
              "ram_bytes_per_item": fig["bytes_per_item"], "disk_bytes_per_item": fig["disk_bytes_per_item"],
              "build_s": fig["build_s"]}),
            ("vmem one index, same vectors and settings",
             {"recall@10": fig["single_recall@10"], "qps": fig["single_qps"], "ram_bytes_per_item": None,
              "disk_bytes_per_item": None, "build_s": None})] + list(fig["peers"].items())
    head = f"{'system':78s} {'recall@10':>9s} {'QPS':>8s} {'RAM B/it':>9s} {'disk B/it':>9s} {'build s':>8s}"
    lines = [head, "-" * len(head)]
    for name, r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        lines.append(f"{name[:78]:78s} {r['recall@10']:>9.4f} {r['qps']:>8} {f(r['ram_bytes_per_item'], '9.1f'):>9s} "
                     f"{f(r['disk_bytes_per_item'], '9.1f'):>9s} {f(r['build_s'], '8.1f'):>8s}")
    refine = [r for name, r in fig["peers"].items() if "Refine" in name][0]
    lines.append(f"ratios: vmem QPS / refine peer QPS = {fig['router_qps'] / refine['qps']:.2f} (target >= 0.5); "
                 f"router / one index = {fig['router_vs_single_qps']:.2f} (target >= 0.7)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
