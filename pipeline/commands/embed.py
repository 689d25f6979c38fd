"""`vmem embed`: the Ray Data embedding stage."""
from __future__ import annotations

import argparse

from pipeline.commands.registry import command
from pipeline.config import Config


def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", action="append", help="only these splits (default: all in data.splits)")


@command("embed", "embed WebDataset shards with a frozen encoder on Ray into Parquet parts (resumable)",
         "vmem embed --config configs/demo.yaml embed.batch_size=16", _embed_args)
def cmd_embed(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline.embed.stage import embed_split
    from pipeline.runtime import init_ray

    init_ray(cfg)
    for split in args.split or list(cfg.data.splits):
        report = embed_split(cfg, split)
        print(report.summary())
    return 0
