"""The index layer: autofaiss training, shard population, manifest, shard searcher, router, capacity plan.

Public entry points: `build.build_index`, `manifest.Manifest` / `ManifestStore`, `router.Router` /
`ExcludeSet`, `neighbors.Neighbors` / `merge` / `merge_topk`, `shard.ShardSearcher` (+ `save_shard`, `read_index`, `verify`),
`train.train_index` / `add_vectors`, `plan.plan_memory`, `units.parse_bytes` / `parse_count`.
Submodules are imported on use so `import pipeline.index` stays cheap.
"""
