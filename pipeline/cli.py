"""`vmem`: the command line. Each subcommand maps to one public function of one layer.

Every command takes `--config FILE` (default: the embedded `configs/demo.yaml`) and any number of
`key=value` overrides, e.g. `vmem embed --config configs/demo.yaml embed.batch_size=8`.
"""
from __future__ import annotations

import argparse
import re
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


COMMANDS: Dict[str, Command] = {}
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")  # a config key (dotted) followed by '='



def command(name: str, help: str, example: str, add_args=None):
    """Register a `vmem NAME` subcommand; `example` is shown in its --help and must run as written."""

    def wrap(fn):
        COMMANDS[name] = Command(name, help, example, fn, add_args)
        return fn

    return wrap


def _load_commands() -> None:
    # Each layer's subcommands live in pipeline/commands/<layer>.py and register themselves on import.
    import pipeline.commands  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
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
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help,
                           usage=f"vmem {cmd.name} [options] [key=value ...]",
                           epilog="key=value arguments override the config, e.g. memory.k=20 "
                                  f"workdir=s3://bucket/prefix\n\nexample:\n  {cmd.example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
        if cmd.add_args:
            cmd.add_args(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from pipeline.runtime import setup_logging

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `key=value` config overrides are taken out first, so that commands can have positional arguments
    # (image paths) and overrides may stand anywhere on the line.
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args = parser.parse_args([a for a in argv if not OVERRIDE.match(a)])
    if args.command is None:
        parser.print_help()
        return 0
    setup_logging(args.log_level)
    cmd = COMMANDS[args.command]
    try:
        cfg = load_config(args.config, overrides)
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
    # Run through the imported module so that commands register on the same COMMANDS as `vmem`.
    from pipeline.cli import main as _main

    sys.exit(_main())
