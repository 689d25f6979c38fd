"""Start the Serve application on `cfg.serve.host:port` (what `vmem serve` runs), and stop it cleanly.

Stopping: SIGINT (Ctrl-C) and SIGTERM both end `vmem serve` within seconds. The handlers are installed after
Ray starts, replacing the native handler that Ray's core worker installs (which prints a stack dump on
SIGTERM); the app is given `SHUTDOWN_GRACE_S` to finish in-flight requests, then the local Ray instance that
this process started (raylet, GCS, agents, workers) is shut down with it. A joined cluster keeps running;
only this app is deleted from it.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from pipeline.config import Config, env_token

log = logging.getLogger("vmem.serve")
APP_NAME = "vmem"
SHUTDOWN_GRACE_S = 5.0
# Serve's own throughput mode (user code on the replica's main loop, gRPC between proxy and replicas,
# buffered request logs) minus direct ingress, which would move HTTP off serve.port, and minus running
# handles' routers on the caller's loop: the ingress calls shard handles from worker threads.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                  "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}


def start(cfg: Config, blocking: bool = False):
    """Deploy `build_app(cfg)` behind Serve's HTTP proxy on cfg.serve.host:port; returns the ingress handle.

    With `blocking` it serves until SIGINT or SIGTERM, then stops (see module docstring).
    """
    from ray import serve

    from pipeline.runtime import init_ray, phase
    from pipeline.serve.deployments import build_app

    if cfg.serve.throughput_optimized and cfg.ray.address == "local":
        for name, value in THROUGHPUT_ENV.items():  # read by Serve's processes when Ray starts them
            os.environ.setdefault(name, value)
    init_ray(cfg)
    stop_requested = threading.Event()
    if blocking:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop_requested.set())
    if not env_token(cfg):
        log.warning("no API token configured: the memory is read-only over HTTP (set VMEM_TOKEN to allow edits)")
    with phase(f"deploying {cfg.memory_dir} on http://{cfg.serve.host}:{cfg.serve.port}"):
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        handle = serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    log.info("explorer at http://%s:%d/  API docs at http://%s:%d/docs", cfg.serve.host, cfg.serve.port,
             cfg.serve.host, cfg.serve.port)
    if blocking:
        while not stop_requested.wait(0.5):
            pass
        log.info("stopping: signal received")
        shutdown(cfg)
    return handle


def shutdown(cfg: Config, grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Delete the app (waiting at most `grace_s`), then stop the local Ray instance if this process started it."""
    import ray
    from ray import serve

    def stop_serve():  # drains the app's replicas; Serve's controller and proxy go down with Ray below
        try:
            serve.delete(APP_NAME)
        except Exception as e:  # already gone, or Ray is stopping under us: nothing left to stop here
            log.debug("serve delete: %s", e)

    t = threading.Thread(target=stop_serve, daemon=True)
    t.start()
    t.join(grace_s)
    if t.is_alive():
        log.warning("Serve did not stop within %.0f s: stopping Ray with it", grace_s)
    ray.shutdown()


def stop() -> None:
    from ray import serve

    serve.delete(APP_NAME)
