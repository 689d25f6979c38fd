"""`vmem shards`: WebDataset shards from IDX files or image folders."""
from __future__ import annotations

import argparse

from pipeline.commands.registry import command
from pipeline.config import Config


def _shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", action="append", help="only these splits (default: all in data.splits)")


@command("shards", "write WebDataset tar shards from Fashion-MNIST IDX files or an image-folder tree",
         "vmem shards --config configs/demo.yaml data.splits.train=1000 data.splits.test=200", _shards_args)
def cmd_shards(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline.data.shards import write_shards

    for split in args.split or list(cfg.data.splits):
        report = write_shards(cfg, split)
        print(report.summary())
    return 0
