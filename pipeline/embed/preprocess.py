"""Image decoding and eval-time preprocessing with PIL + numpy (no torchvision).

A `PreprocessSpec` is the recipe an encoder was trained/evaluated with: resize the short side to
`resize_size`, centre-crop `crop_size`, scale to [0, 1], normalise with `mean`/`std`, channels first. It
travels with the encoder (timm's pretrained-config idea), so configs never repeat it. The arithmetic follows
torchvision's `Resize(int)` + `CenterCrop` so that published preprocessing recipes carry over exactly.
"""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Tuple

import numpy as np
from PIL import Image

from pipeline.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # TF EfficientNet-Lite: (x - 127.5) / 127.5
INCEPTION_STD = (0.5, 0.5, 0.5)

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class PreprocessSpec:
    """Eval preprocessing: short side -> `resize_size`, centre crop `crop_size`, normalise, CHW float32.

    `antialias`: PIL's bilinear/bicubic filters always low-pass when shrinking (torchvision's
    `antialias=True`, what every encoder here uses); `False` is refused rather than silently ignored.
    """

    resize_size: int
    crop_size: int
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    antialias: bool = True

    def __post_init__(self) -> None:
        assert self.interpolation in _RESAMPLE, f"interpolation must be one of {sorted(_RESAMPLE)}"
        assert self.resize_size >= self.crop_size > 0, "need resize_size >= crop_size > 0"
        assert len(self.mean) == 3 and len(self.std) == 3, "mean/std need 3 channels"
        assert self.antialias, "PIL resizing always antialiases; antialias=False is not supported"
        # Tuples even when built from JSON lists, so specs compare and hash by value.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def crop_pct(self) -> float:
        return self.crop_size / self.resize_size

    def at_size(self, image_size: int) -> "PreprocessSpec":
        """The same recipe at another crop size (the resize keeps the crop/resize ratio)."""
        resize = int(round(image_size / self.crop_pct))
        return dataclasses.replace(self, resize_size=max(resize, image_size), crop_size=image_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(**d)


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (PNG, JPEG, ...) into an RGB PIL image; greyscale/palette/alpha become RGB.

    Raises `DataError` for bytes PIL cannot decode (truncated or not an image).
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: Image.open is lazy and would fail later, far from the cause
    except Exception as e:
        raise DataError(f"cannot decode image ({len(data)} bytes): {e}") from e
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize_short_side(img: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = img.size
    # torchvision Resize(int): short side -> size, long side -> int(size * long / short)
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample=resample)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    # torchvision CenterCrop rounding
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One PIL image -> normalised (3, crop, crop) float32 array, as `spec` says."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = _resize_short_side(img, spec.resize_size, _RESAMPLE[spec.interpolation])
    img = _center_crop(img, spec.crop_size)
    x = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(images, spec: PreprocessSpec) -> np.ndarray:
    """A list of PIL images -> (n, 3, crop, crop) float32."""
    out = np.empty((len(images), 3, spec.crop_size, spec.crop_size), np.float32)
    for i, img in enumerate(images):
        out[i] = preprocess(img, spec)
    return out
