"""Launch-at-scale files: cluster YAMLs, KubeRay manifests, paper and scale configs, the GPU check script.

Everything here is checked against the real thing it names: Ray's own cluster-config schema, the `vmem`
subcommand registry, the typed config schema, the encoder and vote-method registries, and `vmem plan`'s
arithmetic. The GPU check script is run on this CPU machine (GPU rows must be skipped, CPU rows measured).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import REPO_ROOT, load_config

CLUSTER = REPO_ROOT / "cluster"
LAUNCHER_YAMLS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY_YAMLS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
PAPER_CONFIGS = sorted((REPO_ROOT / "configs" / "paper").glob("*.yaml"))
SCALE_CONFIGS = sorted((REPO_ROOT / "configs" / "scale").glob("*.yaml"))
# Every file that names `vmem` commands or config paths a user will run.
LAUNCH_FILES = LAUNCHER_YAMLS + KUBERAY_YAMLS + PAPER_CONFIGS + SCALE_CONFIGS + [CLUSTER / "README.md",
                                                                                 CLUSTER / "Dockerfile"]

# The paper's Rank-voting max-over-k ImageNet top-1 per encoder (the headers must quote them).
PAPER_FIGURES = {"dinov2_vits14": "79.1", "dinov2_vitb14": "82.2", "dinov2_vitl14": "83.6",
                 "clip_vitb16": "73.8", "clip_vitl14": "79.9"}


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO_ROOT))


def test_the_files_exist():
    assert len(LAUNCHER_YAMLS) == 2 and all(p.exists() for p in LAUNCHER_YAMLS)
    names = {p.name for p in KUBERAY_YAMLS}
    assert {"rayjob-build.yaml", "rayservice.yaml", "serviceaccount.yaml"} <= names
    assert len(PAPER_CONFIGS) == 5 and SCALE_CONFIGS


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_rel)
def test_launcher_yaml_passes_rays_own_schema(path):
    """`ray up` fills provider defaults and validates against ray-schema.json; do the same offline."""
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    cfg = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["index_highmem"]["resources"].get("index_shard", 0) >= 1
    # Nodes install the project from the mounted repo, and the GPU type swaps faiss-cpu for faiss-gpu.
    assert cfg["file_mounts"] == {"~/visual-memory": "."}
    assert any("pip install" in c and "-e ~/visual-memory" in c for c in cfg["setup_commands"])
    gpu_cmds = types["gpu_embed"]["worker_setup_commands"]
    uninstall = [i for i, c in enumerate(gpu_cmds) if "uninstall -y faiss-cpu" in c]
    install_gpu = [i for i, c in enumerate(gpu_cmds) if "install" in c and "faiss-gpu-cu12==1.12.0" in c]
    assert uninstall and install_gpu and uninstall[0] < install_gpu[0], "faiss-cpu must go before faiss-gpu comes"
    every = cfg["setup_commands"] + sum((t.get("worker_setup_commands", []) for t in types.values()), [])
    assert not any(re.search(r"pip install[^|;&]*faiss-cpu", c) for c in every), "never install faiss-cpu by hand"
    for t in ("gpu_embed", "index_highmem"):
        assert 0 <= types[t]["min_workers"] <= types[t]["max_workers"]


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=_rel)
def test_kuberay_manifest(path):
    import ray

    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) and d.get("apiVersion") and d.get("kind") for d in docs)
    for doc in docs:
        spec = doc.get("spec", {})
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
        if doc["kind"] in ("RayJob", "RayService"):
            assert doc["apiVersion"] == "ray.io/v1"
            assert cluster["rayVersion"] == ray.__version__, "pods must run the Ray the project pins"
            groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
            res = groups["index-highmem"]["rayStartParams"]["resources"]
            assert json.loads(json.loads(res)) == {"index_shard": 4}  # KubeRay's quoted-JSON form
            for pod in [cluster["headGroupSpec"]] + list(groups.values()):
                assert pod["template"]["spec"]["serviceAccountName"] == "vmem"  # IRSA identity
        if doc["kind"] == "RayJob":
            assert "vmem build --config configs/scale/" in spec["entrypoint"]
            assert "VMEM_S3_REGION" in yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]


def _serve_apps():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    return yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]


def test_rayservice_config_and_import_path():
    apps = _serve_apps()
    assert len(apps) == 1
    app = apps[0]
    load_config(app["args"]["config"], app["args"]["overrides"])  # the config it serves loads
    module, _, attr = app["import_path"].partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        pytest.skip(f"{module} is not written yet: serveConfigV2 assumes {app['import_path']}(args)")
    assert callable(getattr(mod, attr)), f"{app['import_path']} must be a Serve application builder"


def _vmem_commands(text: str):
    return set(re.findall(r"\bvmem (?:\$c|([a-z][a-z_-]+))\b", text)) - {""}


def _config_paths(text: str):
    return set(re.findall(r"--config (configs/[\w/.-]+\.yaml)", text)) | set(
        re.findall(r"config: (configs/[\w/.-]+\.yaml)", text))


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=_rel)
def test_named_commands_and_configs_exist(path):
    """Every `vmem X` a launch file names is a registered subcommand; every config it names loads."""
    from pipeline.cli import COMMANDS, build_parser

    build_parser()
    text = path.read_text()
    if "for c in" in text:  # the big_vision-style "local variant" loop
        loop = re.search(r"for c in ([a-z ]+); do", text)
        assert loop, f"{path}: unreadable command loop"
        named = set(loop.group(1).split())
    else:
        named = set()
    named |= _vmem_commands(text)
    missing = sorted(c for c in named if c not in COMMANDS)
    assert not missing, f"{_rel(path)} names vmem subcommands that do not exist: {missing}"
    for cfg_path in _config_paths(text):
        assert (REPO_ROOT / cfg_path).exists(), f"{_rel(path)} names missing config {cfg_path}"
        load_config(str(REPO_ROOT / cfg_path))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=_rel)
def test_paper_config(path):
    from pipeline.embed.encoders import available_encoders
    from pipeline.memory.votes import available_methods

    cfg = load_config(str(path))
    text = path.read_text()
    assert cfg.embed.encoder in PAPER_FIGURES and cfg.embed.encoder in available_encoders()
    assert cfg.data.source == "image_folder" and cfg.data.input.startswith("s3://")
    assert cfg.workdir.startswith("s3://") and cfg.ray.address == "auto"
    assert set(cfg.data.splits) == {"train", "val"} and cfg.eval.split == "val"
    assert max(cfg.eval.ks) == 100 and 1 in cfg.eval.ks
    # Every vote method of the paper; `vmem eval` adds their soft_* variants once the memory is soft-pruned.
    assert set(cfg.eval.methods) == {"plurality", "distance", "softmax", "rank"}
    assert {f"soft_{m}" for m in cfg.eval.methods} <= set(available_methods())
    assert cfg.memory.hard_prune_threshold == 128 and cfg.memory.prune_k == 10
    header = text.split("\nname:")[0]
    for word in ("Command", "Hardware", "Expected run time", "Expected figures"):
        assert word in header, f"{path.name}: header lacks '{word}'"
    assert f"{PAPER_FIGURES[cfg.embed.encoder]}%" in header
    assert f"--config configs/paper/{path.name}" in header


def test_paper_configs_cover_the_five_models():
    encoders = sorted(load_config(str(p)).embed.encoder for p in PAPER_CONFIGS)
    assert encoders == sorted(PAPER_FIGURES)


@pytest.mark.parametrize("path", SCALE_CONFIGS, ids=_rel)
def test_scale_config_matches_vmem_plan(path):
    """The shard count, key and per-shard RAM in the config and its comment are what `vmem plan` computes."""
    from pipeline.index.plan import plan_memory
    from pipeline.index.units import format_bytes, parse_bytes

    cfg = load_config(str(path))
    text = path.read_text()
    m = re.search(r"vmem plan --config \S+ --items (\S+) --dim (\d+) --ram-per-node (\S+)\s*\\?\s*#?\s*"
                  r"--max-memory (\S+) --shards (\d+)", text)
    assert m, "the header must give the `vmem plan` command it was sized with"
    items, dim, ram, max_memory, shards = m.groups()
    assert max_memory == cfg.index.max_index_memory and int(shards) == cfg.index.num_shards
    plan = plan_memory(items, int(dim), ram, max_memory=max_memory, num_shards=int(shards), metric=cfg.index.metric)
    assert cfg.index.index_key == plan.index_key
    assert cfg.index.num_shards == plan.num_shards
    assert parse_bytes(cfg.index.memory_per_node) >= plan.bytes_per_shard
    # The arithmetic in the comment states plan's own figures.
    assert f"bytes_per_item = {plan.bytes_per_item - 8} " in text
    assert f"= {format_bytes(plan.bytes_per_shard).replace('.0 ', ' ')}" in text or \
        f"= {format_bytes(plan.bytes_per_shard)}" in text
    assert f"{format_bytes(plan.fixed_bytes)} per shard" in text
    assert f"nodes = ceil(" in text and f") = {plan.nodes}" in text
    # Each index node's custom resource holds its share of the shards in its RAM.
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    per_node = aws["available_node_types"]["index_highmem"]["resources"]["index_shard"]
    assert per_node * plan.bytes_per_shard <= parse_bytes(ram) * 0.75


def _run_gpu_check(*args: str, timeout: int):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMEM_")}
    env["VMEM_PYTHON"] = sys.executable  # this test's interpreter: no venv creation here
    return subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_check_on_cpu_skips_gpu_rows(tmp_path):
    """The faiss row of the GPU check on this CPU machine: a real CPU QPS, the GPU column skipped with a reason."""
    out = tmp_path / "check.json"
    proc = _run_gpu_check("--small", "--only", "faiss", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No CUDA device visible: GPU rows are skipped" in proc.stdout
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["gpu"] == "none"
    (faiss_row,) = report["rows"]
    assert faiss_row["unit"] == "QPS" and faiss_row["cpu"] > 0 and faiss_row["gpu"] is None
    assert "GPU skipped" in faiss_row["note"]
    assert "faiss IVF64,PQ16x4" in proc.stdout  # the table was printed


@pytest.mark.slow  # ~50 s on 2 cores (Ray stage + ViT-L/14 init)
def test_gpu_check_full_small_run(tmp_path):
    out = tmp_path / "check.json"
    proc = _run_gpu_check("--small", "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["check"].split(" (")[0]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["encoder efficientnet_lite0"]["cpu"] > 0 and rows["encoder dinov2_vitl14"]["cpu"] > 0
    assert rows["Ray embedding stage"]["cpu"] > 0
