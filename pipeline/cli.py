"""`vmem`: the command line. Each subcommand maps to one public function of one layer.

Every command takes `--config FILE` (default: the embedded `configs/demo.yaml`) and any number of
`key=value` overrides, e.g. `vmem embed --config configs/demo.yaml embed.batch_size=8`.

Exit codes: 0 done (an edit that was committed exits 0 even when the maintenance after it fails: that is a
warning line on stderr); 1 the command was refused or failed for a reason the user can fix (bad input,
missing file or item: one line on stderr, nothing changed); 2 bad command line or config (one line).
The subcommands live in pipeline/commands/ and register in pipeline.commands.registry; this module imports
them, never the other way round.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import List, NoReturn, Optional

from pipeline.commands import COMMANDS, Command  # importing the package registers every subcommand
from pipeline.config import DEFAULT_CONFIG, ConfigError, load_config
from pipeline.errors import UserError
from pipeline.runtime import setup_logging

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")  # a config key (dotted) followed by '='
# Libraries that log routine start-up facts at INFO (faiss names the SIMD build it loaded): at the default
# level they would crowd out the one line an error or a warning prints on stderr.
QUIET_LOGGERS = ("faiss.loader",)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where the help is), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    cmd = COMMANDS[args.command]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"vmem {cmd.name}: config error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        return int(cmd.run(cfg, args) or 0)
    except (UserError, FileNotFoundError) as e:
        # Expected failures (bad input, missing files) print one clear line, not a traceback.
        print(f"vmem {cmd.name}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
