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

Measured figures (`measured_costs`, shown by `vmem plan` under the estimate): `benchmarks/scale.py` runs one
memory at 100k, 1M (and 10M) items through the real commands and records, per step, wall time, peak RSS of
each process and disk bytes per item in `benchmarks/results/scale.json` (with the machine, date and commit).
For each figure the plan fits cost = fixed + per_item * items through the two largest sizes measured (one size:
per item only) and evaluates it at the plan's size, spreading the per-item work of the parallel steps (build,
compaction) over the plan's nodes x cores. Every row says whether its value is measured (the plan's size was
measured) or extrapolated, and from which sizes: a straight line from 1M to 1B is a claim, not a measurement.

Disk (not RAM): with re-ranking (on for lossy codes unless `rerank="false"`) every item's vector is stored
once more in its shard's re-rank file, dim * 4 (float32) or dim * 2 (float16) bytes, memory-mapped by the
searchers: the OS page cache keeps the hot part, the rest stays on disk.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from pipeline.errors import UserError
from pipeline.index.keys import autofaiss_key, choose_index, key_cost
from pipeline.index.units import format_bytes, parse_bytes, parse_count

HEADROOM = 0.75
ITEM_ROW_BYTES = 120  # id, key, label, label name, source, tar URL of one item-table row (measured ~100-140)
DELTA_META_BYTES = 300  # Python dict of one delta item's metadata, beside its vector
INGRESS_FIXED = 400 << 20  # Python + Ray + FastAPI + faiss + Lance in one ingress replica (measured ~300-450 MiB)
# The scale benchmark's committed figures (absent from an installed wheel: the plan then shows the formula only)
MEASURED_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "benchmarks", "results", "scale.json")


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
    measured: Optional[dict] = None  # `measured_costs` at this plan's size (None: no figures found)

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
        text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
        return text + ("\n\n" + format_measured(self.measured) if self.measured else "")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(items, dim: int, ram_per_node, index_key: Optional[str] = None, max_memory=None,
                num_shards: int = 1, metric: str = "ip", rerank: str = "auto", rerank_dtype: str = "float32",
                max_latency_ms: float = 50.0, delta_items: int = 100000, pending_deletes: int = 1000000,
                train_sample: int = 100000, measured: Optional[str] = MEASURED_PATH, n_nodes: Optional[int] = None,
                cores_per_node: int = 32) -> Plan:
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
    run_nodes = max(nodes, int(n_nodes)) if n_nodes else nodes
    figures = load_measured(measured) if measured else None
    return Plan(n, d, key, cost.bytes_per_item, cost.fixed_bytes, n * cost.bytes_per_item + cost.fixed_bytes,
                ram, shards, nodes, per_shard, choice.rerank, disk, n * disk, ingress, driver, n * ITEM_ROW_BYTES,
                measured_costs(figures, n, run_nodes, cores_per_node, shards) if figures else None)


# ---------------------------------------------------------------- measured figures (benchmarks/scale.py)

# (figure, step, what, unit, model, spread). model: "linear" = fixed + per_item * items (times and RSS of work
# that reads every item); "power" = c * items^a (latencies, which should grow slower than the memory: a straight
# line would claim more than was measured); "per_item" = already a per-item figure (the largest size's);
# "per_shard" = linear in the items of one shard (a process that holds one shard: measured at items / the run's
# shards, evaluated at items / the plan's shards).
# spread: the per-item work runs as Ray tasks on every core of the cluster, so it divides by nodes x cores /
# the cores measured on.
FIGURES: List[Tuple[str, str, str, str, str, bool]] = [
    ("build (vmem build)", "build", "wall_s", "s", "linear", True),
    ("build driver RSS", "build", "rss:driver", "B", "linear", False),
    ("populate task RSS (largest)", "build", "rss:ray::populate_shard", "B", "per_shard", False),
    ("fresh open + first query", "open", "open_first_query_s", "s", "power", False),
    ("query p50, in-process search", "query", "query_p50_ms", "ms", "power", False),
    ("query process RSS (index in-process)", "query", "rss:driver", "B", "linear", False),
    ("single add p50", "add", "add_p50_ms", "ms", "power", False),
    ("single delete p50", "delete", "delete_p50_ms", "ms", "power", False),
    ("compact + erase 1,000 deletes + 1,000 adds", "compact", "wall_s", "s", "linear", False),
    ("compaction driver RSS", "compact", "rss:driver", "B", "linear", False),
    ("audit (whole workdir, Ray tasks)", "audit", "wall_s", "s", "linear", True),
    ("eval of 10k queries", "eval", "wall_s", "s", "power", False),
    ("serve: ingress replica RSS", "serve", "rss:ray::ServeReplica:vmem:ingress", "B", "linear", False),
    ("serve: shard replica RSS (largest)", "serve", "rss:ray::ServeReplica:vmem:shard", "B", "per_shard", False),
    ("disk per item (parts + memory)", "build", "disk_bytes_per_item", "B/item", "per_item", False),
]


def load_measured(path: str) -> Optional[dict]:
    """The scale benchmark's results file, or None when it does not exist (a plan without measured rows)."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the measured figures {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("sizes"), dict):
        raise UserError(f"{path} is not a benchmarks/scale.py results file (no 'sizes')")
    data["path"] = path
    return data


def _value(record: dict, what: str) -> Optional[float]:
    if what.startswith("rss:"):
        prefix = what[4:]
        vals = [v for k, v in record.get("rss", {}).items() if k == prefix or k.startswith(prefix)]
        return float(max(vals)) if vals else None
    v = record.get(what)
    return float(v) if isinstance(v, (int, float)) else None


def _series(data: dict, step: str, what: str, per_shard: bool = False) -> List[Tuple[int, float]]:
    pts = []
    for size in data["sizes"].values():
        rec = size.get("steps", {}).get(step)
        if rec and rec.get("status") == "ok":
            v = _value(rec, what)
            if v is not None:
                n = int(size["items"])
                pts.append((n // int(size.get("shards", 2)) if per_shard else n, v))
    return sorted(pts)


def fit(points: List[Tuple[int, float]]) -> Tuple[float, float]:
    """(fixed, per_item) of a straight line through the two largest sizes (one size: all of it per item).

    A negative slope (noise, or a cost that does not grow) is read as 0 per item; a negative intercept as 0
    fixed, keeping the line through the largest point."""
    if len(points) == 1:
        n, v = points[0]
        return 0.0, v / n
    (n1, v1), (n2, v2) = points[-2], points[-1]
    b = max(0.0, (v2 - v1) / (n2 - n1))
    a = v2 - b * n2
    if a < 0:
        a, b = 0.0, v2 / n2
    return a, b


def power_fit(points: List[Tuple[int, float]]) -> Tuple[float, float]:
    """(c, a) of c * items^a through the two largest sizes (a clipped to [0, 1]: no faster than linear)."""
    (n1, v1), (n2, v2) = points[-2], points[-1]
    a = min(1.0, max(0.0, math.log(v2 / v1) / math.log(n2 / n1))) if v1 > 0 and v2 > 0 else 0.0
    return v2 / n2 ** a, a


def measured_costs(data: dict, items: int, nodes: int = 1, cores_per_node: int = 32, shards: int = 1) -> dict:
    """Each measured figure at `items` on `nodes` x `cores_per_node`: value, how it was got (basis), the sizes.

    Measured: the plan's size was run (and, for spread work, on as many cores). One size measured: that value,
    not extrapolated (no growth is known). Else the figure's model through the two largest sizes."""
    m = data.get("machine", {})
    cores_measured = int(m.get("host_cpus") or 2)
    rows: List[Dict] = []
    for name, step, what, unit, model, spread in FIGURES:
        pts = _series(data, step, what, per_shard=model == "per_shard")
        if not pts:
            continue
        at = -(-items // max(1, shards)) if model == "per_shard" else items  # a shard's items, or all
        scale = cores_measured / (nodes * cores_per_node) if spread else 1.0
        exact = [v for n, v in pts if n == at]
        growth = pts[-1][1] / pts[-2][1] if len(pts) > 1 and pts[-2][1] else None
        fixed = per_item = None
        span = f"x{at / pts[-1][0]:,.0f} beyond the largest {'shard' if model == 'per_shard' else 'size'} " \
               f"measured ({_count(pts[-1][0])})"
        if exact and scale == 1.0:
            value, basis = exact[0], "measured"
        elif model == "per_item":
            value, basis = pts[-1][1], f"measured per item at {_count(pts[-1][0])}"
        elif len(pts) == 1:
            value, basis = pts[0][1], f"measured at {_count(pts[0][0])} only: growth unknown, not extrapolated"
        elif model == "power":
            c, a = power_fit(pts)
            value = c * at ** a
            basis = f"extrapolated {span}: items^{a:.2f} through {_count(pts[-2][0])}, {_count(pts[-1][0])}"
        else:
            fixed, per_item = fit(pts)
            value = fixed + per_item * at * scale
            slope = f" (+{per_item:,.1f} B/item)" if unit == "B" else ""
            basis = (f"extrapolated {span}: fixed + per item{slope} through {_count(pts[-2][0])}, "
                     f"{_count(pts[-1][0])}"
                     + (f"; per-item work over {nodes} x {cores_per_node} cores (measured on {cores_measured})"
                        if spread else ""))
        rows.append({"figure": name, "unit": unit, "value": value, "fixed": fixed, "per_item": per_item,
                     "measured": [[n, v] for n, v in pts], "growth_last": growth, "basis": basis})
    return {"source": data.get("path"), "machine": m, "date": data.get("updated"), "dim": data.get("dim"),
            "items": items, "nodes": nodes, "cores_per_node": cores_per_node, "rows": rows}


def _count(n: int) -> str:
    for unit, v in (("B", 10 ** 9), ("M", 10 ** 6), ("k", 10 ** 3)):
        if n >= v:
            return f"{n / v:g}{unit}"
    return str(n)


def _fmt(v: float, unit: str) -> str:
    if unit == "B":
        return format_bytes(int(v))
    if unit == "s":
        return f"{v / 3600:.1f} h" if v >= 3 * 3600 else f"{v:.1f} s"
    return f"{v:,.2f} {unit}"


def format_measured(mc: dict) -> str:
    m = mc.get("machine", {})
    head = (f"measured by benchmarks/scale.py ({mc.get('source')}; {mc.get('date')}, commit "
            f"{m.get('commit', '?')}, {m.get('host_cpus', '?')} cores, {mc.get('dim')}-d vectors), at "
            f"{_count(mc['items'])} items on {mc['nodes']} node(s) x {mc['cores_per_node']} cores:")
    rows = [("figure", "value", "x last 10x", "measured at", "basis")]
    for r in mc["rows"]:
        at = ", ".join(f"{_count(n)}: {_fmt(v, r['unit'])}" for n, v in r["measured"])
        g = f"{r['growth_last']:.2f}" if r["growth_last"] is not None else "-"
        rows.append((r["figure"], _fmt(r["value"], r["unit"]), g, at, r["basis"]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    return "\n".join(lines)
