"""`vmem` subcommands of the serve layer."""
from __future__ import annotations

import argparse

from pipeline.cli import command  # noqa: F401
from pipeline.config import Config
