"""Encoder registry, preprocessing and weight loading: real modules, real weights, real Fashion-MNIST."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.embed.encoders import available_encoders, create_encoder, load_strict
from pipeline.embed.preprocess import PreprocessSpec, decode_image, preprocess
from pipeline.errors import DataError, UserError

# Published feature dimensions; the parametrized tests below cover every registered encoder.
EXPECTED_DIMS = {"efficientnet_lite0": 1280, "efficientnet_lite1": 1280, "efficientnet_lite2": 1280,
                 "dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024, "dinov2_vitg14": 1536,
                 "clip_vitb16": 512, "clip_vitl14": 768}
# Too big to allocate in a unit test on 2 cores: checked on the 'meta' device (architecture, no weights).
BIG = {"dinov2_vitl14": 304e6, "dinov2_vitg14": 1136e6, "clip_vitl14": 304e6}
SMALL_SIZE = {"efficientnet": 64, "dinov2": 56, "clip": 64}


def _fmnist(kind: str, n: int, fmnist_dir: str):
    from pipeline.data.sources import read_idx

    prefix = {"train": "train", "test": "t10k"}[kind]
    x = read_idx(os.path.join(fmnist_dir, f"{prefix}-images-idx3-ubyte.gz"))[:n]
    y = read_idx(os.path.join(fmnist_dir, f"{prefix}-labels-idx1-ubyte.gz"))[:n]
    return [Image.fromarray(a) for a in x], np.asarray(y)


def test_registry_has_the_promised_encoders():
    assert set(EXPECTED_DIMS) <= set(available_encoders())


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(UserError, match="efficientnet_lite0.*dinov2_vitg14|dinov2_vitg14.*efficientnet_lite0"):
        create_encoder("resnet50")


@pytest.mark.parametrize("name", available_encoders())
def test_encoder_output_shape_and_norm(name):
    if name in BIG:
        enc = create_encoder(name, pretrained=False, device="meta")
        n_params = sum(p.numel() for p in enc.model.parameters())
        assert abs(n_params - BIG[name]) / BIG[name] < 0.03, n_params
        f = enc.model(torch.empty(2, 3, 224, 224, device="meta"))
        assert tuple(f.shape) == (2, enc.dim)
    else:
        torch.manual_seed(0)
        size = SMALL_SIZE[name.split("_")[0]]
        enc = create_encoder(name, pretrained=False, image_size=size)
        assert enc.preprocess.crop_size == size and enc.image_size == size
        imgs = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (40, 50, 3), np.uint8)) for i in range(3)]
        x = enc.encode(imgs, batch_size=2)
        assert x.shape == (3, enc.dim) and x.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
        assert not np.allclose(x[0], x[1])  # different images, different features
    if name in EXPECTED_DIMS:
        assert enc.dim == EXPECTED_DIMS[name]


def test_native_preprocessing_recipes():
    d = create_encoder("dinov2_vits14", pretrained=False, device="meta").preprocess
    assert (d.resize_size, d.crop_size, d.interpolation, d.mean) == (256, 224, "bicubic", (0.485, 0.456, 0.406))
    c = create_encoder("clip_vitb16", pretrained=False, device="meta").preprocess
    assert (c.resize_size, c.crop_size) == (224, 224) and c.mean[0] == pytest.approx(0.48145466)
    e0 = create_encoder("efficientnet_lite0", pretrained=False, device="meta").preprocess
    e2 = create_encoder("efficientnet_lite2", pretrained=False, device="meta").preprocess
    assert (e0.resize_size, e0.crop_size, e0.mean, e0.std) == (256, 224, (0.5,) * 3, (0.5,) * 3)
    assert (e2.resize_size, e2.crop_size) == (292, 260)
    assert e0.at_size(112) == PreprocessSpec(128, 112, "bicubic", (0.5,) * 3, (0.5,) * 3)


def test_preprocess_matches_hand_computation():
    rng = np.random.RandomState(0)
    arr = rng.randint(0, 256, (60, 100), np.uint8)  # greyscale, landscape
    spec = PreprocessSpec(resize_size=30, crop_size=24, interpolation="bilinear", mean=(0.5, 0.4, 0.3),
                          std=(0.2, 0.25, 0.5))
    x = preprocess(Image.fromarray(arr), spec)
    assert x.shape == (3, 24, 24) and x.dtype == np.float32
    # short side 60 -> 30, long side int(30 * 100 / 60) = 50; centre crop offsets round((30-24)/2), ((50-24)/2)
    ref = np.asarray(Image.fromarray(arr).convert("RGB").resize((50, 30), Image.BILINEAR), np.float32)[3:27, 13:37]
    ref = (ref / 255.0 - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    np.testing.assert_allclose(x, ref.transpose(2, 0, 1), atol=1e-5)


def test_decode_image_greyscale_to_rgb_and_refuses_garbage():
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (28, 28) and img.getpixel((3, 3)) == (200, 200, 200)
    with pytest.raises(DataError, match="cannot decode"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"not really a png")


def test_efficientnet_weights_fit_strictly_and_misfits_are_named():
    from efficientnet_lite_pytorch import EfficientNet

    from pipeline.embed.encoders import _efficientnet_weights_path

    state = torch.load(_efficientnet_weights_path(0), map_location="cpu", weights_only=True)
    assert len(state) == 296
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    load_strict(net, state, "lite0")
    bad = dict(state)
    bad.pop("_conv_head.weight")
    bad["_extra.weight"] = torch.zeros(1)
    bad["_fc.bias"] = torch.zeros(10)
    with pytest.raises(UserError, match=r"missing keys: _conv_head.weight.*unexpected keys: _extra.weight.*_fc.bias"):
        load_strict(net, bad, "lite0")
    # lite1 weights into the lite0 architecture: shapes differ
    state1 = torch.load(_efficientnet_weights_path(2), map_location="cpu", weights_only=True)
    with pytest.raises(UserError, match="do not fit"):
        load_strict(net, state1, "lite2 into lite0")


def _knn_accuracy(enc, xtr, ytr, xte, yte, k=10):
    a, b = enc.encode(xtr, batch_size=16), enc.encode(xte, batch_size=16)
    idx = np.argsort(-(b @ a.T), axis=1)[:, :k]
    pred = np.array([np.bincount(ytr[row], minlength=10).argmax() for row in idx])
    return float((pred == yte).mean())


def test_efficientnet_lite0_features_are_imagenet_trained(fmnist_dir):
    """Pretrained features separate Fashion-MNIST classes far better than the same net at random init."""
    xtr, ytr = _fmnist("train", 500, fmnist_dir)
    xte, yte = _fmnist("test", 200, fmnist_dir)
    pretrained = _knn_accuracy(create_encoder("efficientnet_lite0", image_size=112), xtr, ytr, xte, yte)
    torch.manual_seed(0)
    random = _knn_accuracy(create_encoder("efficientnet_lite0", pretrained=False, image_size=112),
                           xtr, ytr, xte, yte)
    # measured: 0.785 pretrained vs 0.645 random (chance is 0.1)
    assert pretrained > 0.72, pretrained
    assert pretrained > random + 0.08, (pretrained, random)


def test_hub_weights_offline_fail_clearly():
    code = ("from pipeline.embed.encoders import create_encoder\n"
            "from pipeline.errors import UserError\n"
            "try:\n    create_encoder('dinov2_vits14', pretrained=True)\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME="/tmp/vmem-empty-hf-home")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "USERERROR" in out.stdout, out.stdout + out.stderr
    assert "facebook/dinov2-small" in out.stdout and "embed.pretrained=false" in out.stdout
