"""The embedding stage: WebDataset shards -> Ray Data (decode/preprocess on CPU -> encoder actors) -> Parquet.

`embed_split(cfg, split)` streams every not-yet-embedded tar of a split through
`ray.data.read_webdataset` (raw bytes) -> `map_batches(decode_and_preprocess)` (CPU tasks; undecodable
images become `valid=False` rows so they are counted, not fatal) -> `map_batches(EncoderActor)` (a pool of
`cfg.embed.num_actors` actors, one GPU each when the cluster has GPUs, bf16 autocast there). The driver
consumes the stream in input order (`preserve_order`), so the rows of each tar arrive together: when a tar
is complete it is written as `part-{shard index:05d}.parquet` and recorded `done` in `_manifest.json`
(both atomic). A re-run skips tars whose part exists and is recorded done, so a crash costs at most the
tars in flight. One part per tar keeps resume exact.

`embed_images(encoder, images, batch_size)` is the same computation in one process (tests, small jobs).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.embed import parts
from pipeline.embed.encoders import Encoder, create_encoder, describe
from pipeline.embed.preprocess import PreprocessSpec, decode_image, preprocess
from pipeline.errors import DataError, NotFound, UserError
from pipeline.runtime import phase

log = logging.getLogger("vmem.embed")

MANIFEST_VERSION = 1
IMAGE_COLUMNS = ("png", "jpg", "jpeg")
_SHARD_INDEX = re.compile(r"-(\d+)\.tar$")


@dataclass
class EmbedReport:
    """What `embed_split` did for one split."""

    split: str
    out_dir: str
    encoder: str
    dim: int
    shards_total: int
    shards_embedded: int = 0  # in this run
    shards_resumed: int = 0  # already done by an earlier run
    shards_failed: List[str] = field(default_factory=list)
    rows: int = 0  # embeddings written in this run
    skipped: int = 0  # undecodable images in this run
    total_rows: int = 0  # embeddings in the split (all runs)
    seconds: float = 0.0
    warmup_seconds: float = 0.0  # until the first batch came back (actor start, model load)
    warmup_rows: int = 0  # images in that first batch

    @property
    def images_per_s(self) -> float:
        return (self.rows + self.skipped) / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Throughput after the first batch: what the pipeline sustains once actors and models are up."""
        busy = self.seconds - self.warmup_seconds
        return (self.rows + self.skipped - self.warmup_rows) / busy if busy > 0 else 0.0

    def summary(self) -> str:
        line = (f"{self.split}: {self.rows} embeddings ({self.encoder}, dim {self.dim}) from {self.shards_embedded} "
                f"shards in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s; {self.steady_images_per_s:.1f} "
                f"after {self.warmup_seconds:.1f} s warm-up), {self.skipped} images "
                f"skipped, {self.shards_resumed} shards already done; {self.total_rows} rows in {self.out_dir}")
        if self.shards_failed:
            line += f"\n  FAILED (re-run to retry): {', '.join(self.shards_failed)}"
        return line


# ---------------------------------------------------------------------------------------- single process

def embed_images(encoder: Encoder, images: Sequence, batch_size: int = 32) -> np.ndarray:
    """(n, dim) float32 L2-normalised embeddings of PIL `images`, in one process (no Ray)."""
    return encoder.encode(images, batch_size=batch_size)


# ---------------------------------------------------------------------------------------- Ray Data stages

def decode_and_preprocess(batch: Dict[str, np.ndarray], spec: dict) -> Dict[str, np.ndarray]:
    """Raw webdataset rows -> pixels (n, 3, H, W) float32 + metadata columns + `valid`.

    An image that cannot be decoded (or a sample with bad metadata) keeps its row with `valid=False` and
    zero pixels, so the driver can count it per shard; the encoder skips such rows.
    """
    from pipeline.data.ids import stable_id

    spec_ = PreprocessSpec.from_dict(spec)
    keys = batch["__key__"]
    n = len(keys)
    pixels = np.zeros((n, 3, spec_.crop_size, spec_.crop_size), np.float32)
    out = {"id": np.zeros(n, np.int64), "label": np.full(n, -1, np.int64), "valid": np.zeros(n, bool),
           "key": np.empty(n, object), "label_name": np.empty(n, object), "source": np.empty(n, object),
           "shard_path": np.asarray(batch["__url__"], object)}
    image_cols = [c for c in IMAGE_COLUMNS if c in batch]
    for i in range(n):
        out["key"][i], out["label_name"][i], out["source"][i] = str(keys[i]), "", ""
        try:
            meta = _json(batch["json"][i]) if "json" in batch else {}
            key = meta.get("key") or str(keys[i])
            out["key"][i] = key
            out["id"][i] = int(meta["id"]) if meta.get("id") is not None else stable_id(key)
            out["label"][i] = int(_text(batch["cls"][i])) if "cls" in batch and batch["cls"][i] is not None else -1
            out["label_name"][i] = str(meta.get("label_name", ""))
            out["source"][i] = str(meta.get("source", ""))
            data = next((batch[c][i] for c in image_cols if batch[c][i] is not None), None)
            if data is None:
                raise DataError(f"sample {key} has no image member")
            pixels[i] = preprocess(decode_image(bytes(data)), spec_)
            out["valid"][i] = True
        except Exception as e:  # noqa: BLE001 - a bad sample is counted by the driver, never fatal
            logging.getLogger("vmem.embed").warning("skipping sample %s of %s: %s", keys[i], batch["__url__"][i], e)
    out["pixels"] = pixels
    return out


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def _json(v) -> dict:
    if v is None:
        return {}
    return v if isinstance(v, dict) else json.loads(_text(v))


class EncoderActor:
    """Ray actor: holds one encoder (on its GPU, or CPU threads) and embeds preprocessed batches."""

    def __init__(self, name: str, pretrained: bool, image_size: Optional[int], device: str,
                 torch_threads: Optional[int] = None):
        import torch

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.encoder = create_encoder(name, pretrained=pretrained, image_size=image_size, device=device)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        valid = batch["valid"]
        emb = np.zeros((len(valid), self.encoder.dim), np.float32)
        if valid.any():
            emb[valid] = self.encoder.encode_tensor(pixels[valid]).numpy()
        batch["embedding"] = emb
        return batch


# ---------------------------------------------------------------------------------------- manifest + resume

def _shard_list(shards_dir: str) -> List[dict]:
    """[{name, url, index, expected}] of the split's tars, from `_shards.json` when present, else a listing."""
    from pipeline.data.shards import read_shard_index

    try:
        entries = [(s["name"], s.get("count")) for s in read_shard_index(shards_dir)["shards"]]
    except NotFound:
        entries = [(n, None) for n in storage.listdir(shards_dir) if n.endswith(".tar")]
    if not entries:
        raise NotFound(f"no WebDataset shards under {shards_dir}: run `vmem shards` first")
    out = []
    for pos, (name, count) in enumerate(entries):
        m = _SHARD_INDEX.search(name)
        out.append({"name": name, "url": storage.join(shards_dir, name), "expected": count,
                    "index": int(m.group(1)) if m else pos})
    if len({s["index"] for s in out}) != len(out):  # names without unique numbers: fall back to positions
        for pos, s in enumerate(out):
            s["index"] = pos
    return out


def part_name(index: int) -> str:
    return f"{parts.PART_PREFIX}{index:05d}.parquet"


def _load_manifest(url: str, identity: dict) -> dict:
    """The existing manifest if it was made with the same encoder settings; a fresh one if none exists."""
    if storage.exists(url):
        old = storage.read_json(url)
        mismatch = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        if mismatch:
            detail = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in mismatch.items())
            raise UserError(f"{url} holds embeddings made with other settings ({detail}). Remove that folder to "
                            f"re-embed, or use another workdir.")
        return old
    return {"format_version": MANIFEST_VERSION, **identity, "shards": {}}


def _write_manifest(url: str, manifest: dict) -> None:
    done = [s for s in manifest["shards"].values() if s["status"] == "done"]
    manifest["counts"] = {"rows": sum(s["rows"] for s in done), "skipped": sum(s["skipped"] for s in done),
                          "shards": manifest["num_shards"], "shards_done": len(done)}
    manifest["complete"] = len(done) == manifest["num_shards"]
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    storage.atomic_write_json(url, manifest)


# ---------------------------------------------------------------------------------------- the stage

def embed_split(cfg, split: str) -> EmbedReport:
    """Embed every tar of `split` that is not done yet; write parts + `_manifest.json`; return a report.

    Requires Ray to be initialised (`pipeline.runtime.init_ray`). Undecodable images are skipped and counted;
    a tar that cannot be read at all is recorded `failed` (up to `cfg.embed.max_failed_shards`, else the
    stage raises) and retried by the next run.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    storage.configure(cfg.storage)
    e = cfg.embed
    shards = _shard_list(cfg.shards_dir(split))
    out_dir = cfg.embeddings_dir(split)
    manifest_url = storage.join(out_dir, parts.MANIFEST_NAME)
    # Architecture facts (dim, preprocessing) without loading weights: 'meta' allocates nothing.
    identity = describe(create_encoder(e.encoder, pretrained=False, image_size=e.image_size, device="meta"))
    identity.update(pretrained=bool(e.pretrained), split=split)
    identity = json.loads(json.dumps(identity))  # compare as stored (tuples become lists)
    manifest = _load_manifest(manifest_url, identity)
    manifest["num_shards"] = len(shards)
    existing = set(storage.listdir(out_dir))
    todo = [s for s in shards if not (manifest["shards"].get(s["name"], {}).get("status") == "done"
                                      and part_name(s["index"]) in existing)]
    report = EmbedReport(split=split, out_dir=out_dir, encoder=e.encoder, dim=identity["dim"],
                         shards_total=len(shards), shards_resumed=len(shards) - len(todo))
    if not todo:
        _write_manifest(manifest_url, manifest)
        report.total_rows = manifest["counts"]["rows"]
        log.info("all %d shards of %s already embedded in %s", len(shards), split, out_dir)
        return report

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    device = e.device if e.device != "auto" else ("cuda" if has_gpu else "cpu")
    if device == "cuda" and not has_gpu:
        raise UserError("embed.device=cuda but the Ray cluster has no GPUs; use embed.device=auto or cpu")
    for s in todo:  # from here until written, these shards are not done
        manifest["shards"][s["name"]] = {"url": s["url"], "part": part_name(s["index"]), "status": "pending",
                                         "rows": 0, "skipped": 0}
    _write_manifest(manifest_url, manifest)

    fs, _ = storage.pyarrow_filesystem(todo[0]["url"])
    by_path = {storage.pyarrow_filesystem(s["url"])[1]: s for s in todo}
    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.max_errored_blocks)  # restored below: ctx is global
    ctx.execution_options.preserve_order = True  # rows of one tar arrive together -> one part per tar
    ctx.max_errored_blocks = int(e.max_failed_shards)
    # Read tasks get this process's storage environment (S3 endpoint, credentials): workers started before
    # `storage.configure` / credentials were set would otherwise not see them.
    env = storage.worker_env()
    ds = ray.data.read_webdataset(list(by_path), filesystem=fs, decoder=None, override_num_blocks=len(todo),
                                  runtime_env={"env_vars": env} if env and storage.is_remote(todo[0]["url"]) else None)
    # Decode/preprocess runs in its own CPU tasks, each reserving the memory its output batch needs. Remote
    # args that differ from the actors' also stop Ray from fusing it into the encoder actors, which would
    # serialise the CPU preprocessing with the (GPU) forward passes.
    crop = identity["preprocessing"]["crop_size"]
    batch_bytes = e.preprocess_batch_size * 3 * crop * crop * 4
    ds = ds.map_batches(decode_and_preprocess, fn_kwargs={"spec": identity["preprocessing"]},
                        batch_size=e.preprocess_batch_size, batch_format="numpy", num_cpus=1,
                        memory=2 * batch_bytes + 320 * 2**20)  # + a Python worker's own footprint
    # Ray pins an actor's OMP/torch threads to its num_cpus (1 by default), which would leave a CPU encoder on
    # one core while decode tasks are light; a CPU encoder gets the node's cores shared among the actors.
    threads = e.torch_threads or (None if device == "cuda" else max(1, (os.cpu_count() or 1) // e.num_actors))
    ds = ds.map_batches(EncoderActor, fn_constructor_args=(e.encoder, e.pretrained, e.image_size, device,
                                                           threads),
                        compute=ActorPoolStrategy(size=e.num_actors), batch_size=e.batch_size,
                        batch_format="numpy", num_gpus=1 if device == "cuda" else 0, num_cpus=e.cpus_per_actor)

    from tqdm.auto import tqdm

    expected = [s["expected"] for s in todo]
    bar = tqdm(total=sum(expected) if None not in expected else None, desc=f"embed {split}", unit="img",
               mininterval=1.0, disable=None)
    writer = _PartWriter(out_dir, manifest, manifest_url, report)
    with phase(f"embed {split} ({len(todo)} shards, {e.encoder} on {device})") as timing:
        try:
            t0 = time.perf_counter()
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if not report.warmup_seconds:
                    report.warmup_seconds, report.warmup_rows = time.perf_counter() - t0, len(batch["valid"])
                writer.add(batch, by_path)
                bar.update(len(batch["valid"]))
                bar.set_postfix(shards=f"{report.shards_embedded}/{len(todo)}", refresh=False)
            writer.flush()
        finally:
            bar.close()
            ctx.execution_options.preserve_order, ctx.max_errored_blocks = saved
    report.seconds = timing["seconds"]
    for s in todo:  # shards that produced nothing (empty) or lost rows to a read failure
        st = manifest["shards"][s["name"]]
        if st["status"] == "done":
            continue
        if not s["expected"]:  # 0, or unknown (no `_shards.json`): an empty tar is done with 0 rows
            writer.write_shard(s, [], [])
        else:  # fewer rows than `_shards.json` promised (the writer refused to write a part for it)
            st["status"] = "failed"
            report.shards_failed.append(s["url"])
    _write_manifest(manifest_url, manifest)
    report.total_rows = manifest["counts"]["rows"]
    log.info("%s", report.summary())
    return report


class _PartWriter:
    """Driver side: buffers rows per tar (they arrive in order) and writes each finished tar as one part."""

    def __init__(self, out_dir: str, manifest: dict, manifest_url: str, report: EmbedReport):
        self.out_dir, self.manifest, self.manifest_url, self.report = out_dir, manifest, manifest_url, report
        self.current: Optional[dict] = None
        self.chunks: List[Dict[str, np.ndarray]] = []
        self.finished: set = set()

    def add(self, batch: Dict[str, np.ndarray], by_path: Dict[str, dict]) -> None:
        paths = batch["shard_path"]
        # Split the batch into runs of the same tar (a block may hold the end of one tar and the next).
        starts = [0] + [i for i in range(1, len(paths)) if paths[i] != paths[i - 1]] + [len(paths)]
        for a, b in zip(starts[:-1], starts[1:]):
            shard = by_path[str(paths[a])]
            if self.current is None or shard["name"] != self.current["name"]:
                self.flush()
                if shard["name"] in self.finished:
                    raise RuntimeError(f"rows of {shard['url']} arrived after the shard was written "
                                       f"(Ray Data did not preserve order)")
                self.current = shard
            self.chunks.append({k: v[a:b] for k, v in batch.items()})

    def flush(self) -> None:
        if self.current is None:
            return
        cols = {k: np.concatenate([c[k] for c in self.chunks]) for k in self.chunks[0]}
        self.write_shard(self.current, cols, cols["valid"])
        self.current, self.chunks = None, []

    def write_shard(self, shard: dict, cols, valid) -> None:
        valid = np.asarray(valid, bool)
        rows, skipped = int(valid.sum()), int((~valid).sum())
        st = self.manifest["shards"][shard["name"]]
        self.finished.add(shard["name"])
        if shard["expected"] is not None and rows + skipped < shard["expected"]:
            # Fewer samples than the tar holds: its read failed part-way (Ray dropped the errored block).
            log.error("%s: got %d of %d samples; marking it failed", shard["url"], rows + skipped, shard["expected"])
            return  # left not done: `embed_split` records it failed
        # A part even for 0 rows: its existence is what tells a re-run that this tar is done.
        if rows:
            meta = {"id": cols["id"][valid].tolist(), "key": [str(k) for k in cols["key"][valid]],
                    "label": cols["label"][valid].tolist(), "label_name": [str(x) for x in cols["label_name"][valid]],
                    "source": [str(x) for x in cols["source"][valid]], "shard": [shard["url"]] * rows}
            emb = np.stack(cols["embedding"][valid]).astype(np.float32, copy=False)
        else:
            meta = {c: [] for c in parts.META_COLUMNS}
            emb = np.zeros((0, self.report.dim), np.float32)
        parts.write_part(parts.to_table(meta, emb), storage.join(self.out_dir, part_name(shard["index"])))
        st.update(status="done", rows=rows, skipped=skipped)
        self.report.shards_embedded += 1
        self.report.rows += rows
        self.report.skipped += skipped
        _write_manifest(self.manifest_url, self.manifest)
