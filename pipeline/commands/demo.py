"""`vmem demo`: the whole pipeline on the embedded default config."""
from __future__ import annotations

import argparse

from pipeline.commands.registry import command
from pipeline.config import Config


@command("demo", "the whole pipeline on the embedded default: shards -> embed -> memory -> classify",
         "vmem demo data.splits.train=5000 data.splits.test=500")
def cmd_demo(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    run_demo(cfg)
    return 0
