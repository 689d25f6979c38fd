"""Data layer: dataset adapters -> WebDataset tar shards (local or s3://), stable external ids.

Public API: `stable_id` (ids); `open_source`, `available_sources`, `SkipCounter` (sources); `write_shards`,
`ShardReport`, `iter_shard_samples`, `iter_split_samples`, `shard_urls`, `read_shard_index` (shards).
Heavy modules load on first use, so `from pipeline.data import stable_id` stays cheap for other layers.
"""
from pipeline.data.ids import stable_id

_LAZY = {
    "open_source": "sources", "available_sources": "sources", "SkipCounter": "sources",
    "SampleError": "sources", "write_shards": "shards", "ShardReport": "shards",
    "iter_shard_samples": "shards", "iter_split_samples": "shards", "shard_urls": "shards",
    "read_shard_index": "shards",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pipeline.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")


__all__ = ["stable_id", *_LAZY]
