"""The memory layer: votes, VisualMemory (classify/search/explain/add/delete), snapshots, the forget list, delta,
compaction, erasure, pruning, interventions. `from pipeline.memory import VisualMemory` is the entry point (imported lazily)."""


def __getattr__(name):
    if name in ("VisualMemory", "Prediction", "Neighbor"):
        from pipeline.memory import memory, results

        return getattr(memory, name, None) or getattr(results, name)
    raise AttributeError(name)
