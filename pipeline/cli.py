"""`vmem`: the command line. Each subcommand maps to one public function of one layer.

Every command takes `--config FILE` (default: the embedded `configs/demo.yaml`) and any number of
`key=value` overrides, e.g. `vmem embed --config configs/demo.yaml embed.batch_size=8`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from pipeline.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from pipeline.errors import UserError


@dataclass
class Command:
    name: str
    help: str
    example: str
    run: Callable[[Config, argparse.Namespace], int]
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    needs_config: bool = True


COMMANDS: Dict[str, Command] = {}


def command(name: str, help: str, example: str, add_args=None, needs_config: bool = True):
    """Register a `vmem NAME` subcommand; `example` is shown in its --help and must run as written."""

    def wrap(fn):
        COMMANDS[name] = Command(name, help, example, fn, add_args, needs_config)
        return fn

    return wrap


# --------------------------------------------------------------------------------------------- data / embed
def _shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", action="append", help="only these splits (default: all in data.splits)")


@command("shards", "write WebDataset tar shards from Fashion-MNIST IDX files or an image-folder tree",
         "vmem shards --config configs/demo.yaml data.splits.train=1000 data.splits.test=200", _shards_args)
def cmd_shards(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline.data.shards import write_shards

    splits = args.split or list(cfg.data.splits)
    for split in splits:
        report = write_shards(cfg, split)
        print(report.summary())
    return 0


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


# --------------------------------------------------------------------------------------------------- demo
@command("demo", "the whole pipeline on the embedded default: shards -> embed -> memory -> classify",
         "vmem demo data.splits.train=5000 data.splits.test=500")
def cmd_demo(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmem",
        description="visual-memory: classify images by similarity + search over an editable kNN memory.",
        epilog="Every command takes --config FILE (default configs/demo.yaml) and key=value overrides. "
               "Run `vmem COMMAND --help` for an example of each.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, epilog=f"example:\n  {cmd.example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. memory.k=20")
        if cmd.add_args:
            cmd.add_args(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from pipeline.runtime import setup_logging

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # Overrides may come after options (argparse leaves them in `extra`); anything else is an error.
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    setup_logging(args.log_level)
    cmd = COMMANDS[args.command]
    try:
        cfg = load_config(args.config, list(args.overrides) + extra)
    except ConfigError as e:
        print(f"vmem {cmd.name}: config error: {e}", file=sys.stderr)
        return 2
    try:
        return int(cmd.run(cfg, args) or 0)
    except (UserError, FileNotFoundError) as e:
        # Expected failures (bad input, missing files) print one clear line, not a traceback.
        print(f"vmem {cmd.name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
