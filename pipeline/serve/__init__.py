"""Serve layer: Ray Serve deployments (one per shard + router + FastAPI ingress), the HTTP API and the web
explorer. `build_app(cfg)` gives the Serve application; `server.start(cfg)` runs it on cfg.serve.host:port."""
from pipeline.serve.app import app_builder, build_app  # noqa: F401
