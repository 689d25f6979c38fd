"""Process-level plumbing shared by every stage: logging, Ray start-up, phase timing."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

log = logging.getLogger("vmem")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@contextlib.contextmanager
def phase(name: str) -> Iterator[dict]:
    """Log the start and duration of a phase; yields a dict that receives `seconds` at the end."""
    info: dict = {}
    log.info("%s ...", name)
    t0 = time.perf_counter()
    try:
        yield info
    finally:
        info["seconds"] = time.perf_counter() - t0
        log.info("%s finished in %.1f s", name, info["seconds"])


def init_ray(cfg) -> None:
    """Start or join Ray as the config says (idempotent). Storage settings reach the workers via env vars."""
    import ray

    from pipeline import storage

    storage.configure(cfg.storage)
    if ray.is_initialized():
        return
    env_vars = storage.worker_env()
    runtime_env = {"env_vars": env_vars} if env_vars else None
    kwargs = dict(include_dashboard=cfg.ray.include_dashboard, log_to_driver=True,
                  ignore_reinit_error=True, runtime_env=runtime_env)
    if cfg.ray.address == "local":
        ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)
    else:
        ray.init(address=cfg.ray.address, **kwargs)
    try:  # Ray Data's own progress bars are the ones users of Ray expect; keep them, quiet the rest.
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = True
    except Exception:  # pragma: no cover - older Ray
        pass

