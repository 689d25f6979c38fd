"""`vmem` subcommands of the index layer: build, plan, query."""
from __future__ import annotations

import argparse

from pipeline.commands.inputs import load_vectors, positive_int
from pipeline.commands.registry import command
from pipeline.config import Config


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="train", help="embeddings split to build the memory from (default train)")


@command("build", "train the index, populate the shards on Ray (deleted items left out), measure recall, commit vN",
         "vmem build --config configs/demo.yaml index.num_shards=2", _build_args)
def cmd_build(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline.index.recall import format_table
    from pipeline.memory.build import build_memory
    from pipeline.index.units import format_bytes

    m = build_memory(cfg, args.split)
    print(f"memory v{m.version}: {m.count:,} items x {m.dim}-d in {m.num_shards} shards, {m.index_key}, "
          f"{format_bytes(m.build.get('index_bytes', 0))} ({m.build.get('bytes_per_item', 0):.1f} B/item)")
    choice = m.build.get("index_choice", {})
    print(f"index choice: {choice.get('kind', '?')}: {choice.get('reason', '')}")
    if m.rerank_k:
        print(f"re-rank: {m.rerank_k} candidates per shard, exact similarities from "
              f"{format_bytes(m.build.get('disk_bytes', 0))} on disk ({m.build.get('disk_bytes_per_item', 0):.1f} "
              f"B/item with index and metadata)")
    print(f"recall vs exact search ({m.build.get('recall_queries')}), {m.build.get('recall_status', '')}:")
    print(format_table(m.recall, m.nprobe))
    return 0


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", required=True, help="number of items, e.g. 1e9 or 5M")
    p.add_argument("--dim", required=True, type=positive_int, help="vector dimension")
    p.add_argument("--ram-per-node", required=True, help="RAM of one node, e.g. 256GiB")
    p.add_argument("--index-key", default=None, help="faiss key (default: autofaiss's choice + the IVF rule)")
    p.add_argument("--max-memory", default=None, help="index memory budget (default: 1/32 of float32 size)")
    p.add_argument("--shards", type=positive_int, default=1, help="minimum number of shards")
    p.add_argument("--nodes", type=positive_int, default=None, help="nodes the measured costs are spread over "
                                                                   "(default: the plan's)")
    p.add_argument("--cores-per-node", type=positive_int, default=32, help="cores per node (default 32)")
    p.add_argument("--measured", default=None, help="benchmarks/scale.py results JSON (default: the committed "
                                                    "benchmarks/results/scale.json; 'none' = formula only)")


@command("plan", "estimate index key, bytes per item, RAM, shards and nodes for a memory of a given size",
         "vmem plan --items 1e9 --dim 1024 --ram-per-node 256GiB", _plan_args)
def cmd_plan(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline.index.plan import MEASURED_PATH, plan_memory

    measured = None if args.measured == "none" else args.measured or MEASURED_PATH
    p = plan_memory(args.items, args.dim, args.ram_per_node, index_key=args.index_key,
                    max_memory=args.max_memory, num_shards=args.shards, metric=cfg.index.metric,
                    rerank=cfg.index.rerank, rerank_dtype=cfg.index.rerank_dtype,
                    max_latency_ms=cfg.index.max_latency_ms, measured=measured, n_nodes=args.nodes,
                    cores_per_node=args.cores_per_node)
    print(p.table())
    return 0


def _query_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--image", nargs="+", help="image file(s) to embed with the memory's encoder and search")
    g.add_argument("--vectors", help=".npy file of (n, dim) query vectors")
    p.add_argument("-k", "--k", type=positive_int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--nprobe", type=positive_int, default=None, help="lists to probe (default: the manifest's)")
    p.add_argument("--version", type=positive_int, default=None, help="memory version (default: CURRENT)")


@command("query", "k nearest items (ids, scores, labels, keys) of images or vectors in the memory",
         "vmem query --config configs/demo.yaml --vectors queries.npy -k 5", _query_args)
def cmd_query(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.memory.memory import VisualMemory

    storage.configure(cfg.storage)
    # Through the memory, not the bare router: deletions, adds and relabels apply here as everywhere else.
    mem = VisualMemory.open(cfg.memory_dir, version=args.version, cfg=cfg)
    if args.vectors:
        xq = load_vectors(args.vectors, mem.dim)
        names = [f"{args.vectors}[{i}]" for i in range(len(xq))]
        res = mem.search(embeddings=xq, k=args.k, nprobe=args.nprobe)
    else:
        names = list(args.image)
        res = mem.search(images=names, k=args.k, nprobe=args.nprobe)
    for q, name in enumerate(names):
        print(f"{name}:")
        for r in range(res.I.shape[1]):
            if res.I[q, r] < 0:
                continue
            print(f"  {r + 1:>3}. id={res.I[q, r]:<20d} score={res.D[q, r]:.4f}  label={res.labels[q, r]} "
                  f"({res.label_names[q, r]})  key={res.keys[q, r]}")
    mem.close()
    return 0
