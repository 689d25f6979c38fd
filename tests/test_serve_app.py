"""The Serve application's shape for a config, built without starting Ray: which deployments, how many
replicas, autoscaling, and where the search runs."""
from __future__ import annotations

import pytest


@pytest.fixture
def memory_cfg(make_config):
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

    def make(*overrides):
        cfg = make_config(*overrides)
        build_synthetic_memory(cfg.memory_dir, make_clusters(100, dim=8), num_shards=3, index_key="IVF2,Flat")
        return cfg

    return make


def test_small_memory_is_searched_in_the_ingress(memory_cfg):
    from pipeline.serve import build_app

    ingress = build_app(memory_cfg("serve.ingress_replicas=3"))._bound_deployment
    assert ingress.name == "ingress" and ingress._deployment_config.num_replicas == 3
    assert ingress.init_args[1] is None  # no shard deployments: no hop


def test_large_memory_fans_out_to_one_deployment_per_shard_with_autoscaling(memory_cfg):
    from pipeline.serve import build_app

    cfg = memory_cfg("serve.local_search_max_items=50", "serve.autoscaling=true", "serve.ingress_replicas=2",
                     "serve.max_replicas=5")
    ingress = build_app(cfg)._bound_deployment
    auto = ingress._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.initial_replicas, auto.max_replicas) == (1, 2, 5)
    shards = [a._bound_deployment for a in ingress.init_args[1]]
    assert [s.name for s in shards] == ["shard-000", "shard-001", "shard-002"]
    assert all(s._deployment_config.autoscaling_config.max_replicas == 5 for s in shards)
    assert not ingress._deployment_config.logging_config["enable_access_log"]


def test_direct_ingress_gives_each_server_its_own_haproxy_files_and_ports(make_config):
    from pipeline.serve.server import haproxy_env

    a, b = haproxy_env(make_config()), haproxy_env(make_config())
    assert a["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # two `vmem serve` on one machine must not share HAProxy's config, admin socket or listeners
    for name in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                 "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"):
        assert a[name] != b[name], name
    assert haproxy_env(make_config("serve.direct_ingress=false")) == {}


def test_a_port_in_use_is_refused_with_a_message_before_ray_starts():
    import socket

    from pipeline.errors import UserError
    from pipeline.serve.server import check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}.*serve.port"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again once its listener closed
