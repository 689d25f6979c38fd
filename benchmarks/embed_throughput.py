"""Images/s of the Ray Data embedding stage vs a plain single-process torch loop, same images, same run.

Both sides read the same WebDataset shards, decode + preprocess with the encoder's own `PreprocessSpec`
and run the same encoder with the same batch size. The plain loop is the ceiling on one machine (no Ray,
no serialisation); the ratio says what the streaming stage costs (or gains by overlapping decode with
encoding). The Ray figure is end to end, actor start-up and Parquet writes included.

    .venv/bin/python benchmarks/embed_throughput.py --n 20000 --image-size 112 --batch-size 16
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="Fashion-MNIST train images (default: the demo memory size)")
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="default: a temp folder, removed afterwards")
    args = ap.parse_args()

    import ray
    import torch

    from pipeline.config import load_config
    from pipeline.data.shards import iter_shard_samples, write_shards
    from pipeline.embed.encoders import create_encoder
    from pipeline.embed.preprocess import decode_image, preprocess
    from pipeline.embed.stage import embed_split
    from pipeline.runtime import init_ray, setup_logging

    setup_logging("WARNING")
    workdir = args.workdir or tempfile.mkdtemp(prefix="vmem-bench-embed-")
    cfg = load_config(None, [f"workdir={workdir}", f"data.splits={{train: {args.n}}}",
                             f"data.samples_per_shard={args.per_shard}", f"embed.encoder={args.encoder}",
                             f"embed.image_size={args.image_size}", f"embed.batch_size={args.batch_size}",
                             f"ray.num_cpus={args.num_cpus}", "embed.device=cpu"])
    try:
        shards = write_shards(cfg, "train")

        # Plain loop: read + decode + preprocess + encode, one process, torch's default threads.
        enc = create_encoder(args.encoder, image_size=args.image_size)
        spec = enc.preprocess
        enc.encode_tensor(np.zeros((args.batch_size, 3, spec.crop_size, spec.crop_size), np.float32))  # warm-up

        def plain_loop() -> tuple:
            t0 = time.perf_counter()
            n, batch = 0, []
            for url in shards.shards:
                for s in iter_shard_samples(url):
                    batch.append(preprocess(decode_image(s["image"]), spec))
                    if len(batch) == args.batch_size:
                        enc.encode_tensor(np.stack(batch))
                        n, batch = n + len(batch), []
            if batch:
                enc.encode_tensor(np.stack(batch))
                n += len(batch)
            return n, time.perf_counter() - t0

        # The machine is shared: run the plain loop before and after the Ray stage and keep its best run.
        n_plain, plain_s = plain_loop()
        init_ray(cfg)
        report = embed_split(cfg, "train")
        ray_ips = report.images_per_s
        ray.shutdown()
        n_plain, plain_s = min((n_plain, plain_s), plain_loop(), key=lambda r: r[1])
        plain = n_plain / plain_s
        print(f"encoder {args.encoder} @ {args.image_size}px, batch {args.batch_size}, {n_plain} images, "
              f"torch threads {torch.get_num_threads()}, Ray num_cpus {args.num_cpus}")
        print(f"plain torch loop : {plain:7.1f} images/s ({plain_s:.1f} s)")
        print(f"Ray Data stage   : {ray_ips:7.1f} images/s ({report.seconds:.1f} s, actor start-up and "
              f"Parquet writes included)")
        print(f"Ray steady state : {report.steady_images_per_s:7.1f} images/s (after the first batch, "
              f"{report.warmup_seconds:.1f} s of actor start-up and model load excluded)")
        print(f"ratio Ray/plain  : {ray_ips / plain:.2f} end to end, {report.steady_images_per_s / plain:.2f} "
              f"steady state")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
