"""`vmem` subcommands of the serve layer."""
from __future__ import annotations

import argparse

from pipeline.commands.registry import command
from pipeline.config import Config


@command("serve", help="serve the memory over HTTP (Ray Serve: ingress replicas, shard deployments for large "
                       "memories, JSON API, web explorer at /, OpenAPI at /docs); mutations need VMEM_TOKEN; "
                       "stops on Ctrl-C or SIGTERM",
         example="VMEM_TOKEN=change-me vmem serve --config configs/demo.yaml serve.port=8000")
def serve_cmd(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline.serve.server import start

    start(cfg, blocking=True)
    return 0
