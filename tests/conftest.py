"""Shared fixtures: a real Ray instance, a real S3-API server on loopback (moto), small real datasets."""
from __future__ import annotations

import os
import socket

import pytest

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting Ray costs ~6 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    # Left running on purpose: other session-scoped users may still hold actors; pytest exit tears it down.


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-API server (moto in server mode) on 127.0.0.1 with bucket `vmem-test`.

    Sets the VMEM_S3_* and AWS_* variables so `pipeline.storage` (and Ray workers started afterwards) use it.
    Yields the endpoint URL.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "VMEM_S3_ENDPOINT_URL": endpoint, "VMEM_S3_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="vmem-test")
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def fmnist_dir():
    if not os.path.exists(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail("Fashion-MNIST is missing: run `make data` (installs Debian's dataset-fashion-mnist)")
    return FMNIST_DIR


@pytest.fixture
def make_config(tmp_path):
    """Build a validated Config rooted in tmp_path from override strings: make_config('data.splits.train=100')."""
    from pipeline.config import load_config

    def make(*overrides: str, workdir: str | None = None):
        return load_config(None, [f"workdir={workdir or tmp_path / 'work'}", *overrides])

    return make
