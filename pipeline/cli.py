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
    # Run through the imported module so that commands register on the same COMMANDS as `vmem`.
    from pipeline.cli import main as _main

    sys.exit(_main())
