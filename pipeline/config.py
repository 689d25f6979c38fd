"""Typed experiment configs: one YAML file = one experiment.

`load_config(path, overrides)` merges the YAML and `key=value` overrides into the `Config` schema below
(OmegaConf structured configs) and validates it. An unknown key, a value of the wrong type or an invalid
choice raises `ConfigError` naming the key and the valid keys or choices; nothing falls back silently.

Every path is an fsspec URL: a local path or `s3://bucket/prefix`. Each section belongs to one layer; a
layer reads only its own section (plus `storage`/`ray`), so sections can grow without touching others.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import UserError
from pipeline.storage import join as join_url

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/demo.yaml"


class ConfigError(UserError):
    """A config that does not fit the schema; the message names the key and what is allowed."""


@dataclass
class StorageConfig:
    # S3-compatible endpoint (MinIO, moto, R2...). None = AWS. Credentials never live in configs: they come
    # from the standard AWS environment variables / instance roles.
    s3_endpoint_url: Optional[str] = None
    s3_region: str = "us-east-1"


@dataclass
class RayConfig:
    # "local" starts a Ray instance in this process; "auto" joins the cluster this node belongs to;
    # "ray://head:10001" connects a client to a remote cluster.
    address: str = "local"
    num_cpus: Optional[int] = None
    include_dashboard: bool = False


@dataclass
class DataConfig:
    source: str = "fashion_mnist"  # fashion_mnist | image_folder
    input: str = "/usr/share/datasets/fashion-mnist"
    # split name -> number of samples to take (0 = all). For image_folder, the split name is the sub-folder.
    splits: Dict[str, int] = field(default_factory=lambda: {"train": 20000, "test": 2000})
    samples_per_shard: int = 1000
    image_format: str = "png"  # how raw arrays (IDX) are encoded into the shards: png | jpg


@dataclass
class EmbedConfig:
    encoder: str = "efficientnet_lite0"
    pretrained: bool = True  # False = randomly initialised weights of the real architecture (tests, offline)
    image_size: Optional[int] = None  # None = the encoder's native input size
    batch_size: int = 32
    num_actors: int = 1  # encoder actors; with GPUs, one GPU each
    cpus_per_actor: float = 1.0
    device: str = "auto"  # auto | cpu | cuda
    preprocess_batch_size: int = 64
    torch_threads: Optional[int] = None  # intra-op threads per CPU encoder actor; None = node cores / num_actors
    max_failed_shards: int = 0  # tars that may fail to read (e.g. truncated) before the stage gives up


@dataclass
class IndexConfig:
    num_shards: int = 2
    index_key: Optional[str] = None  # explicit faiss index factory string; None = autofaiss chooses
    max_index_memory: str = "256MiB"  # autofaiss memory budget for the whole index
    memory_per_node: str = "16GiB"  # RAM a shard searcher may use; build refuses plans that do not fit
    train_sample: int = 100000
    # ip only: every vector is L2-normalised where it enters (embedding, add, query), so inner product is
    # cosine similarity, which the vote methods' distances (1 - similarity) assume. l2 was removed: it was
    # accepted here but the memory layer silently treated scores as similarities.
    metric: str = "ip"
    # recall target of the search settings the build picks (nprobe, rerank_k): recall@10 AND recall@K, where
    # K = max(memory.k, eval.ks), the deepest neighbour list a vote reads; see README "Index choice and recall".
    # 0.99: on Fashion-MNIST 60k, recall@100 0.97 left ANN accuracy 0.5 points below exact, 0.995 0.25 points
    target_recall: float = 0.99
    strict_recall: bool = False  # true: the build fails (UserError) when no setting reaches target_recall
    # p50 single-query latency budget: memories whose exhaustive scan fits it get one list (exact "Flat")
    max_latency_ms: float = 50.0
    # exact re-rank of the codes' candidates from per-shard vector files on disk (shard-SSS.vectors.npy):
    # auto = on when the codes are lossy (SQ/PQ/RaBitQ), true = always, false = never
    rerank: str = "auto"
    rerank_k: int = 0  # candidates per shard to re-rank; 0 = the build picks the cheapest depth reaching target
    # float32 (4 B/dim on disk, scored by faiss in C++) | float16 (2 B/dim, scored by numpy: several x slower)
    rerank_dtype: str = "float32"
    recall_queries: int = 500
    # embeddings split whose vectors serve as held-out recall queries when present (else base vectors that
    # were not in the training sample)
    recall_split: Optional[str] = "test"
    build_batch_rows: int = 65536  # rows per batch when populating shards
    gpu: bool = False


@dataclass
class AbstainConfig:
    # Answer "unknown" (with the reason) instead of a label when a prediction is not trusted. None = no test.
    # min_confidence compares the calibrated probability when the memory has a calibration for the vote
    # method and k (written by `vmem eval`), else the winner's raw vote share.
    min_confidence: Optional[float] = None
    max_ood: Optional[float] = None  # OOD score (mean cosine distance to the neighbours) above which to abstain


@dataclass
class MemoryConfig:
    k: int = 10
    method: str = "plurality"  # plurality | distance | softmax | rank | soft_*
    xi: float = 1.0
    tau: float = 0.07
    alpha: float = 2.0
    # Compaction is due once deleted items waiting for erasure reach this fraction of the items in the shards
    compact_threshold: float = 0.2
    delta_compact_items: int = 100000  # a delta bigger than this triggers compaction
    # Deleted items are erased this long after the compaction that removed them from the shards, so that
    # readers still searching the previous version (one query at most: every query follows the newest) finish.
    grace_period_s: float = 30.0
    auto_compact: bool = True  # compact after an add/delete once the thresholds below are crossed
    prune_k: int = 10
    hard_prune_threshold: int = 128
    ood_neighbors: int = 100  # the OOD score averages the distance to this many first neighbours (the paper's 100)
    abstain: AbstainConfig = field(default_factory=AbstainConfig)
    # Re-rank the neighbours before the vote: a name in pipeline.memory.rerankers (None = no re-ranking).
    reranker: Optional[str] = None
    rerank_k: int = 50  # candidates searched and re-ranked; the vote uses the first k of the new order
    rerank_encoder: str = "efficientnet_lite2"  # the `encoder` reranker's second, stronger encoder
    rerank_image_size: Optional[int] = None  # its input size; None = the memory encoder's image size


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None  # bearer token for mutations; env VMEM_TOKEN wins if set
    protect_reads: bool = False
    max_request_bytes: int = 10_000_000
    max_k: int = 1000
    max_batch: int = 256  # queries (or items) per batch request: /v1/classify/batch, /v1/items/batch...
    # Concurrent embedding queries with equal options are searched together, up to this many rows per memory
    # call (1: every request alone), by at most `query_concurrency` calls at a time per replica; a call waits
    # up to `query_wait_ms` for query requests the replica is still reading (never when there are none).
    query_batch: int = 64
    query_concurrency: int = 2
    query_wait_ms: float = 5.0
    # HTTP ingress replicas; each opens the memory and follows its committed state (with `autoscaling`,
    # the initial count, scaled between 1 and max_replicas by ongoing requests).
    ingress_replicas: int = 1
    # Memories up to this many items are searched inside each ingress replica (each holds the index) instead
    # of by one deployment per shard: one Ray hop less per query. -1: always use shard deployments.
    local_search_max_items: int = 200_000
    # Memory-map the shard files instead of reading them into RAM. faiss searches memory-mapped IVF lists
    # ~100x slower (1 ms against 12 us per query measured on IVF64,Flat), so servers read them into RAM.
    mmap_shards: bool = False
    # Serve's throughput settings (RAY_SERVE_THROUGHPUT_OPTIMIZED) for a Ray instance `vmem serve` starts
    # itself; a joined cluster keeps its own.
    throughput_optimized: bool = True
    # HAProxy on serve.port in front of ingress replicas that answer HTTP themselves (Serve's HA-proxy mode),
    # instead of Serve's Python proxy actor: twice the throughput here. Local Ray instances only.
    direct_ingress: bool = True
    access_log: bool = False  # Serve's per-request log line (costs CPU per request; /metrics counts anyway)
    shard_replicas: int = 1
    autoscaling: bool = False
    max_replicas: int = 4


@dataclass
class EvalConfig:
    split: str = "test"
    ks: List[int] = field(default_factory=lambda: [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    methods: List[str] = field(default_factory=lambda: ["plurality", "distance", "softmax", "rank"])
    max_queries: int = 0  # 0 = the whole split


@dataclass
class DemoConfig:
    examples: int = 3  # query -> neighbour examples printed by `vmem demo`
    k: int = 10


@dataclass
class Config:
    name: str = "demo"
    workdir: str = MISSING  # fsspec URL under which shards, embeddings and the memory live
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    # Derived locations: one place decides where each stage's output lives.
    def shards_dir(self, split: str) -> str:
        return join_url(self.workdir, "shards", split)

    def embeddings_dir(self, split: str) -> str:
        return join_url(self.workdir, "embeddings", split)

    @property
    def memory_dir(self) -> str:
        return join_url(self.workdir, "memory")


# Choices checked at load; registries (encoders, vote methods) check their own names when used.
CHOICES = {
    "data.source": ("fashion_mnist", "image_folder"),
    "data.image_format": ("png", "jpg"),
    "embed.device": ("auto", "cpu", "cuda"),
    "index.metric": ("ip",),
    "index.rerank": ("auto", "true", "false"),
    "index.rerank_dtype": ("float16", "float32"),
}
POSITIVE = ("data.samples_per_shard", "embed.batch_size", "embed.num_actors", "index.num_shards",
            "memory.k", "memory.rerank_k", "memory.ood_neighbors",
            "embed.preprocess_batch_size", "serve.max_k", "serve.max_batch", "serve.ingress_replicas",
            "serve.shard_replicas", "serve.max_request_bytes", "serve.query_batch", "serve.query_concurrency",
            "memory.tau", "memory.alpha", "memory.delta_compact_items", "memory.prune_k",
            "memory.hard_prune_threshold", "embed.cpus_per_actor", "index.train_sample", "index.recall_queries",
            "index.build_batch_rows", "index.max_latency_ms", "serve.max_replicas", "demo.k")
# None (= "choose for me") or > 0
POSITIVE_OR_NONE = ("ray.num_cpus", "embed.image_size", "embed.torch_threads", "memory.rerank_image_size")
NON_NEGATIVE = ("memory.grace_period_s", "memory.xi", "serve.query_wait_ms", "embed.max_failed_shards",
                "index.rerank_k", "eval.max_queries", "demo.examples")
# (low, high, low included): a fraction, a probability, a cosine distance
RANGES = {"index.target_recall": (0.0, 1.0, False), "memory.compact_threshold": (0.0, 1.0, False),
          "memory.abstain.min_confidence": (0.0, 1.0, True), "memory.abstain.max_ood": (0.0, 2.0, True)}


def _fields(node_type: type) -> List[str]:
    return [f.name for f in dataclasses.fields(node_type)]


def _schema_for(dotted: str) -> Optional[type]:
    """The dataclass that holds the last component of `dotted` (to list the valid keys in errors)."""
    t: Any = Config
    for part in dotted.split(".")[:-1]:
        t = typing.get_type_hints(t).get(part)
        if not dataclasses.is_dataclass(t):
            return None
    return t


def _explain(err: OmegaConfBaseException, dotted: Optional[str] = None) -> ConfigError:
    key = getattr(err, "full_key", None) or dotted or "?"
    schema = _schema_for(key)
    msg = str(err).splitlines()[0]
    if schema is not None and key.split(".")[-1] not in _fields(schema):
        section = ".".join(key.split(".")[:-1]) or "<top level>"
        return ConfigError(f"unknown config key '{key}': valid keys in {section} are {', '.join(_fields(schema))}")
    return ConfigError(f"invalid value for config key '{key}': {msg}")


def _select(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check(cfg: Config) -> None:
    # YAML `rerank: true` arrives as the string "True" in a str field
    cfg.index.rerank = str(cfg.index.rerank).lower()
    for dotted, valid in CHOICES.items():
        value = _select(cfg, dotted)
        if value not in valid:
            raise ConfigError(f"invalid value {value!r} for config key '{dotted}': choose one of {', '.join(valid)}")
    # Ranges are refused, never clamped: `grace_period_s=-5` once ran as 0 without a word.
    for dotted in POSITIVE + POSITIVE_OR_NONE:
        value = _select(cfg, dotted)
        if (value is None and dotted in POSITIVE) or (value is not None and not value > 0):
            raise ConfigError(f"config key '{dotted}' must be > 0, got {value!r}")
    for dotted in NON_NEGATIVE:
        value = _select(cfg, dotted)
        if not value >= 0:  # `not >=` also refuses NaN
            raise ConfigError(f"config key '{dotted}' must be >= 0, got {value!r}")
    for dotted, (low, high, low_ok) in RANGES.items():
        value = _select(cfg, dotted)
        if value is not None and not ((low <= value if low_ok else low < value) and value <= high):
            raise ConfigError(f"config key '{dotted}' must be in {'[' if low_ok else '('}{low:g}, {high:g}], "
                              f"got {value!r}")
    if not 0 < cfg.serve.port < 65536:
        raise ConfigError(f"config key 'serve.port' must be a TCP port (1..65535), got {cfg.serve.port}")
    if not cfg.eval.ks or min(cfg.eval.ks) <= 0:
        raise ConfigError(f"config key 'eval.ks' must be a non-empty list of k > 0, got {list(cfg.eval.ks)}")
    bad = {name: n for name, n in cfg.data.splits.items() if n < 0}
    if bad:
        raise ConfigError(f"config key 'data.splits' takes sample counts >= 0 (0 = all), got {bad}")


def resolve_config_path(path: Optional[str]) -> Path:
    """The config file to load: the given path, else the embedded default `configs/demo.yaml`."""
    candidate = Path(path or DEFAULT_CONFIG)
    if candidate.exists():
        return candidate
    in_repo = REPO_ROOT / candidate
    if in_repo.exists():
        return in_repo
    raise ConfigError(f"config file not found: {candidate}")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config into the typed schema, apply `key=value` overrides, validate, return a `Config`."""
    schema = OmegaConf.structured(Config)
    cfg_path = resolve_config_path(path)
    try:
        file_cfg = OmegaConf.load(cfg_path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"cannot parse {cfg_path}: {e}") from e
    try:
        merged = OmegaConf.merge(schema, file_cfg)
        # A mapping written in the file replaces the schema's default mapping rather than merging into it:
        # `splits: {train: 0, val: 0}` (ImageNet) must not keep the default `test` split.
        for dotted in ("data.splits",):
            given = OmegaConf.select(file_cfg, dotted)
            if given is not None:
                OmegaConf.update(merged, dotted, given, merge=False)
    except OmegaConfBaseException as e:
        raise _explain(e) from e
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value (e.g. embed.batch_size=16)")
        key, _, raw = ov.partition("=")
        try:
            merged.merge_with(OmegaConf.from_dotlist([f"{key}={raw}"]))
        except OmegaConfBaseException as e:
            raise _explain(e, key) from e
    if OmegaConf.is_missing(merged, "workdir"):
        raise ConfigError("config key 'workdir' is required (a local path or s3://bucket/prefix)")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _check(cfg)
    return cfg


def to_dict(cfg: Config) -> Dict[str, Any]:
    """A plain dict of the config, safe to send to Ray workers; `from_dict` turns it back into a Config."""
    return dataclasses.asdict(cfg)


def from_dict(d: Dict[str, Any]) -> Config:
    """Rebuild a Config from `dataclasses.asdict` output (used to ship configs to Ray workers)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def env_token(cfg: Config) -> Optional[str]:
    """The Serve bearer token: the VMEM_TOKEN environment variable wins over the config."""
    return os.environ.get("VMEM_TOKEN") or cfg.serve.token
