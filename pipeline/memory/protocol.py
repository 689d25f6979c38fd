"""`ServedMemory`: the seam between the serving layer and the memory — exactly what the HTTP API calls.

`pipeline.memory.memory.VisualMemory` implements it; the API (`pipeline.serve.api.create_api`) is typed
against this Protocol only, so the API can be read, tested and reasoned about without the facade's
internals, and anything that answers these calls can be served.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Protocol, Sequence, runtime_checkable

from pipeline.index.neighbors import Neighbors
from pipeline.memory.results import Prediction


@runtime_checkable
class ServedMemory(Protocol):
    dim: int

    # reads
    def classify(self, images=None, embeddings=None, k: Optional[int] = None, method: Optional[str] = None,
                 nprobe: Optional[int] = None, **params) -> List[Prediction]: ...

    def search(self, images=None, embeddings=None, k: Optional[int] = None,
               nprobe: Optional[int] = None) -> Neighbors: ...

    def explain(self, image=None, embedding=None, k: Optional[int] = None, method: Optional[str] = None,
                out: Optional[str] = None, **params) -> Prediction: ...

    def stats(self) -> dict: ...

    def versions(self) -> List[dict]: ...

    def get_item(self, id: int) -> dict: ...

    def get_image(self, id: int) -> bytes: ...

    # writes
    def add(self, images=None, embeddings=None, labels: Sequence[int] = (), keys: Sequence[str] = (),
            label_names: Optional[Sequence[str]] = None, sources: Optional[Sequence[str]] = None) -> List[int]: ...

    def delete(self, ids: Optional[Iterable[int]] = None, label: Optional[int] = None,
               source: Optional[str] = None) -> int: ...

    def relabel(self, ids: Sequence[int], label: int, label_name: Optional[str] = None) -> int: ...

    def intervene(self, **kwargs) -> int: ...

    def rollback(self, version: int) -> dict: ...

    # maintenance
    def needs_compaction(self) -> Optional[str]: ...

    def maintain(self) -> dict: ...

    def compact(self, force: bool = False, grace_s: Optional[float] = None) -> Optional[dict]: ...

    def prune(self, **kwargs) -> dict: ...
