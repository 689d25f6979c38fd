"""The GPU path check: what a GPU buys each heavy stage, measured once, printed as one table.

Rows (each measured on CPU and, where a CUDA device is visible, on GPU, with the GPU/CPU ratio):
  1. encoder images/s (model forward on a pre-made normalised batch, bf16 autocast on GPU):
     `efficientnet_lite0` and a randomly initialised DINOv2 ViT-L/14 (`create_encoder(..., pretrained=False)`,
     the real architecture, so the figure is the real model's cost).
  2. faiss search QPS on one synthetic IVF-PQ index (1M x 256 clustered vectors, IVF1024,PQ32 by default):
     the CPU index vs the same index copied to the GPU (`faiss.index_cpu_to_gpu`), plus exact search by a
     bf16 matmul on the GPU in torch as the reference the paper used. The GPU results' overlap with the
     CPU results is printed so a fast-but-wrong GPU path shows.
  3. the Ray embedding stage (`pipeline.embed.stage.embed_split`) on a few thousand synthetic images:
     images/s of the whole stage (decode + preprocess + encode + Parquet), and the GPU utilisation sampled
     every 0.25 s with `nvidia-smi --query-gpu=utilization.gpu --format=csv` while it runs.

A row that cannot run here (no GPU, faiss without GPU support, Ray or the stage missing) prints
`skipped: <reason>` instead of failing; the script exits non-zero only if a row that could run failed.
Usage: `bash benchmarks/gpu_check.sh [--small] [--json OUT.json]` (the shell wrapper prepares a venv).

Measured on one NVIDIA H200 + 16 vCPUs (2026-11, torch 2.11 cu130, faiss-cpu 1.13.2: no faiss-gpu wheel for
CUDA 13 could be installed there, so the faiss GPU row was skipped):
  efficientnet_lite0 224 px      CPU 118 img/s    GPU 18,876 img/s  (160x)
  dinov2_vitl14 224 px (random)  CPU 5.1 img/s    GPU 2,073 img/s   (406x)
  IVF4096,PQ32 1M x 256, nprobe 16, 10k queries: CPU 49,406 QPS; exact bf16 matmul on GPU 113,336 QPS
  (IVF-PQ top-10 overlap with exact: 0.185 on this synthetic data - PQ32 caps recall, as in docs/peers)
  Ray embedding stage, dinov2_vitl14, 4,000 JPEGs of 256 px, 1 actor: 113 img/s, GPU utilisation mean 2% (an earlier version: end to end incl. actor start-up; steady state now measured, not yet re-run)
  (max 46%): the stage is bound by CPU decode/preprocess, not by the GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

ROWS: List[Dict] = []  # {"check", "cpu", "gpu", "unit", "note"}
FAILED: List[str] = []


def row(check: str, unit: str, cpu: Optional[float] = None, gpu: Optional[float] = None, note: str = "") -> None:
    ROWS.append({"check": check, "unit": unit, "cpu": cpu, "gpu": gpu, "note": note})
    print(f"  {check}: cpu={_fmt(cpu)} gpu={_fmt(gpu)} {unit} {note}", flush=True)


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}"


def section(name: str, fn: Callable[[], None]) -> None:
    """Run one check; an unexpected exception is reported as a failed row, the other checks still run."""
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report every failure, keep measuring the rest
        traceback.print_exc()
        FAILED.append(name)
        row(name, "", note=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if cuda_available() else "none"


# ------------------------------------------------------------------------------------------------ encoders

def encoder_rate(name: str, device: str, batch: int, image_size: Optional[int], seconds: float,
                 max_batches: int) -> float:
    """Images/s of `Encoder.encode_tensor` on a fixed random batch (after one warm-up batch)."""
    import torch

    from pipeline.embed.encoders import create_encoder

    enc = create_encoder(name, pretrained=False, image_size=image_size, device=device)
    size = enc.image_size
    x = torch.randn(batch, 3, size, size)
    if device == "cuda":
        x = x.to("cuda")
    enc.encode_tensor(x)  # warm-up: cuDNN autotune, lazy init
    n, t0 = 0, time.perf_counter()
    while n < max_batches and (n == 0 or time.perf_counter() - t0 < seconds):
        enc.encode_tensor(x)  # returns on CPU, so each call is synchronised
        n += 1
    rate = n * batch / (time.perf_counter() - t0)
    del enc
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate


def check_encoders(args) -> None:
    gpu = cuda_available()
    for name, cpu_batch, gpu_batch in (("efficientnet_lite0", 16, 256), ("dinov2_vitl14", 4, 256)):
        size = args.image_size if args.small else None
        cpu = encoder_rate(name, "cpu", cpu_batch if not args.small else 2, size, args.seconds,
                           max_batches=3 if args.small else 20)
        g = encoder_rate(name, "cuda", gpu_batch, size, args.seconds, 200) if gpu else None
        res = f"{size} px" if size else "native px"
        row(f"encoder {name} ({res})", "img/s", cpu, g,
            (f"GPU/CPU {g / cpu:.0f}x, bf16 autocast" if g else "GPU skipped: no CUDA device"))


# ------------------------------------------------------------------------------------------------ faiss

def synthetic(nb: int, nq: int, d: int, seed: int = 0):
    """Clustered, L2-normalised float32 vectors: xb (nb, d) and xq (nq, d) drawn from the same clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1024, d)).astype(np.float32)

    def draw(n):
        out = np.empty((n, d), np.float32)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            c = centres[rng.integers(0, len(centres), m)]
            out[s:s + m] = c + 0.6 * rng.standard_normal((m, d)).astype(np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    return draw(nb), draw(nq)


def qps(search: Callable[[], object], nq: int, seconds: float) -> float:
    search()  # warm-up
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        search()
        n += 1
    return n * nq / (time.perf_counter() - t0)


def check_faiss(args) -> None:
    import faiss

    from pipeline.index.recall import recall_at  # the top-k overlap of two (nq, k) id arrays

    nb, d, nq, k, nprobe = args.nb, args.dim, args.nq, 10, args.nprobe
    key = args.index_key
    xb, xq = synthetic(nb, nq, d)
    index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    index.train(xb[: min(nb, args.train)])
    index.add(xb)
    print(f"   built {key} on {nb:,} x {d} in {time.perf_counter() - t0:.1f} s "
          f"(faiss {faiss.__version__}, {faiss.omp_get_max_threads()} CPU threads)", flush=True)
    faiss.extract_index_ivf(index).nprobe = nprobe
    _, I_cpu = index.search(xq, k)
    cpu = qps(lambda: index.search(xq, k), nq, args.seconds)

    gpu, note = None, ""
    if not cuda_available():
        note = "GPU skipped: no CUDA device"
    elif not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        note = ("GPU skipped: this faiss has no GPU support (faiss-cpu installed; the GPU recipe is "
                "`pip uninstall faiss-cpu && pip install faiss-gpu-cu12==1.12.0`)")
    else:
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True  # PQ32 lookup tables in fp16: needed for >= 32 bytes/code on older GPUs
        gindex = faiss.index_cpu_to_gpu(res, 0, index, co)
        faiss.GpuParameterSpace().set_index_parameter(gindex, "nprobe", nprobe)
        _, I_gpu = gindex.search(xq, k)
        gpu = qps(lambda: gindex.search(xq, k), nq, args.seconds)
        note = f"GPU/CPU {gpu / cpu:.1f}x; GPU top-{k} overlap with CPU {recall_at(I_gpu, I_cpu, k):.3f}"
    row(f"faiss {key} nprobe={nprobe} search, {nq:,} queries k={k}", "QPS", cpu, gpu, note)

    if cuda_available():
        import torch

        xb_t = torch.from_numpy(xb).to("cuda", torch.bfloat16)
        xq_t = torch.from_numpy(xq).to("cuda", torch.bfloat16)

        def exact():
            for s in range(0, nq, 4096):
                torch.topk(xq_t[s:s + 4096] @ xb_t.T, k, dim=1)
            torch.cuda.synchronize()

        g = qps(exact, nq, args.seconds)
        _, I_ex = torch.topk(xq_t @ xb_t.T, k, dim=1)
        row(f"exact search (bf16 matmul + topk, torch) on {nb:,} x {d}", "QPS", None, g,
            f"IVF-PQ CPU top-{k} overlap with exact {recall_at(I_cpu, I_ex.cpu().numpy(), k):.3f}")
        del xb_t, xq_t
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ Ray stage

class GpuSampler:
    """Samples `nvidia-smi --query-gpu=utilization.gpu` every `period` s in a thread until stopped."""

    def __init__(self, period: float = 0.25):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv"],
                                 capture_output=True, text=True, timeout=10).stdout
            # csv: a header line "utilization.gpu [%]" then "87 %" per GPU; take GPU 0.
            lines = [ln for ln in out.splitlines()[1:] if ln.strip()]
            if lines:
                self.samples.append((time.perf_counter(), float(lines[0].split()[0])))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_synthetic_folder(root: Path, n: int, classes: int, size: int) -> None:
    """`root/train/c<j>/<i>.jpg`: n random JPEGs (noise over a per-class colour) in an ImageNet-style tree."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % classes
        folder = root / "train" / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(37 * c) % 256, (91 * c) % 256, (151 * c) % 256], np.int16)
        img = np.clip(base + rng.integers(-60, 60, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)


def check_stage(args) -> None:
    gpu = cuda_available()
    try:
        import ray  # noqa: F401

        from pipeline.data.shards import write_shards
        from pipeline.embed.stage import embed_split
    except ImportError as e:
        row("Ray embedding stage", "img/s", note=f"skipped: {e}")
        return
    from pipeline.config import load_config
    from pipeline.runtime import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="vmem-gpucheck-"))
    try:
        n = args.stage_images
        write_synthetic_folder(tmp / "images", n, classes=10, size=args.stage_image_px)
        encoder = args.stage_encoder or ("dinov2_vitl14" if gpu else "efficientnet_lite0")
        overrides = [
            f"workdir={tmp / 'work'}", "data.source=image_folder", f"data.input={tmp / 'images'}",
            "data.splits={train: 0}", f"data.samples_per_shard={max(1, n // 32)}", "data.image_format=jpg",
            f"embed.encoder={encoder}", "embed.pretrained=false", f"embed.device={'cuda' if gpu else 'cpu'}",
            f"embed.batch_size={256 if gpu else 16}", f"embed.preprocess_batch_size={256 if gpu else 64}",
            f"embed.num_actors=1", f"embed.cpus_per_actor={4 if gpu else 1}",
            f"ray.num_cpus={os.cpu_count() if gpu else 2}",
        ]
        if args.small:
            overrides.append(f"embed.image_size={args.image_size}")
        cfg = load_config(None, overrides)
        write_shards(cfg, "train")
        init_ray(cfg)
        sampler = GpuSampler() if gpu and shutil.which("nvidia-smi") else contextlib.nullcontext()
        t0 = time.perf_counter()
        with sampler:
            report = embed_split(cfg, "train")
        seconds = time.perf_counter() - t0
        # Steady state = after the first batch came back: actor start and model load are excluded, since
        # on a GPU they can take longer than embedding a few thousand images.
        rate = report.steady_images_per_s
        note = (f"{encoder}, {n} images of {args.stage_image_px} px, 1 actor; {report.images_per_s:.0f} img/s "
                f"including {report.warmup_seconds:.1f} s warm-up")
        warm = t0 + report.warmup_seconds
        if gpu and isinstance(sampler, GpuSampler) and any(t >= warm for t, _ in sampler.samples):
            s = np.array([u for t, u in sampler.samples if t >= warm])
            busy = s[s > 0]
            note += (f"; GPU util mean {s.mean():.0f}%, median {np.median(s):.0f}%, max {s.max():.0f}% "
                     f"over {len(s)} samples ({len(busy)} non-zero, median of those "
                     f"{np.median(busy) if len(busy) else 0:.0f}%)")
            row("Ray embedding stage", "img/s", None, rate, note)
            row("Ray embedding stage GPU utilisation (mean of samples)", "%", None, float(s.mean()),
                "nvidia-smi --query-gpu=utilization.gpu every 0.25 s, after warm-up")
        else:
            row("Ray embedding stage", "img/s", rate, None,
                note + ("; GPU utilisation skipped: no CUDA device" if not gpu else "; no nvidia-smi"))
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ main

def print_table() -> None:
    width = max(len(r["check"]) for r in ROWS) if ROWS else 10
    print()
    print(f"{'check':<{width}}  {'CPU':>10}  {'GPU':>10}  {'unit':<6} note")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 10}  {'-' * 6} ----")
    for r in ROWS:
        print(f"{r['check']:<{width}}  {_fmt(r['cpu']):>10}  {_fmt(r['gpu']):>10}  {r['unit']:<6} {r['note']}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke run, ~30 s on 2 cores)")
    p.add_argument("--only", choices=["encoders", "faiss", "stage"], action="append",
                   help="run only these checks (default: all)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--seconds", type=float, default=None, help="timing window per measurement")
    p.add_argument("--nb", type=int, default=None, help="database vectors (default 1M; --small 20k)")
    p.add_argument("--dim", type=int, default=None, help="vector dimension (default 256; --small 64)")
    p.add_argument("--nq", type=int, default=None, help="queries (default 10k; --small 500)")
    p.add_argument("--index-key", default=None, help="faiss factory string (default IVF1024,PQ32)")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--train", type=int, default=65_536, help="training vectors")
    p.add_argument("--stage-images", type=int, default=None, help="images for the Ray stage (default 16000)")
    p.add_argument("--stage-image-px", type=int, default=None)
    p.add_argument("--stage-encoder", default=None, help="default dinov2_vitl14 on GPU, efficientnet_lite0 on CPU")
    p.add_argument("--image-size", type=int, default=56, help="encoder input size with --small")
    args = p.parse_args(argv)
    small = args.small
    defaults = dict(seconds=(1.0 if small else 5.0), nb=(20_000 if small else 1_000_000), dim=(64 if small else 256),
                    nq=(500 if small else 10_000), index_key=("IVF64,PQ16x4" if small else "IVF1024,PQ32"),
                    stage_images=(200 if small else 16000), stage_image_px=(64 if small else 256))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    import platform

    print(f"visual-memory GPU path check: python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"GPU {gpu_name()}{' (--small)' if small else ''}", flush=True)
    if not cuda_available():
        print("No CUDA device visible: GPU rows are skipped; CPU rows still run.", flush=True)
    checks = {"encoders": check_encoders, "faiss": check_faiss, "stage": check_stage}
    for name in args.only or list(checks):
        section(name, lambda fn=checks[name]: fn(args))
    print_table()
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu_name(), "small": small, "rows": ROWS,
                                               "failed": FAILED}, indent=1))
    if FAILED:
        print(f"\nFAILED checks: {', '.join(FAILED)}", file=sys.stderr)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
