"""The table of `vmem` subcommands. Command modules register into it; `pipeline.cli` reads it.

It lives below both (commands import this module, never `pipeline.cli`), so the dependency runs one way:
cli -> commands -> registry.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from pipeline.config import Config


@dataclass
class Command:
    name: str
    help: str
    example: str
    run: Callable[[Config, argparse.Namespace], int]
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None


COMMANDS: Dict[str, Command] = {}


def command(name: str, help: str, example: str, add_args=None):
    """Register a `vmem NAME` subcommand; `example` is shown in its --help and must run as written."""

    def wrap(fn):
        COMMANDS[name] = Command(name, help, example, fn, add_args)
        return fn

    return wrap
