import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config


def test_demo_config_loads_with_typed_values():
    cfg = load_config()
    assert cfg.embed.encoder == "efficientnet_lite0"
    assert isinstance(cfg.data.samples_per_shard, int)
    assert cfg.shards_dir("train").endswith("shards/train")


def test_override_changes_value_and_type():
    cfg = load_config(None, ["embed.batch_size=7", "workdir=s3://bucket/x"])
    assert cfg.embed.batch_size == 7
    assert cfg.memory_dir == "s3://bucket/x/memory"


@pytest.mark.parametrize("override, words", [
    ("embed.foo=1", ["unknown config key 'embed.foo'", "batch_size", "encoder"]),
    ("nothing=1", ["unknown config key 'nothing'", "workdir"]),
    ("data.source=webcam", ["data.source", "fashion_mnist", "image_folder"]),
    ("embed.batch_size=abc", ["embed.batch_size"]),
    ("index.num_shards=0", ["index.num_shards", "> 0"]),
    ("serve.ingress_replicas=0", ["serve.ingress_replicas", "> 0"]),
    ("index.target_recall=1.5", ["index.target_recall"]),
    ("novalue", ["key=value"]),
])
def test_bad_keys_and_values_are_errors_naming_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_yaml_file_is_an_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("workdir: /tmp/x\nembed:\n  encodr: efficientnet_lite0\n")
    with pytest.raises(ConfigError, match="unknown config key 'embed.encodr'.*valid keys in embed"):
        load_config(str(p))


def test_missing_config_file_is_an_error():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/does-not-exist.yaml")


def test_cli_reports_config_errors_without_traceback(capsys):
    rc = main(["shards", "embed.nope=3"])
    assert rc == 2
    assert "unknown config key 'embed.nope'" in capsys.readouterr().err


def test_cli_help_lists_every_command(capsys):
    from pipeline.cli import COMMANDS, build_parser

    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text
