"""The `vmem` subcommands, one module per layer; importing this package registers them all."""
from pipeline.commands import data, embed, index, memory, serve, demo  # noqa: F401  (order = --help order)
