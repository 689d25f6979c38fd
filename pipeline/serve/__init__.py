"""Serve layer: Ray Serve deployments (one per shard + router + FastAPI ingress), the HTTP API and the web
explorer. `build_app(cfg)` gives the Serve application; `server.start(cfg)` runs it on cfg.serve.host:port."""


def build_app(cfg):
    from pipeline.serve.deployments import build_app as _build

    return _build(cfg)
