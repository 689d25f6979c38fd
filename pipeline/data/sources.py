"""Dataset adapters: each turns one split of an input into a stream of sample dicts.

A sample is `{"key": str, "image": bytes | np.ndarray, "label": int, "label_name": str, "source": str}`:
`image` is either encoded file bytes (png/jpg/... as found on disk) or a raw uint8 array (IDX pixels).

As in webdataset, every stage is a small generator over samples that takes an error `handler`: a bad
sample becomes an exception passed to `handler(exn)`, which re-raises (strict), returns True (skip it and
go on) or False (stop). `SkipCounter` is the skip-and-count policy the shard writer uses.

Sources are found by name in a registry (`open_source(name, ...)`); adding one is one decorated function.
"""
from __future__ import annotations

import gzip
import io
import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
from webdataset.handlers import reraise_exception

from pipeline import storage
from pipeline.errors import DataError, NotFound, UserError

log = logging.getLogger("vmem.data")

Handler = Callable[[BaseException], bool]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Files an image-folder source offers as images; anything else in the tree (README, .DS_Store) is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class SampleError(DataError):
    """One sample that cannot be used; `reason` is a short category used to count skips."""

    def __init__(self, key: str, reason: str, detail: str = ""):
        self.key, self.reason, self.detail = key, reason, detail
        self.message = f"{key}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(self.message)

    def __str__(self) -> str:
        # webdataset's stages append context to `args` when an error passes through them; keep one line.
        return self.message


class SkipCounter:
    """Error handler that skips bad samples and counts them by reason (webdataset's handler protocol)."""

    def __init__(self, max_examples: int = 20, max_warnings: int = 10):
        self.count = 0
        self.reasons: Counter = Counter()
        self.examples: List[str] = []
        self.max_examples, self.max_warnings = max_examples, max_warnings

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, (KeyboardInterrupt, SystemExit)):
            raise exn
        self.count += 1
        self.reasons[getattr(exn, "reason", None) or type(exn).__name__] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(exn)[:300])
        # A folder of 10k broken files should not print 10k lines: warn about the first few only.
        if self.count <= self.max_warnings:
            log.warning("skipped: %s", exn)
        elif self.count == self.max_warnings + 1:
            log.warning("more samples skipped; the counts by reason are in the report")
        return True


@dataclass
class SourceStream:
    """One split of one source: its samples, its full class list (label -> name) and a size hint."""

    name: str
    split: str
    classes: List[str]
    samples: Iterator[dict]
    total: Optional[int] = None  # samples it will offer (before skips), for progress bars; None = unknown


# ---------------------------------------------------------------------------------------------- stages

def _call(handler: Handler, exn: BaseException) -> bool:
    """Apply the handler; True = continue with the next sample, False = stop the stream."""
    return bool(handler(exn))


def verify_image(data: bytes) -> str:
    """The PIL format name ("PNG", "JPEG", ...) of encoded image bytes; raises if they do not fully decode.

    `verify()` checks the structure (CRCs, markers) but not the pixel data, and a verified image cannot be
    loaded, so the bytes are opened a second time and decoded completely (truncated files fail here).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.verify()
        fmt = im.format
    with Image.open(io.BytesIO(data)) as im:
        im.load()
    return fmt


def check_images(samples: Iterable[dict], handler: Handler = reraise_exception) -> Iterator[dict]:
    """Pass samples whose image decodes completely; others go to `handler` as `SampleError`s.

    Encoded samples gain `image_format` (the PIL format name). Raw arrays are checked for dtype and shape.
    """
    for sample in samples:
        image = sample["image"]
        try:
            if isinstance(image, np.ndarray):
                if image.dtype != np.uint8 or image.ndim not in (2, 3):
                    raise ValueError(f"expected a uint8 HxW or HxWxC array, got {image.dtype} {image.shape}")
            else:
                sample["image_format"] = verify_image(image)
        except Exception as exn:  # noqa: BLE001 - any decoder failure means "unreadable image"
            if _call(handler, SampleError(sample["key"], "unreadable image", f"{type(exn).__name__}: {exn}")):
                continue
            break
        yield sample


def take(samples: Iterable[dict], n: int) -> Iterator[dict]:
    """The first `n` samples (all of them when n == 0)."""
    return iter(samples) if not n else itertools.islice(samples, n)


def unique_keys(samples: Iterable[dict], handler: Handler = reraise_exception) -> Iterator[dict]:
    """Drop samples whose key was already seen (a key names one item; duplicates would share an id)."""
    seen: set = set()
    for sample in samples:
        if sample["key"] in seen:
            if _call(handler, SampleError(sample["key"], "duplicate key")):
                continue
            break
        seen.add(sample["key"])
        yield sample


# -------------------------------------------------------------------------------------------- registry

SOURCES: Dict[str, Callable[..., SourceStream]] = {}


def register_source(name: str):
    """Register `fn(input, split, limit=0, handler=...) -> SourceStream` under `name`."""

    def wrap(fn):
        SOURCES[name] = fn
        return fn

    return wrap


def available_sources() -> List[str]:
    return sorted(SOURCES)


def open_source(name: str, input: str, split: str, limit: int = 0,
                handler: Handler = reraise_exception) -> SourceStream:
    """Open split `split` of source `name` reading from `input`; at most `limit` samples (0 = all)."""
    if name not in SOURCES:
        raise UserError(f"unknown data source {name!r}: valid sources are {', '.join(available_sources())}")
    if limit < 0:
        raise UserError(f"sample limit for split {split!r} must be >= 0 (0 = all), got {limit}")
    return SOURCES[name](input, split, limit=limit, handler=handler)


# ----------------------------------------------------------------------------------------- Fashion-MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(url: str) -> np.ndarray:
    """An IDX file (raw or gzip) as a numpy array of its declared shape; DataError if malformed."""
    data = storage.read_bytes(url)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{url} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DataError(f"{url}: header says shape {dims} ({expected} bytes) but it holds {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def _find_idx(input: str, prefix: str, kind: str) -> str:
    for name in (f"{prefix}-{kind}.gz", f"{prefix}-{kind}"):
        url = storage.join(input, name)
        if storage.exists(url):
            return url
    raise NotFound(f"Fashion-MNIST file {prefix}-{kind}[.gz] not found in {input} "
                   f"(data.input should be the folder holding the IDX files)")


@register_source("fashion_mnist")
def fashion_mnist(input: str, split: str, limit: int = 0, handler: Handler = reraise_exception) -> SourceStream:
    """Fashion-MNIST from its IDX files: split "train" (60k) or "test" (10k, the t10k-* files).

    `limit` takes the first n images in file order (the files are shuffled, so any prefix is close to
    class-balanced: the first 20,000 train images hold 1,935-2,068 per class). Keys are
    `fashion_mnist/<split>/<index in the file, 6 digits>`, so they stay the same for any limit.
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise UserError(f"Fashion-MNIST has splits {', '.join(prefixes)}; got {split!r}")
    images = read_idx(_find_idx(input, prefixes[split], "images-idx3-ubyte"))
    labels = read_idx(_find_idx(input, prefixes[split], "labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: {images.shape} images do not match {labels.shape} labels")
    n = len(images) if not limit else min(limit, len(images))

    def samples() -> Iterator[dict]:
        for i in range(n):
            label = int(labels[i])
            if not 0 <= label < len(FASHION_MNIST_CLASSES):
                if _call(handler, SampleError(f"fashion_mnist/{split}/{i:06d}", "label out of range", str(label))):
                    continue
                break
            yield {"key": f"fashion_mnist/{split}/{i:06d}", "image": images[i], "label": label,
                   "label_name": FASHION_MNIST_CLASSES[label], "source": "fashion_mnist"}

    return SourceStream("fashion_mnist", split, list(FASHION_MNIST_CLASSES), samples(), n)


# ------------------------------------------------------------------------------------------ image folder

def _subdirs(fs, path: str) -> List[str]:
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                  if fs.isdir(p) and not p.rstrip("/").rsplit("/", 1)[-1].startswith("."))


def _image_files(fs, class_dir: str) -> List[str]:
    files = fs.find(class_dir, detail=False)  # recursive; sorted below for a deterministic order
    return sorted(p for p in files if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS
                  and not os.path.basename(p).startswith("."))


def _interleave(lists: List[List[str]]) -> List[str]:
    """Round-robin over the lists: class 0 file 0, class 1 file 0, ..., class 0 file 1, ..."""
    return [x for group in itertools.zip_longest(*lists) for x in group if x is not None]


@register_source("image_folder")
def image_folder(input: str, split: str, limit: int = 0, handler: Handler = reraise_exception) -> SourceStream:
    """An ImageNet-style tree `input/<split>/<class_name>/<file>` (local or s3://).

    Labels are indices into the sorted union of class-folder names over all split folders under `input`,
    so train and test agree even when a split lacks a class. Files are offered class by class in turn
    (round-robin, files sorted by path), so `limit` gives a deterministic class-balanced subset; it counts
    readable images only. Corrupt or unreadable images are passed to `handler` (skipped by the writer).
    Keys are `<split>/<class>/<path below the class folder>`.
    """
    fs, root = storage.filesystem(input)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise NotFound(f"image folder {input} does not exist (expected {input}/<split>/<class>/<images>)")
    splits = _subdirs(fs, root)
    if split not in splits:
        raise NotFound(f"split folder {split!r} not found under {input}; found: {', '.join(splits) or 'none'}")
    class_dirs = {s: _subdirs(fs, f"{root}/{s}") for s in splits}
    classes = sorted(set(itertools.chain.from_iterable(class_dirs.values())))
    present = class_dirs[split]
    if not present:
        raise NotFound(f"{input}/{split} holds no class folders (expected {split}/<class>/<images>)")
    per_class = [_image_files(fs, f"{root}/{split}/{c}") for c in present]
    order = _interleave(per_class)
    label_of = {c: i for i, c in enumerate(classes)}

    def read(paths: List[str]) -> Iterator[dict]:
        for path in paths:
            rel = path[len(root) + 1:]  # <split>/<class>/<file...>
            class_name = rel.split("/")[1]
            try:
                data = fs.cat_file(path)
            except Exception as exn:  # noqa: BLE001 - permissions, vanished files, network errors
                if _call(handler, SampleError(rel, "unreadable file", f"{type(exn).__name__}: {exn}")):
                    continue
                break
            yield {"key": rel, "image": data, "label": label_of[class_name], "label_name": class_name,
                   "source": "image_folder"}

    samples = take(check_images(read(order), handler), limit)
    total = len(order) if not limit else min(limit, len(order))
    return SourceStream("image_folder", split, classes, samples, total)
