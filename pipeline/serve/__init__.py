"""Serve layer: Ray Serve deployments (FastAPI ingress replicas, one deployment per shard for large memories),
the HTTP API (`api.py`, `routes/`, `models.py`) and the web explorer. `build_app(cfg)` gives the Serve application; `server.start(cfg)` runs it on cfg.serve.host:port."""
from pipeline.serve.app import app_builder, build_app  # noqa: F401
