"""The Serve application entry points.

- `build_app(cfg)`: the application (FastAPI ingress replicas, plus one deployment per shard for large memories)
  for a loaded Config.
- `app_builder(args: AppArgs)`: the typed builder that `serve run` and a KubeRay RayService import
  (`import_path: pipeline.serve.app:app_builder`, `args: {config: configs/x.yaml, overrides: [k=v, ...]}`);
  Serve validates `args` into `AppArgs` (an unknown key is an error, like in the config files).
"""
# No `from __future__ import annotations` here: Serve validates `args` into `AppArgs` only when the
# parameter's annotation is the class itself, not its name as a string.
from typing import List, Optional

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import Config, load_config
from pipeline.runtime import init_ray


class AppArgs(BaseModel):
    """What the Serve application is built from: a config file and `key=value` overrides."""
    model_config = ConfigDict(extra="forbid")
    config: Optional[str] = Field(None, description="YAML config (default: the embedded configs/demo.yaml)")
    overrides: List[str] = Field(default_factory=list, description="key=value overrides, e.g. serve.port=8000")


def build_app(cfg: Config):
    """The `ray.serve.Application` for a loaded config (see `pipeline.serve.deployments.build_app`)."""
    from pipeline.serve.deployments import build_app as _build  # lazy: imports Ray Serve (seconds)

    return _build(cfg)


def app_builder(args: AppArgs):
    """Load the config `args` names and build the application from it (a plain dict is validated too)."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    cfg = load_config(args.config, args.overrides)
    init_ray(cfg)  # exports storage settings (S3 endpoint) to the replicas
    return build_app(cfg)
