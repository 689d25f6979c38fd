"""The `vmem` subcommands, one module per layer; importing this package registers them all in `COMMANDS`.

Command modules import `pipeline.commands.registry` (never `pipeline.cli`): the CLI sits on top of them."""
from pipeline.commands.registry import COMMANDS, Command
from pipeline.commands import data, embed, index, memory, serve, demo  # noqa: F401,E402  (order = --help order)

__all__ = ["COMMANDS", "Command"]
