"""WebDataset tar shards: the writer (`write_shards`) and a tolerant reader (`iter_shard_samples`).

Layout of one split (local path or s3://):
    {shards_dir}/{split}-000000.tar ...   members per sample: <tar key>.png|jpg, .cls (label as text),
                                          .json ({"key", "source", "label_name", "id"})
    {shards_dir}/_shards.json             parameters, samples per shard, classes, skipped count and reasons

Each tar is finished in a local temp file and then published with `storage.upload_file` (rename / one PUT),
so no reader ever sees half a tar. `_shards.json` is written last and is the commit point: a split without
it is incomplete. Ray Data reads the folder directly (`ray.data.read_webdataset` ignores `_`-files);
`iter_split_samples(dir)` / `iter_shard_samples(url, handler)` read it here with a skip-or-raise policy.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional

import numpy as np
from webdataset import ShardWriter
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline import storage
from pipeline.data.ids import stable_id
from pipeline.data.sources import Handler, SampleError, SkipCounter, open_source, unique_keys
from pipeline.errors import DataError, NotFound, UserError
from pipeline.runtime import phase

log = logging.getLogger("vmem.data")

INDEX_NAME = "_shards.json"
FORMAT_VERSION = 1
IMAGE_EXTS = ("png", "jpg")
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG"}
_MAX_TAR_KEY = 80  # ustar member names hold 100 characters; leave room for ".json" and a hash suffix


def tar_key(key: str) -> str:
    """A `__key__` safe for tar members and webdataset grouping: [A-Za-z0-9_-] only, no dots, short.

    '/' becomes '__' and any other character '_' (webdataset splits member names at the first dot).
    Long keys keep their start plus a hash. Distinct keys can map to the same tar key; the writer
    disambiguates those. The original key always travels in the sample's json.
    """
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", key.replace("/", "__")).lstrip("_-") or "k"
    if len(safe) > _MAX_TAR_KEY:
        safe = f"{safe[:_MAX_TAR_KEY - 17]}-{stable_id(key):016x}"
    return safe


def encode_image(image, image_format: str, source_format: Optional[str] = None, quality: int = 95) -> bytes:
    """Image bytes in `image_format` (png | jpg) from a uint8 array or encoded bytes.

    Encoded bytes already in the target format pass through untouched (no re-compression); others are
    decoded and re-encoded with PIL (JPEG needs RGB or L, so alpha/palette images are converted).
    """
    from PIL import Image

    if image_format not in _PIL_FORMAT:
        raise UserError(f"image format must be one of {', '.join(_PIL_FORMAT)}, got {image_format!r}")
    if isinstance(image, np.ndarray):
        im = Image.fromarray(image)
    else:
        im = Image.open(io.BytesIO(image))
        if (source_format or im.format) == _PIL_FORMAT[image_format]:
            return bytes(image)
    if image_format == "jpg" and im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    elif image_format == "png" and im.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        im = im.convert("RGB")  # e.g. CMYK JPEGs
    buf = io.BytesIO()
    im.save(buf, format=_PIL_FORMAT[image_format], **({"quality": quality} if image_format == "jpg" else {}))
    return buf.getvalue()


def to_wds(samples: Iterable[dict], image_format: str, handler: Handler = reraise_exception) -> Iterator[dict]:
    """Turn source samples into webdataset records: __key__, png|jpg, cls, json (bytes, ready to tar)."""
    used: Dict[str, str] = {}
    for s in samples:
        try:
            data = encode_image(s["image"], image_format, s.get("image_format"))
        except Exception as exn:  # noqa: BLE001 - an image PIL cannot re-encode is a bad sample
            if handler(SampleError(s["key"], "cannot encode image", f"{type(exn).__name__}: {exn}")):
                continue
            break
        sid = stable_id(s["key"])
        tkey = tar_key(s["key"])
        if used.setdefault(tkey, s["key"]) != s["key"]:
            tkey = f"{tkey[:_MAX_TAR_KEY - 17]}-{sid:016x}"
        meta = {"key": s["key"], "source": s["source"], "label_name": s["label_name"], "id": sid}
        yield {"__key__": tkey, image_format: data, "cls": str(int(s["label"])).encode("ascii"),
               "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


@dataclass
class ShardReport:
    """What `write_shards` did for one split."""

    split: str
    url: str  # the shards folder
    written: int
    skipped: int
    shards: List[str]  # tar URLs, in order
    counts: List[int]  # samples per shard
    classes: Dict[int, str]  # label -> name
    skip_reasons: Dict[str, int] = field(default_factory=dict)
    resumed: bool = False  # True = found complete with the same parameters; nothing was written
    seconds: float = 0.0

    def summary(self) -> str:
        plural = "" if len(self.shards) == 1 else "s"
        line = (f"{self.split}: {self.written} samples in {len(self.shards)} shard{plural} -> {self.url} "
                f"({self.skipped} skipped)")
        if self.resumed:
            line += " [already written with these parameters; nothing to do]"
        elif self.seconds:
            line += f" in {self.seconds:.1f} s"
        if self.skip_reasons:
            line += "\n  skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(self.skip_reasons.items()))
        return line


def _params(cfg, split: str, limit: int) -> dict:
    d = cfg.data
    return {"source": d.source, "input": str(d.input), "split": split, "limit": int(limit),
            "samples_per_shard": int(d.samples_per_shard), "image_format": d.image_format,
            "format_version": FORMAT_VERSION}


def _report_from_index(url: str, index: dict, resumed: bool) -> ShardReport:
    return ShardReport(
        split=index["params"]["split"], url=url, written=int(index["total"]), skipped=int(index["skipped"]),
        shards=[storage.join(url, s["name"]) for s in index["shards"]], counts=[s["count"] for s in index["shards"]],
        classes={int(k): v for k, v in index["classes"].items()}, skip_reasons=dict(index["skip_reasons"]),
        resumed=resumed)


def read_shard_index(dir_url: str) -> dict:
    """The `_shards.json` of a split folder; NotFound if the split was never (completely) written."""
    url = storage.join(dir_url, INDEX_NAME)
    if not storage.exists(url):
        raise NotFound(f"no complete shards in {dir_url} ({INDEX_NAME} missing): run `vmem shards` first")
    return storage.read_json(url)


def shard_urls(dir_url: str) -> List[str]:
    """The tar URLs of a written split, in order (from `_shards.json`, not from a listing)."""
    return [storage.join(dir_url, s["name"]) for s in read_shard_index(dir_url)["shards"]]


def write_shards(cfg, split: str) -> ShardReport:
    """Write split `split` of `cfg.data.source` as WebDataset tars under `cfg.shards_dir(split)`.

    `cfg.data.splits[split]` samples at most (0 = all), `cfg.data.samples_per_shard` per tar. Unreadable
    samples are skipped and counted, never fatal; a split with no readable sample raises DataError. If a
    complete `_shards.json` with the same parameters exists (and its tars do), nothing is redone.
    """
    from tqdm.auto import tqdm

    storage.configure(cfg.storage)
    if split not in cfg.data.splits:
        raise UserError(f"split {split!r} is not in data.splits ({', '.join(cfg.data.splits) or 'empty'}); "
                        f"add it, e.g. data.splits.{split}=0 for all samples")
    limit = int(cfg.data.splits[split])
    out = cfg.shards_dir(split)
    params = _params(cfg, split, limit)
    index_url = storage.join(out, INDEX_NAME)

    previous = _read_index_or_none(index_url)
    if previous is not None and previous.get("params") == params:
        report = _report_from_index(out, previous, resumed=True)
        if all(storage.exists(u) for u in report.shards):
            log.info("shards for %s already written with the same parameters in %s; skipping", split, out)
            return report
    if previous is not None:
        storage.remove(index_url)  # from here on the split is incomplete until the new index lands

    skips = SkipCounter()
    with phase(f"shards {split}") as timing:
        stream = open_source(cfg.data.source, cfg.data.input, split, limit, handler=skips)
        records = to_wds(unique_keys(stream.samples, skips), cfg.data.image_format, skips)
        first = next(records, None)
        if first is None:
            raise DataError(f"split {split!r} of {cfg.data.input} has no readable samples "
                            f"({skips.count} skipped: {dict(skips.reasons)})")
        names, counts = _write_tars(records, first, out, split, cfg.data.samples_per_shard,
                                    tqdm(total=stream.total, desc=f"shards {split}", unit="img",
                                         mininterval=1.0, disable=None))
        index = {
            "params": params, "total": sum(counts), "skipped": skips.count,
            "skip_reasons": dict(skips.reasons), "skip_examples": skips.examples,
            "shards": [{"name": n, "count": c} for n, c in zip(names, counts)],
            "classes": {str(i): name for i, name in enumerate(stream.classes)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        storage.atomic_write_json(index_url, index)
        _remove_stale_tars(out, split, set(names))
    report = _report_from_index(out, index, resumed=False)
    report.seconds = timing["seconds"]
    return report


def _read_index_or_none(url: str) -> Optional[dict]:
    try:
        return storage.read_json(url) if storage.exists(url) else None
    except (ValueError, OSError) as e:  # unreadable index = incomplete split: rewrite it
        log.warning("ignoring unreadable %s (%s); rewriting the split", url, e)
        return None


def _write_tars(records: Iterator[dict], first: dict, out: str, split: str,
                per_shard: int, bar) -> tuple:
    """Roll records into tars in a local temp folder; publish each finished tar; return (names, counts)."""
    storage.makedirs(out)
    tmp = tempfile.mkdtemp(prefix=f"vmem-shards-{split}-")
    names: List[str] = []
    counts: List[int] = []

    def publish(local_path: str) -> None:
        name = os.path.basename(local_path)
        storage.upload_file(local_path, storage.join(out, name))
        os.remove(local_path)
        names.append(name)
        counts.append(writer.count)  # ShardWriter calls `post` before resetting its per-shard count

    writer = ShardWriter(os.path.join(tmp, f"{split}-%06d.tar"), maxcount=per_shard, post=publish,
                         verbose=0, encoder=False, mtime=0.0)  # fixed mtime: same input, same tar bytes
    try:
        writer.write(first)
        bar.update(1)
        for rec in records:
            writer.write(rec)
            bar.update(1)
        writer.close()  # publishes the last tar
    except BaseException:
        writer.post = None  # a failed run must not publish its unfinished last tar
        if writer.tarstream is not None:
            writer.tarstream.close()
        raise
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return names, counts


def _remove_stale_tars(out: str, split: str, keep: set) -> None:
    """Delete `{split}-NNNNNN.tar` left by an earlier run with more shards (readers listing the folder)."""
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
    for name in storage.listdir(out):
        if pattern.match(name) and name not in keep:
            storage.remove(storage.join(out, name))


# -------------------------------------------------------------------------------------------- reading

def _open_tar(url: str, handler: Handler) -> Iterator[dict]:
    try:
        fs, path = storage.filesystem(url)
        f = fs.open(path, "rb")
    except Exception as exn:  # noqa: BLE001
        if handler(exn):
            return
        raise
    try:
        yield {"url": url, "stream": f}
    finally:
        f.close()


def decode_samples(records: Iterable[dict], handler: Handler = reraise_exception) -> Iterator[dict]:
    """Turn grouped tar records back into samples: key, id, label, label_name, source, image (bytes)."""
    for r in records:
        try:
            ext = next((e for e in IMAGE_EXTS if e in r), None)
            if ext is None or "cls" not in r or "json" not in r:
                raise SampleError(r.get("__key__", "?"), "incomplete sample",
                                  f"members {sorted(k for k in r if not k.startswith('__'))}")
            meta = json.loads(r["json"])
            sample = {"key": meta["key"], "id": int(meta["id"]), "label": int(r["cls"]),
                      "label_name": meta["label_name"], "source": meta["source"], "image": r[ext],
                      "image_format": ext, "tar_key": r["__key__"], "shard": r.get("__url__")}
        except SampleError as exn:
            if handler(exn):
                continue
            break
        except Exception as exn:  # noqa: BLE001 - bad json / cls text
            if handler(SampleError(r.get("__key__", "?"), "bad metadata", f"{type(exn).__name__}: {exn}")):
                continue
            break
        yield sample


def iter_shard_samples(url: str, handler: Handler = reraise_exception,
                       expected: Optional[int] = None) -> Iterator[dict]:
    """Samples of one tar (local or s3://) as dicts: key, id, label, label_name, source, image (bytes),
    image_format, tar_key, shard.

    Built from webdataset's own stages with `handler` as the error policy: with a `SkipCounter`, a damaged
    tar yields the intact samples before the damage and counts the damage; the default re-raises.
    Python's tarfile ends quietly at a broken header or a cut at a member boundary, so pass `expected`
    (the shard's count in `_shards.json`) to turn missing samples into a "samples missing" error too.
    """
    user_handler = handler

    def handler(exn: BaseException) -> bool:
        # webdataset's stages pass raw tarfile/OS errors: name them so they count and read as one line.
        if not isinstance(exn, SampleError) and isinstance(exn, Exception):
            first = exn.args[0] if exn.args and isinstance(exn.args[0], str) else str(exn)
            exn = SampleError(url, "damaged or unreadable tar", f"{type(exn).__name__}: {first.split(' @ ')[0]}")
        return user_handler(exn)

    files = tar_file_expander(_open_tar(url, handler), handler=handler)
    n = 0
    for sample in decode_samples(group_by_keys(files, handler=handler), handler):
        n += 1
        yield sample
    if expected is not None and n < expected:
        handler(SampleError(url, "samples missing from shard",
                            f"{n} of {expected} readable; the tar is truncated or corrupt"))


def iter_split_samples(dir_url: str, handler: Handler = reraise_exception) -> Iterator[dict]:
    """All samples of a written split, shard by shard, each shard checked against its count in the index."""
    for s in read_shard_index(dir_url)["shards"]:
        yield from iter_shard_samples(storage.join(dir_url, s["name"]), handler, expected=int(s["count"]))
