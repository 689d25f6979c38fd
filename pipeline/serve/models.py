"""Request and response bodies of the HTTP API (pydantic), so `/openapi.json` documents every body.

Values a model cannot check alone (an embedding's dimension, k against `serve.max_k`, a batch against
`serve.max_batch`, a vote method's name) are checked by the routes against the served memory and config;
every failure is a 422 `{"error": ...}` naming the field.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.serve.limits import LABEL_NAME_RE, TOKEN_RE

INT64_MAX = 2**63 - 1
Id = Field(ge=0, le=INT64_MAX, description="item id (stable_id of its key)")
# In lists and maps: anything outside the id range is a 422, not a look-up.
Int64 = Annotated[int, Field(ge=0, le=INT64_MAX)]


def _finite_vector(v: List[float], what: str = "embedding") -> List[float]:
    if not v:
        raise ValueError(f"{what} must be a non-empty JSON list of numbers")
    if not math.isfinite(sum(v)) and not all(math.isfinite(x) for x in v):  # one C loop when all is well
        raise ValueError(f"{what} contains NaN or infinite values")
    return v


def _k(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"k must be a positive integer, got {v!r}")
    return v


def _list_of_numbers(v: Any, what: str) -> Any:
    if not isinstance(v, list):
        raise ValueError(f"{what} must be a JSON list of numbers, got {type(v).__name__}")
    return v


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not silently ignored


class VoteParams(Body):
    """Parameters of the vote methods (`pipeline/memory/votes.py`); unset ones come from the config."""
    xi: Optional[float] = Field(None, ge=0, le=100, description="distance method: exp(-d)^xi")
    tau: Optional[float] = Field(None, gt=0, le=100, description="softmax temperature")
    alpha: Optional[float] = Field(None, gt=0, le=1e6, description="rank method: 1/(alpha+i)")


class QueryOptions(Body):
    k: Optional[int] = Field(None, ge=1, description="neighbours per query (default memory.k, at most serve.max_k)")
    nprobe: Optional[int] = Field(None, ge=1, le=65536, description="IVF lists probed (default: the manifest's)")

    _check_k = field_validator("k", mode="before")(_k)


class VoteOptions(QueryOptions):
    method: Optional[str] = Field(None, description="vote method (default memory.method), e.g. plurality, rank")
    params: VoteParams = Field(default_factory=VoteParams)


class OneEmbedding(Body):
    embedding: List[float] = Field(description="one vector of the memory's dimension")

    @field_validator("embedding", mode="before")
    @classmethod
    def _is_list(cls, v):
        return _list_of_numbers(v, "embedding")

    @field_validator("embedding")
    @classmethod
    def _finite(cls, v):
        return _finite_vector(v)


class ManyEmbeddings(Body):
    embeddings: List[List[float]] = Field(description="vectors, one per row (at most serve.max_batch)")

    @field_validator("embeddings")
    @classmethod
    def _finite(cls, v):
        if not v:
            raise ValueError("embeddings must be a non-empty list of vectors")
        for row in v:
            _finite_vector(row, "each embedding")
        return v


class SearchRequest(QueryOptions, OneEmbedding):
    pass


class ClassifyRequest(VoteOptions, SearchRequest):
    pass


class SearchBatchRequest(QueryOptions, ManyEmbeddings):
    pass


class ClassifyBatchRequest(VoteOptions, SearchBatchRequest):
    pass


class Hit(BaseModel):
    """One neighbour of a search."""
    id: int
    label: int
    label_name: str
    similarity: Optional[float]
    distance: Optional[float]
    key: str
    source: str
    image_url: str


class SearchResponse(BaseModel):
    k: int
    neighbors: List[Hit]


class SearchBatchResponse(BaseModel):
    k: int
    results: List[List[Hit]]


class Neighbor(BaseModel):
    """One neighbour that voted: its label (after interventions), distance and vote weight."""
    id: int
    label: int
    label_name: str
    distance: Optional[float]
    weight: Optional[float] = Field(description="vote weight, multiplier and gamma included")
    key: str
    source: str
    multiplier: Optional[float] = Field(1.0, description="intervention factor included in weight")
    gamma: Optional[float] = Field(1.0, description="soft-pruning factor included in weight")
    original_label: Optional[int] = Field(None, description="the stored label when an intervention overrode it")
    rank_before: Optional[int] = Field(None, description="search rank before a reranker reordered it")
    image_url: str


class Prediction(BaseModel):
    label: int
    label_name: str
    scores: Dict[str, Optional[float]] = Field(description="vote total per class name")
    neighbors: List[Neighbor]
    method: str
    k: int
    confidence: Optional[float] = Field(None, description="the winner's vote share")
    margin: Optional[float] = Field(None, description="winner's share minus the runner-up's")
    entropy: Optional[float] = Field(None, description="entropy of the vote shares (nats)")
    ood_score: Optional[float] = Field(None, description="mean cosine distance to the nearest neighbours")
    probability: Optional[float] = Field(None, description="calibrated P(correct), when `vmem eval` fitted one")
    ood: Optional[bool] = Field(None, description="OOD score above the threshold (None: no threshold known)")
    abstained: bool = Field(False, description="memory.abstain answered 'unknown'")
    abstain_reason: Optional[str] = None
    voted_label: Optional[int] = Field(None, description="the vote's winner when the answer is 'unknown'")
    reranker: Optional[str] = Field(None, description="the reranker that reordered the neighbours")


class PredictionBatch(BaseModel):
    k: int
    method: str
    predictions: List[Prediction]


class AddItemRequest(OneEmbedding):
    label: int = Field(ge=-INT64_MAX, le=INT64_MAX, description="integer class id")
    label_name: Optional[str] = Field(None, pattern=LABEL_NAME_RE.pattern)
    source: str = Field("api", pattern=TOKEN_RE.pattern)
    key: Optional[str] = Field(None, pattern=TOKEN_RE.pattern, description="generated when absent")


class NewItem(BaseModel):
    id: int
    key: str
    label: int


class AddItemsRequest(ManyEmbeddings):
    """Several items in one durable write (all or none)."""
    labels: List[int] = Field(description="one integer class id per item")
    keys: Optional[List[str]] = Field(None, description="one per item; generated when absent")
    label_names: Optional[List[str]] = None
    source: str = Field("api", pattern=TOKEN_RE.pattern)


class NewItems(BaseModel):
    items: List[NewItem]


class Item(BaseModel):
    model_config = ConfigDict(extra="allow")  # the memory layer may add fields (shard, gamma, intervention)
    id: int
    label: int
    label_name: str
    key: str
    source: str
    image_url: str


class DeleteRequest(Body):
    """Exactly one of ids, label or source."""
    ids: Optional[List[Int64]] = Field(None, description="item ids")
    label: Optional[int] = Field(None, ge=-INT64_MAX, le=INT64_MAX, description="every item with this label")
    source: Optional[str] = Field(None, pattern=TOKEN_RE.pattern, description="every item from this source")


class Deleted(BaseModel):
    deleted: int


class RelabelOne(Body):
    label: int = Field(ge=-INT64_MAX, le=INT64_MAX)
    label_name: Optional[str] = Field(None, pattern=LABEL_NAME_RE.pattern)


class RelabelRequest(RelabelOne):
    ids: List[Int64] = Field(min_length=1)


class Relabelled(BaseModel):
    model_config = ConfigDict(extra="allow")
    relabelled: Optional[int] = None


class InterventionRequest(Body):
    """Vote multipliers and label overrides (merged into the current overlay unless `clear`)."""
    item_weights: Dict[Int64, float] = Field(default_factory=dict, description="item id -> multiplier")
    label_weights: Dict[int, float] = Field(default_factory=dict, description="label -> multiplier")
    source_weights: Dict[str, float] = Field(default_factory=dict, description="source -> multiplier")
    relabel: Dict[Int64, int] = Field(default_factory=dict, description="item id -> label")
    label_names: Dict[int, str] = Field(default_factory=dict, description="label -> name for relabels")
    clear: bool = False

    @field_validator("item_weights", "label_weights", "source_weights")
    @classmethod
    def _finite(cls, v):
        if not all(math.isfinite(w) and w >= 0 for w in v.values()):
            raise ValueError("weights must be finite numbers >= 0")
        return v


class InterventionVersion(BaseModel):
    interventions_version: int


class PruneRequest(Body):
    hard: bool = True
    soft: bool = True
    soft_k: Optional[int] = Field(None, ge=1, le=1000)
    hard_k: int = Field(100, ge=1, le=1000)
    threshold: Optional[int] = Field(None, ge=1)
    dry_run: bool = False


class RollbackRequest(Body):
    version: int = Field(ge=0, le=INT64_MAX)


class Version(BaseModel):
    model_config = ConfigDict(extra="allow")
    version: int
    at: Optional[float] = None
    op: Optional[str] = None
    detail: Optional[str] = None


class Versions(BaseModel):
    versions: List[Version]


class Report(BaseModel):
    """A maintenance report (compaction, prune, rollback); fields depend on the job."""
    model_config = ConfigDict(extra="allow")


class Health(BaseModel):
    status: str
    version: Optional[int] = None


class Stats(BaseModel):
    model_config = ConfigDict(extra="allow")
    items: int
    shards: int
    tombstones: int
    version: int


class ErrorBody(BaseModel):
    error: str


ERRORS = {code: {"model": ErrorBody, "description": why} for code, why in (
    (401, "missing or malformed bearer token"), (403, "wrong token, or none configured on the server"),
    (404, "no such item"), (413, "body over serve.max_request_bytes"), (422, "invalid input"))}
