"""The memory subcommands through `vmem` itself, on a synthetic memory with real embedding parts."""
import numpy as np

from pipeline.cli import main
from pipeline.embed.parts import to_table, write_part
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters


def test_cli_classify_add_delete_compact_eval(tmp_path, capsys):
    work = tmp_path / "work"
    data = make_clusters(800, 32, 4, seed=5)
    build_synthetic_memory(str(work / "memory"), data, index_key="IVF4,Flat", nprobe=4)
    q = make_clusters(60, 32, centres=data.centres, seed=6, prefix="q")
    meta = {"id": q.ids.tolist(), "key": q.keys, "label": q.labels.tolist(), "label_name": [""] * 60,
            "source": ["q"] * 60, "shard": [""] * 60}
    write_part(to_table(meta, q.xb), str(work / "embeddings/test/part-00000.parquet"))
    np.save(tmp_path / "q.npy", q.xb[:2])
    ov = [f"workdir={work}", "eval.ks=[1,10]", "memory.grace_period_s=0"]
    assert main(["classify", "--vectors", str(tmp_path / "q.npy"), "--method", "rank", *ov]) == 0
    assert "class_" in capsys.readouterr().out
    assert main(["add", "--vectors", str(tmp_path / "q.npy"), "--label", "9", "--label-name", "novel",
                 "--key", "a", "--key", "b", *ov]) == 0
    added = [int(line.split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert main(["classify", "--vectors", str(tmp_path / "q.npy"), "--k", "1", *ov]) == 0
    assert capsys.readouterr().out.count("\tnovel\t") == 2
    assert main(["delete", "--id", str(added[0]), *ov]) == 0
    assert main(["delete", "--id", "5", *ov]) == 1
    assert "not in the memory" in capsys.readouterr().err
    assert main(["compact", *ov]) == 0
    assert '"verified": true' in capsys.readouterr().out
    assert main(["eval", *ov]) == 0
    out = capsys.readouterr().out
    assert "exact" in out and "plurality" in out and (work / "eval/accuracy.png").exists()
    assert main(["explain", "--vectors", str(tmp_path / "q.npy"), "-o", str(tmp_path / "s.png"), *ov]) == 0
    assert (tmp_path / "s.png").exists()
