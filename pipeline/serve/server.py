"""Start the Serve application on `cfg.serve.host:port` (what `vmem serve` runs)."""
from __future__ import annotations

import logging

from pipeline.config import Config, env_token

log = logging.getLogger("vmem.serve")
APP_NAME = "vmem"


def start(cfg: Config, blocking: bool = False):
    """Deploy `build_app(cfg)` behind Serve's HTTP proxy on cfg.serve.host:port; returns the ingress handle.

    With `blocking` it serves until interrupted (Ctrl-C), then shuts Serve down.
    """
    from ray import serve

    from pipeline.runtime import init_ray, phase
    from pipeline.serve.deployments import build_app

    init_ray(cfg)
    if not env_token(cfg):
        log.warning("no API token configured: the memory is read-only over HTTP (set VMEM_TOKEN to allow edits)")
    with phase(f"deploying {cfg.memory_dir} on http://{cfg.serve.host}:{cfg.serve.port}"):
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        handle = serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    log.info("explorer at http://%s:%d/  API docs at http://%s:%d/docs", cfg.serve.host, cfg.serve.port,
             cfg.serve.host, cfg.serve.port)
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
    return handle


def stop() -> None:
    from ray import serve

    serve.delete(APP_NAME)
