"""`build_index(cfg, split)`: embeddings -> one trained IVF index -> N populated shards -> manifest vN.

Steps (each a logged phase):
 1. scan the embedding parts (ids only): n, dim, a fingerprint of the inputs; ids must be unique.
 2. choose the index (`pipeline.index.keys.choose_index`): explicit `index.index_key`; else one list (exact
    "Flat", or SQ8 codes + re-rank) when an exhaustive scan fits half of `index.max_latency_ms`; else IVF
    with the code measured on a sample of the vectors among those fitting `index.max_index_memory` (Flat,
    SQ8, RaBitQ, fast-scan, PQ: recall at the vote's depth first, then CPU time per query). The choice and its reason
    are logged and recorded in the manifest (`build.index_choice`). Refuse (UserError with numbers) if one
    shard will not fit `index.memory_per_node` (`pipeline.index.plan`'s estimate).
 3. train on a random sample of `index.train_sample` vectors (`pipeline.index.train.train_index`) and store the
    trained EMPTY index at `trained/<sha256>.index`.
 4. populate `index.num_shards` shards in parallel as Ray tasks: shard s holds the items with id % N == s, added
    with `add_with_ids` under their external ids, plus (re-rank on) its vectors file; files written
    atomically, see `pipeline.index.shard`.
 5. measure recall@10 and @K (K = max(memory.k, eval.ks)) and plurality-vote agreement against exact search
    on held-out queries over nprobe x re-rank depth; choose the setting (`pipeline.index.recall`).
 6. commit the manifest (`ManifestStore.commit`): only now does the new version become CURRENT.

Resume: the new version's folder `shards/vN/` gets `_build.json` (inputs fingerprint, key, trained index) before
populating and `shard-XXX.done.json` after each shard. A re-run with the same inputs reuses the trained index and
every finished shard whose files still match their checksums. A build killed at any point leaves CURRENT (and
every file it references) untouched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.embed.parts import MANIFEST_NAME, embeddings_of, iter_embedding_batches, part_urls, schema
from pipeline.errors import DataError, NotFound, UserError
from pipeline.index import train as tr
from pipeline.index.keys import (MEASURE_BASE, MEASURE_QUERIES, IndexChoice, autofaiss_key, bytes_per_shard,
                                 choose_index, key_cost)
from pipeline.index.manifest import Manifest, ManifestStore, ShardEntry, version_name
from pipeline.index.recall import (choose_setting, exact_knn, format_table, rerank_ladder, settings_table)
from pipeline.index.shard import mark_writing, read_index, save_shard, sha256_bytes, verify
from pipeline.index.units import format_bytes, parse_bytes
from pipeline.runtime import phase

log = logging.getLogger("vmem.index")
SEED = 0
MEASURE_SAMPLE = MEASURE_BASE + MEASURE_QUERIES  # vectors a measured index choice reads


# ---------------------------------------------------------------- inputs

def scan_inputs(emb_dir: str) -> Tuple[np.ndarray, int, str]:
    """(ids in storage order, dim, fingerprint of the parts: names + sizes)."""
    urls = part_urls(emb_dir)
    if not urls:
        raise NotFound(f"no embedding parts under {emb_dir}: run `vmem embed` first")
    ids, dim, sig = [], None, []
    for url in urls:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            dim = pf.schema_arrow.field("embedding").type.list_size
            ids.append(pf.read(columns=["id"]).column("id").to_numpy())
        sig.append([url.rsplit("/", 1)[-1], fs.info(path)["size"]])
    all_ids = np.concatenate(ids).astype(np.int64)
    uniq, counts = np.unique(all_ids, return_counts=True)
    if len(uniq) != len(all_ids):
        raise DataError(f"{len(all_ids) - len(uniq)} duplicate ids in {emb_dir} (e.g. id {uniq[counts > 1][0]}): "
                        f"ids must be unique; re-run `vmem embed`")
    fingerprint = hashlib.sha256(json.dumps([sig, int(dim)]).encode()).hexdigest()
    return all_ids, int(dim), fingerprint


def gather_rows(emb_dir: str, positions: np.ndarray, batch_rows: int) -> Tuple[np.ndarray, np.ndarray]:
    """(vectors, ids) at global row `positions` (sorted) of the parts, in one streaming pass."""
    positions = np.sort(positions)
    xs, ids, start = [], [], 0
    for batch in iter_embedding_batches(emb_dir, batch_rows, columns=["id", "embedding"]):
        end = start + batch.num_rows
        lo, hi = np.searchsorted(positions, [start, end])
        if hi > lo:
            take = pa.array(positions[lo:hi] - start)
            sub = batch.take(take)
            xs.append(embeddings_of(sub))
            ids.append(sub.column("id").to_numpy())
        start = end
    return np.concatenate(xs), np.concatenate(ids).astype(np.int64)


def vector_batches(emb_dir: str, batch_rows: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(vectors, ids) of the parts in batches of at most `batch_rows` rows, in storage order."""
    for batch in iter_embedding_batches(emb_dir, batch_rows, columns=["id", "embedding"]):
        yield embeddings_of(batch), batch.column("id").to_numpy()


def label_names(emb_dir: str) -> Dict[str, str]:
    """label -> label_name over the parts (one streaming pass over two small columns)."""
    out: Dict[str, str] = {}
    for batch in iter_embedding_batches(emb_dir, 1 << 16, columns=["label", "label_name"]):
        for lab, name in zip(batch.column("label").to_pylist(), batch.column("label_name").to_pylist()):
            out.setdefault(str(lab), name)
    return out


def encoder_info(emb_dir: str) -> Dict[str, Any]:
    """Encoder facts from the embeddings `_manifest.json` (name, image_size, preprocessing) when present."""
    url = storage.join(emb_dir, MANIFEST_NAME)
    if not storage.exists(url):
        return {}
    try:
        m = storage.read_json(url)
    except Exception as e:  # a broken side file must not block a build; the vectors are what matter
        log.warning("cannot read %s (%s): manifest will carry no encoder info", url, e)
        return {}
    enc = m.get("encoder", {})
    info = dict(enc) if isinstance(enc, dict) else {"name": enc}
    for k in ("image_size", "preprocessing", "preprocess", "dim", "pretrained"):
        if k in m and k not in info:
            info[k] = m[k]
    return info


def query_vectors(cfg, emb_dir: str, n: int, dim: int, train_pos: np.ndarray) -> Tuple[np.ndarray, str]:
    """Held-out recall queries: the `index.recall_split` embeddings if present, else base rows not trained on."""
    nq = int(cfg.index.recall_queries)
    rng = np.random.default_rng(SEED + 1)
    split = cfg.index.recall_split
    if split:
        qdir = cfg.embeddings_dir(split)
        if qdir.rstrip("/") != emb_dir.rstrip("/") and part_urls(qdir):
            try:
                q_ids, qdim, _ = scan_inputs(qdir)
                if qdim == dim:
                    pos = rng.choice(len(q_ids), size=min(nq, len(q_ids)), replace=False)
                    return gather_rows(qdir, pos, cfg.index.build_batch_rows)[0], f"split {split}"
            except UserError as e:
                log.warning("recall split %s unusable (%s): using base vectors", split, e)
    rest = np.setdiff1d(np.arange(n), train_pos)
    pool = rest if len(rest) >= min(nq, n) else np.arange(n)
    pos = rng.choice(pool, size=min(nq, len(pool)), replace=False)
    return gather_rows(emb_dir, pos, cfg.index.build_batch_rows)[0], "base vectors not in the training sample"


# ---------------------------------------------------------------- shard population (Ray task body)

def populate_shard(memory_dir: str, version: int, shard: int, num_shards: int, trained_url: str,
                   trained_sha: str, emb_dir: str, batch_rows: int,
                   exclude: Optional[np.ndarray] = None, rerank_dtype: Optional[str] = None) -> Dict[str, Any]:
    """Fill one shard (ids with id % num_shards == shard, minus `exclude`) from the trained index; write it;
    return its entry. With `rerank_dtype` the shard also gets its re-rank vectors file (stored as that dtype)."""
    index = read_index(trained_url, trained_sha, mmap=False)
    metas, vecs = [], []
    exclude = np.zeros(0, np.int64) if exclude is None else exclude
    for batch in iter_embedding_batches(emb_dir, batch_rows):
        ids = batch.column("id").to_numpy()
        mask = (tr.shard_of(ids, num_shards) == shard) & ~np.isin(ids, exclude)
        sub = batch.filter(pa.array(mask))
        if sub.num_rows == 0:
            continue
        xb = embeddings_of(sub)
        tr.add_vectors(index, xb, sub.column("id").to_numpy())
        metas.append(sub.drop_columns(["embedding"]))
        if rerank_dtype:
            vecs.append(xb.astype(rerank_dtype))  # kept in the stored dtype: half the RAM for float16
    meta = pa.concat_tables(metas) if metas else schema(index.d).empty_table().drop_columns(["embedding"])
    vectors = None
    if rerank_dtype:
        vectors = np.concatenate(vecs) if vecs else np.zeros((0, index.d), rerank_dtype)
    entry = save_shard(memory_dir, version, shard, index, meta, vectors=vectors,
                       rerank_dtype=rerank_dtype or "float32")
    done = {"entry": entry.__dict__, "trained_sha256": trained_sha, "rerank_dtype": rerank_dtype,
            "node": _node_id()}
    storage.atomic_write_json(storage.join(memory_dir, _done_path(version, shard)), done)
    return entry.__dict__


def _node_id() -> Optional[str]:
    """The Ray node this task runs on (kept in the shard's done file: which node of a cluster built it)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _size(url: str) -> int:
    fs, path = storage.filesystem(url)
    return int(fs.info(path)["size"])


def _done_path(version: int, shard: int) -> str:
    return f"shards/{version_name(version)}/shard-{int(shard):03d}.done.json"


def _plan_path(version: int) -> str:
    return f"shards/{version_name(version)}/_build.json"


def _finished(memory_dir: str, version: int, shard: int, trained_sha: str,
              rerank_dtype: Optional[str] = None) -> Optional[ShardEntry]:
    """The entry of an already-populated shard (same trained index, same re-rank file dtype or none) whose
    files still match their checksums, else None."""
    url = storage.join(memory_dir, _done_path(version, shard))
    if not storage.exists(url):
        return None
    try:
        done = storage.read_json(url)
        if done.get("trained_sha256") != trained_sha or done.get("rerank_dtype") != rerank_dtype:
            return None
        e = ShardEntry(**done["entry"])
        for rel, sha in e.files():
            verify(storage.join(memory_dir, rel), sha)
        return e
    except (UserError, ValueError, KeyError, TypeError) as err:
        log.info("shard %d of %s will be rebuilt (%s)", shard, version_name(version), err)
        return None


# ---------------------------------------------------------------- the build

def _train_or_resume(cfg, store: ManifestStore, version: int, fingerprint: str, key: str, n: int, dim: int,
                     train_pos: np.ndarray, emb_dir: str, rerank_dtype: Optional[str] = None) -> Tuple[str, str, str]:
    """(trained path rel, sha256, trainer); reuses the trained index of an interrupted build of the same inputs.

    The build plan (`_build.json`) also records `rerank_dtype` (None = shards without re-rank files), which
    the shard population reads."""
    plan_url = store.url(_plan_path(version))
    if storage.exists(plan_url):
        try:
            p = storage.read_json(plan_url)
            if p["fingerprint"] == fingerprint and p["index_key"] == key and p["metric"] == cfg.index.metric:
                verify(store.url(p["trained_path"]), p["trained_sha256"])
                log.info("resuming build of %s: reusing trained index %s", version_name(version), p["trained_path"])
                if p.get("rerank_dtype") != rerank_dtype:
                    storage.atomic_write_json(plan_url, {**p, "rerank_dtype": rerank_dtype})
                return p["trained_path"], p["trained_sha256"], p.get("trainer", "?")
        except (UserError, KeyError, ValueError) as e:
            log.info("previous build plan not reusable (%s): training again", e)
    with phase(f"index: train {key} on {len(train_pos):,} vectors"):
        xt, _ = gather_rows(emb_dir, train_pos, cfg.index.build_batch_rows)
        index, trainer = tr.train_index(xt, key, cfg.index.metric, gpu=cfg.index.gpu,
                                        budget_bytes=parse_bytes(cfg.index.max_index_memory),
                                        # one list needs no autofaiss search: faiss trains it directly
                                        prefer_autofaiss=not cfg.index.index_key and not key.startswith("IVF1,"))
    data = tr.serialize(index)
    sha = sha256_bytes(data)
    rel = f"trained/{sha}.index"
    storage.atomic_write_bytes(store.url(rel), data)
    storage.atomic_write_json(plan_url, {"fingerprint": fingerprint, "index_key": key, "metric": cfg.index.metric,
                                         "trained_path": rel, "trained_sha256": sha, "trainer": trainer,
                                         "num_shards": cfg.index.num_shards, "n": n, "dim": dim,
                                         "rerank_dtype": rerank_dtype})
    return rel, sha, trainer


def _populate_all(cfg, store: ManifestStore, version: int, trained_rel: str, trained_sha: str,
                  emb_dir: str, exclude: np.ndarray) -> List[ShardEntry]:
    import ray
    from tqdm import tqdm

    rerank_dtype = storage.read_json(store.url(_plan_path(version))).get("rerank_dtype")
    S = int(cfg.index.num_shards)
    entries: Dict[int, ShardEntry] = {}
    for s in range(S):
        e = _finished(store.memory_dir, version, s, trained_sha, rerank_dtype)
        if e is not None:
            entries[s] = e
    if entries:
        log.info("resuming: %d of %d shards already built and verified", len(entries), S)
    task = ray.remote(num_cpus=1)(populate_shard)
    ex_ref = ray.put(exclude)
    pending = [task.remote(store.memory_dir, version, s, S, store.url(trained_rel), trained_sha, emb_dir,
                           int(cfg.index.build_batch_rows), ex_ref, rerank_dtype) for s in range(S) if s not in entries]
    with tqdm(total=S, initial=len(entries), desc="populate shards", unit="shard") as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            d = ray.get(ready[0])
            entries[d["shard"]] = ShardEntry(**d)
            bar.update(1)
    return [entries[s] for s in range(S)]


def choose_key(cfg, n: int, dim: int, scan_ms: Optional[float] = None, sample=None) -> IndexChoice:
    """The index a build of n x dim uses under this config, and why (see `pipeline.index.keys`); with
    `sample` (vectors, or a function reading them) an IVF memory's code is measured among the candidates."""
    budget = parse_bytes(cfg.index.max_index_memory)
    train_n = min(n, int(cfg.index.train_sample))
    auto = None if cfg.index.index_key else autofaiss_key(n, dim, budget)
    return choose_index(auto, n, dim, budget, float(cfg.index.max_latency_ms), train_n=train_n,
                        explicit_key=cfg.index.index_key, rerank=cfg.index.rerank, scan_ms=scan_ms,
                        sample=sample, target=float(cfg.index.target_recall), K=vote_depths(cfg, n)[0],
                        metric=cfg.index.metric, gpu=bool(cfg.index.gpu))


def vote_depths(cfg, n: int) -> Tuple[int, List[int]]:
    """(K, ks): the vote depths this memory serves (memory.k and eval.ks, at most n) and K, the deepest."""
    ks = sorted({min(int(k), n) for k in [cfg.memory.k, *cfg.eval.ks] if int(k) > 0})
    return ks[-1], ks


def check_fits(cfg, key: str, n: int, dim: int) -> int:
    """Bytes one shard searcher needs; UserError with the numbers when it exceeds `index.memory_per_node`."""
    cost = key_cost(key, dim, cfg.index.metric)
    need = bytes_per_shard(cost, n, cfg.index.num_shards)
    have = parse_bytes(cfg.index.memory_per_node)
    if need > have:
        shards = math.ceil(n * cost.bytes_per_item / max(have - cost.fixed_bytes, 1))
        raise UserError(
            f"the memory will not fit: {n:,} items x {cost.bytes_per_item} B ({key}) over {cfg.index.num_shards} "
            f"shard(s) = {format_bytes(need)} per shard, but index.memory_per_node is {format_bytes(have)}; "
            f"use index.num_shards >= {shards} or a smaller code (index.max_index_memory / index.index_key)")
    return need


def build_index(cfg, split: str = "train", exclude: Optional[np.ndarray] = None,
                 commit_guard=None) -> Manifest:
    """Build a new memory version from the `split` embeddings, leaving out the ids in `exclude` (the memory
    layer passes its forget list); returns the committed manifest. Callers that keep a memory's state use
    `pipeline.memory.build.build_memory`, which also keeps deletions and adds across rebuilds; this function
    alone knows nothing of a memory's state."""
    from pipeline.runtime import init_ray

    init_ray(cfg)  # also exports the storage settings to Ray workers
    t_start = time.perf_counter()
    emb_dir = cfg.embeddings_dir(split)
    store = ManifestStore(cfg.memory_dir)
    timings: Dict[str, float] = {}
    with phase("index: scan embeddings") as ph:
        ids, dim, fingerprint = scan_inputs(emb_dir)
    timings["scan_s"] = ph["seconds"]
    exclude = np.unique(np.asarray(exclude if exclude is not None else [], np.int64))
    excluded = int(np.isin(ids, exclude).sum())
    if excluded:
        fingerprint = hashlib.sha256((fingerprint + exclude.tobytes().hex()).encode()).hexdigest()
        log.info("leaving out %s deleted item(s) that the embeddings still hold", f"{excluded:,}")
    n = len(ids) - excluded
    if n < int(cfg.index.num_shards):
        raise UserError(f"{n} items cannot fill index.num_shards={cfg.index.num_shards} shards")
    live_pos = np.flatnonzero(~np.isin(ids, exclude))
    choice = choose_key(cfg, n, dim, sample=lambda: gather_rows(  # read only if the choice is measured
        emb_dir, np.random.default_rng(SEED + 2).choice(live_pos, min(n, MEASURE_SAMPLE), replace=False),
        cfg.index.build_batch_rows)[0])
    key = choice.key
    need = check_fits(cfg, key, n, dim)
    log.info("index %s for %s x %d (%s per shard, re-rank %s): %s", key, f"{n:,}", dim, format_bytes(need),
             f"on, {cfg.index.rerank_dtype} vectors on disk" if choice.rerank else "off", choice.reason)
    rerank_dtype = cfg.index.rerank_dtype if choice.rerank else None

    version = store.next_version()
    parent = store.current_version()
    rng = np.random.default_rng(SEED)
    pool = np.flatnonzero(~np.isin(ids, exclude))  # deleted items never shape the quantizer
    train_pos = np.sort(rng.choice(pool, size=min(n, int(cfg.index.train_sample)), replace=False))
    t0 = time.perf_counter()
    trained_rel, trained_sha, trainer = _train_or_resume(cfg, store, version, fingerprint, key, n, dim,
                                                         train_pos, emb_dir, rerank_dtype)
    timings["train_s"] = time.perf_counter() - t0
    with phase(f"index: populate {cfg.index.num_shards} shards") as ph:
        marker = mark_writing(store.memory_dir, version_name(version))  # sweeps keep it until we commit
        shards = _populate_all(cfg, store, version, trained_rel, trained_sha, emb_dir, exclude)
    timings["populate_s"] = ph["seconds"]
    if sum(s.count for s in shards) != n:
        raise DataError(f"shards hold {sum(s.count for s in shards)} items, the embeddings {n}: inputs changed "
                        f"during the build? re-run `vmem build`")

    manifest = Manifest(version=version, parent=parent, shards=shards, index_key=key, dim=dim,
                        metric=cfg.index.metric, trained_path=trained_rel, trained_sha256=trained_sha, nprobe=1,
                        encoder=encoder_info(emb_dir),
                        build={"split": split, "trainer": trainer, "fingerprint": fingerprint,
                               "train_sample": len(train_pos), "items": n, "excluded": excluded,
                               "label_names": label_names(emb_dir), "index_choice": choice.to_dict()})
    with phase("index: measure recall vs exact search") as ph:
        rows, chosen, status, qsource = measure_recall(cfg, manifest, emb_dir, len(ids), dim, n, train_pos,
                                                       exclude)
    timings["recall_s"] = ph["seconds"]
    manifest.nprobe, manifest.rerank_k, manifest.recall = int(chosen["nprobe"]), int(chosen["rerank_k"]), rows
    index_bytes = sum(_size(store.url(s.path)) for s in shards)
    disk_bytes = sum(_size(store.url(rel)) for s in shards for rel, _ in s.files())
    timings["total_s"] = time.perf_counter() - t_start
    manifest.build.update({"recall_queries": qsource, "timings": timings, "index_bytes": int(index_bytes),
                           "bytes_per_item": index_bytes / max(n, 1), "disk_bytes": int(disk_bytes),
                           "disk_bytes_per_item": disk_bytes / max(n, 1), "recall_status": status,
                           "recall_at": int(chosen["K"]), "recall": float(chosen["recall"]),
                           "vote_agree": float(chosen["vote_agree"])})
    # `commit_guard(manifest)`: a context the caller holds across the commit (the memory layer re-checks its
    # forget list there, holding its erasure lease, for items deleted while this build ran).
    with (commit_guard(manifest) if commit_guard is not None else contextlib.nullcontext()):
        store.commit(manifest, renumber=True)
    storage.remove(marker)
    if manifest.version != version:  # another writer took the number; the shard files stay where they are
        log.warning("version %d was taken by another writer: committed as %d", version, manifest.version)
    log.info("memory %s committed: %s items in %d shards, %s, nprobe %d, rerank_k %d (%s)",
             version_name(manifest.version), f"{n:,}", len(shards), key, manifest.nprobe, manifest.rerank_k, status)
    return manifest


def measure_recall(cfg, manifest: Manifest, emb_dir: str, n: int, dim: int,
                   n_live: int, train_pos: np.ndarray, exclude: Optional[np.ndarray] = None,
                   ) -> Tuple[List[Dict[str, float]], Dict[str, float], str, str]:
    """Settings table of the (uncommitted) shards on held-out queries, the chosen row, its status, the query
    source. UserError when `index.strict_recall` is set and no setting reaches `index.target_recall`.
    `n` counts the parts' rows (query positions), `n_live` the items the shards hold (`exclude` left out)."""
    from pipeline.index.router import Router

    xq, source = query_vectors(cfg, emb_dir, n, dim, train_pos)
    K, ks = vote_depths(cfg, n_live)
    exclude = np.zeros(0, np.int64) if exclude is None else exclude
    live = ((x[keep], i[keep]) for x, i in vector_batches(emb_dir, cfg.index.build_batch_rows)
            for keep in [~np.isin(i, exclude)])
    _, gt = exact_knn(xq, live, K, cfg.index.metric)
    router = Router(cfg.memory_dir, manifest=manifest, use_ray=False)
    gt_labels = router.lookup(gt.ravel())["labels"].reshape(gt.shape)
    nlist = key_cost(manifest.index_key, dim, cfg.index.metric).nlist
    has_vectors = all(s.vectors_path for s in manifest.shards)
    ladder = rerank_ladder(K, -(-n_live // manifest.num_shards), has_vectors, int(cfg.index.rerank_k))

    def search(q, kk, nprobe, rerank_k):
        r = router.search(q, kk, nprobe=nprobe, rerank_k=rerank_k)
        return r.I, r.labels

    rows = settings_table(search, xq, gt, gt_labels, nlist, ladder, ks, target=cfg.index.target_recall,
                          k_latency=min(int(cfg.memory.k), n_live))
    chosen, status = choose_setting(rows, cfg.index.target_recall, cfg.index.max_latency_ms,
                                    strict=bool(cfg.index.strict_recall))
    chosen["chosen"] = True
    log.info("recall on %d queries (%s), K = %d:\n%s", len(xq), source, K, format_table(rows))
    return rows, chosen, status, source
