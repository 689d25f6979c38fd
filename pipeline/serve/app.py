"""The Serve application entry points.

- `build_app(cfg)`: the application (FastAPI ingress replicas, plus one deployment per shard for large memories)
  for a loaded Config.
- `app_builder(args)`: the typed builder that `serve run` and a KubeRay RayService import
  (`import_path: pipeline.serve.app:app_builder`, `args: {config: configs/x.yaml, overrides: [k=v, ...]}`).
"""
from __future__ import annotations

from typing import Any, Dict


def build_app(cfg):
    from pipeline.serve.deployments import build_app as _build

    return _build(cfg)


def app_builder(args: Dict[str, Any]):
    """Load the config named by `args["config"]` (+ `args["overrides"]`) and build the application from it."""
    from pipeline.config import load_config
    from pipeline.runtime import init_ray

    cfg = load_config(args.get("config"), list(args.get("overrides", [])))
    init_ray(cfg)  # exports storage settings (S3 endpoint) to the replicas
    return build_app(cfg)
