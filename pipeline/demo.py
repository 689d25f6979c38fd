"""`vmem demo`: the whole pipeline on the embedded default config, printing what a new user wants to see.

Fashion-MNIST -> WebDataset shards -> Ray embedding stage -> sharded IVF-PQ memory -> classify the test split
through the Ray router (exact search beside it) -> neighbours, explain, add, delete, compact, evaluate.
Every stage resumes, so a second run reuses what the first one wrote. Returns the headline figures.
"""
from __future__ import annotations

import time

import numpy as np

from pipeline import storage
from pipeline.config import Config
from pipeline.runtime import init_ray


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 72 - len(text)), flush=True)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms"


def _current_memory(cfg: Config, split: str):
    """The committed manifest if it was built from exactly the current `split` embeddings with the configured
    shard count, else None."""
    from pipeline.index.build import scan_inputs
    from pipeline.index.manifest import ManifestStore

    store = ManifestStore(cfg.memory_dir)
    if store.current_version() is None:
        return None
    manifest = store.load()
    _, _, fingerprint = scan_inputs(cfg.embeddings_dir(split))
    same = manifest.build.get("fingerprint") == fingerprint and manifest.num_shards == cfg.index.num_shards
    return manifest if same else None


def _write_samples(cfg: Config, split: str, xq: np.ndarray, n: int) -> list:
    """Write the first `n` query images and their vectors under <workdir>/samples, to try the other commands on."""
    import io
    import itertools

    from pipeline.data.shards import iter_split_samples

    folder = storage.join(cfg.workdir, "samples")
    images = []
    for i, sample in enumerate(itertools.islice(iter_split_samples(cfg.shards_dir(split)), n)):
        storage.atomic_write_bytes(storage.join(folder, f"{split}-{i}.{sample['image_format']}"), sample["image"])
        images.append(sample["image"])
    buf = io.BytesIO()
    np.save(buf, xq[:n])
    storage.atomic_write_bytes(storage.join(folder, "queries.npy"), buf.getvalue())
    return images


def run_demo(cfg: Config) -> dict:
    from pipeline.data.shards import write_shards
    from pipeline.embed.parts import embeddings_of, read_embeddings
    from pipeline.embed.stage import embed_split
    from pipeline.eval.accuracy import evaluate
    from pipeline.memory.build import build_memory
    from pipeline.index.recall import format_table
    from pipeline.memory import VisualMemory

    t_start = time.perf_counter()
    train, test = "train", cfg.eval.split
    k = cfg.demo.k

    _banner("1/6 WebDataset shards")
    for split in (train, test):
        print(write_shards(cfg, split).summary(), flush=True)

    _banner(f"2/6 embed with {cfg.embed.encoder} on Ray Data")
    init_ray(cfg)
    for split in (train, test):
        print(embed_split(cfg, split).summary(), flush=True)

    _banner(f"3/6 sharded memory ({cfg.index.num_shards} shards)")
    manifest = _current_memory(cfg, train)
    if manifest is None:
        manifest = build_memory(cfg, train)  # logs the recall table as it measures it
    else:
        print(f"memory v{manifest.version} is up to date with the {train} embeddings: reusing it")
        print(format_table(manifest.recall, manifest.nprobe))
    print(f"memory v{manifest.version}: {manifest.count:,} items x {manifest.dim}-d in {manifest.num_shards} "
          f"shards, index {manifest.index_key}, nprobe {manifest.nprobe}")

    _banner("4/6 classify the test split through the router (ANN) and by exact kNN")
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg, use_ray=True)
    q = read_embeddings(cfg.embeddings_dir(test), ["key", "label", "label_name", "embedding"])
    xq, yq = embeddings_of(q), q.column("label").to_numpy()
    table = evaluate(cfg, mem.snapshot())
    print(table.format())
    ann, exact = table.get("plurality", k, "ann"), table.get("plurality", k, "exact")
    print(f"\ntop-1 on {len(yq):,} Fashion-MNIST {test} images, k={k} plurality: "
          f"ANN (router, {manifest.num_shards} shards) {ann:.4f} | exact kNN {exact:.4f} | "
          f"difference {100 * (exact - ann):+.2f} points")
    print(f"accuracy table and plot: {storage.join(cfg.workdir, 'eval')}/accuracy.csv, accuracy.png")

    print("\nexamples (query -> nearest memories):")
    keys, names = q.column("key").to_pylist(), q.column("label_name").to_pylist()
    for i, pred in enumerate(mem.classify(embeddings=xq[: cfg.demo.examples], k=k)):
        print(f"  {keys[i]} (true: {names[i]}) -> predicted {pred.label_name}")
        for nb in pred.neighbors[:3]:
            print(f"      {nb.key:28s} {nb.label_name:12s} distance {nb.distance:.3f}  weight {nb.weight:.2f}")

    _banner("5/6 explain, add, delete")
    samples = _write_samples(cfg, test, xq, 3)
    sheet = storage.join(cfg.workdir, "explain.png")
    pred = mem.explain(image=samples[0], k=k, out=sheet)
    print(f"explain {keys[0]}: predicted {pred.label_name}; votes "
          + ", ".join(f"{c}={s:.0f}" for c, s in sorted(pred.scores.items(), key=lambda kv: -kv[1]) if s > 0)
          + f"; sheet written to {sheet}")

    # Add the first test images as new memories: each becomes its own nearest neighbour at once.
    n_add = min(20, len(yq))
    run = time.strftime("%Y%m%dT%H%M%S")  # deletion is final, so each demo run adds under new keys
    add_keys = [f"demo-added/{run}/{key}" for key in keys[:n_add]]
    t0 = time.perf_counter()
    added = [mem.add(embeddings=xq[i:i + 1], labels=[int(yq[i])], keys=[add_keys[i]], sources=["demo"])[0]
             for i in range(n_add)]
    t_add = (time.perf_counter() - t0) / n_add
    top = mem.search(embeddings=xq[:1], k=1).I[0, 0]
    print(f"add: {n_add} items, {_ms(t_add)} per item; the next query's nearest memory is the added item: "
          f"{top == added[0]}")
    t0 = time.perf_counter()
    for i in added:
        mem.delete(ids=[i])
    t_del = (time.perf_counter() - t0) / n_add
    hits = np.isin(mem.search(embeddings=xq[:n_add], k=k).I, added).sum()
    print(f"delete: {n_add} items, {_ms(t_del)} per item; deleted ids returned by the next queries: {hits}")
    report = mem.compact(force=True)
    if report:
        erasure = report.get("erasure")
        verified = erasure.get("verified") if isinstance(erasure, dict) else erasure  # "deferred: ..." when it waits
        print(f"compact: memory v{report['version']} written in {report['seconds']:.2f} s; {report['erased_ids']} "
              f"deleted ids erased, verified absent from every file that held them: {verified}")

    _banner("6/6 summary")
    stats = mem.stats()
    print(f"memory v{stats['version']}: {stats['live_items']:,} live items in {stats['shards']} shards, "
          f"{stats['forgotten_pending_erasure']} deleted item(s) waiting for erasure, {stats['delta_items']} in the delta")
    print(f"top-1 (k={k}, plurality): ANN {ann:.4f}, exact {exact:.4f}; demo finished in "
          f"{time.perf_counter() - t_start:.0f} s")
    print(f"query images and vectors to try the other commands on: {storage.join(cfg.workdir, 'samples')}/ "
          f"(e.g. `vmem classify {storage.join(cfg.workdir, 'samples', 'test-0.png')}`)")
    mem.close()
    return {"ann": ann, "exact": exact, "add_visible": bool(top == added[0]), "deleted_returned": int(hits),
            "compaction": report, "stats": stats, "recall": manifest.recall, "nprobe": manifest.nprobe,
            "index_key": manifest.index_key}
