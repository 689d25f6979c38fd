"""Capacity planning: how much RAM a memory needs and how many shards / nodes hold it.

Formula (the same estimate `build_index` uses to refuse builds that cannot fit):

  cost(key)        = faiss code size of `key` + 8 bytes of id per item  (= bytes_per_item)
                     + fixed bytes per shard: nlist*d*4 centroids, quantizer graph, OPQ matrix, list heads
  total RAM        = items * bytes_per_item + fixed                       (one copy of the quantizer)
  usable per node  = ram_per_node * HEADROOM  (HEADROOM = 0.75: the rest is for the OS, Ray, query buffers)
  nodes            = ceil((items * bytes_per_item) / (usable - fixed))
  shards           = max(requested shards, nodes), rounded up to a multiple of nodes; each shard carries its
                     own copy of the quantizer, so per-shard RAM = ceil(items / shards) * bytes_per_item + fixed.

Without `index_key` the key is `pipeline.index.keys.choose_index`'s (one list when a scan fits half the
latency budget, else autofaiss's choice under `max_memory` passed through the IVF rule); without `max_memory`
the budget is 1/32 of the float32 size (items * dim / 8 bytes), the usual operating point of IVF-PQ at scale.

Every other process (`processes()`): an ingress / router / CLI process holds no per-item state: the manifest,
the pending edits (the delta's vectors and metadata, up to `delta_items` before compaction folds them, and the
ids deleted but not yet erased) and a router of `shards` handles; shard metadata is memory-mapped by the
shard searchers. The build driver holds the ids of every embedding row (8 bytes each, twice while it checks
for duplicates and deletions) and the training sample (`train_sample * dim * 4`). The item table (Lance, on
disk) keeps ~`ITEM_ROW_BYTES` of metadata per item.

Disk (not RAM): with re-ranking (on for lossy codes unless `rerank="false"`) every item's vector is stored
once more in its shard's re-rank file, dim * 4 (float32) or dim * 2 (float16) bytes, memory-mapped by the
searchers: the OS page cache keeps the hot part, the rest stays on disk.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from pipeline.errors import UserError
from pipeline.index.keys import autofaiss_key, choose_index, key_cost
from pipeline.index.units import format_bytes, parse_bytes, parse_count

HEADROOM = 0.75
ITEM_ROW_BYTES = 120  # id, key, label, label name, source, tar URL of one item-table row (measured ~100-140)
DELTA_META_BYTES = 300  # Python dict of one delta item's metadata, beside its vector
INGRESS_FIXED = 400 << 20  # Python + Ray + FastAPI + faiss + Lance in one ingress replica (measured ~300-450 MiB)


@dataclass
class Plan:
    items: int
    dim: int
    index_key: str
    bytes_per_item: int
    fixed_bytes: int
    total_bytes: int
    ram_per_node: int
    num_shards: int
    nodes: int
    bytes_per_shard: int
    rerank: bool = False
    disk_bytes_per_item: int = 0  # re-rank vectors on disk (memory-mapped), not RAM
    total_disk_bytes: int = 0
    ingress_bytes: int = 0  # one ingress / router process: fixed + pending edits, nothing per item
    driver_bytes: int = 0  # the build driver
    item_table_bytes: int = 0  # the Lance item table on disk

    def table(self) -> str:
        rows = [
            ("items", f"{self.items:,}"), ("dim", str(self.dim)), ("index key", self.index_key),
            ("bytes per item", f"{self.bytes_per_item} (code + 8-byte id)"),
            ("fixed per shard", format_bytes(self.fixed_bytes) + " (quantizer, transforms)"),
            ("total RAM", format_bytes(self.total_bytes)),
            ("RAM per node", f"{format_bytes(self.ram_per_node)} ({HEADROOM:.0%} usable)"),
            ("shards", str(self.num_shards)), ("RAM per shard", format_bytes(self.bytes_per_shard)),
            ("nodes", str(self.nodes)),
            ("re-rank", "on: exact similarities from vectors on disk" if self.rerank else "off"),
            ("disk per item", f"{self.disk_bytes_per_item} (re-rank vectors, memory-mapped)"),
            ("total disk", format_bytes(self.total_disk_bytes)),
            ("ingress/router RAM", format_bytes(self.ingress_bytes) + " per process (no per-item state; pending "
                                                                       "edits only)"),
            ("build driver RAM", format_bytes(self.driver_bytes) + " (ids of every row + training sample)"),
            ("item table disk", format_bytes(self.item_table_bytes) + f" (~{ITEM_ROW_BYTES} B/item, Lance)"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(items, dim: int, ram_per_node, index_key: Optional[str] = None, max_memory=None,
                num_shards: int = 1, metric: str = "ip", rerank: str = "auto", rerank_dtype: str = "float32",
                max_latency_ms: float = 50.0, delta_items: int = 100000, pending_deletes: int = 1000000,
                train_sample: int = 100000) -> Plan:
    """Estimate RAM, disk, shards and nodes for `items` vectors of `dim` (sizes may be human strings)."""
    from pipeline.index.rerank import dtype_bytes

    n, d = parse_count(items), int(dim)
    ram = parse_bytes(ram_per_node)
    if n <= 0 or d <= 0:
        raise UserError(f"items and dim must be > 0, got items={n}, dim={d}")
    budget = parse_bytes(max_memory) if max_memory is not None else n * d // 8
    choice = choose_index(None if index_key else autofaiss_key(n, d, budget), n, d, budget, max_latency_ms,
                          explicit_key=index_key, rerank=rerank)
    key = choice.key
    cost = key_cost(key, d, metric)
    usable = ram * HEADROOM
    if usable <= cost.fixed_bytes + cost.bytes_per_item:
        raise UserError(f"{format_bytes(ram)} per node cannot hold even the quantizer of {key} "
                        f"({format_bytes(cost.fixed_bytes)}); use more RAM per node or fewer lists")
    nodes = max(1, math.ceil(n * cost.bytes_per_item / (usable - cost.fixed_bytes)))
    shards = max(int(num_shards), nodes)
    shards = math.ceil(shards / nodes) * nodes
    per_shard = cost.total(math.ceil(n / shards))
    disk = d * dtype_bytes(rerank_dtype) if choice.rerank else 0
    ingress = INGRESS_FIXED + delta_items * (4 * d + 8 + DELTA_META_BYTES) + 8 * pending_deletes
    driver = 16 * n + min(n, train_sample) * d * 4
    return Plan(n, d, key, cost.bytes_per_item, cost.fixed_bytes, n * cost.bytes_per_item + cost.fixed_bytes,
                ram, shards, nodes, per_shard, choice.rerank, disk, n * disk, ingress, driver, n * ITEM_ROW_BYTES)
