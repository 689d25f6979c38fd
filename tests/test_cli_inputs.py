"""Bad input through `vmem` as users run it (a subprocess on a small real memory): each is refused with ONE
line on stderr that names the input and what is expected, no traceback, the documented exit code (2: command
line or config, 1: an input file or value the command checked), and the memory left exactly as it was.
An edit whose auto-compaction fails afterwards is still reported as committed (exit 0, its ids printed), with
one warning line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 8


def vmem(*args: str, work: Path) -> subprocess.CompletedProcess:
    """`vmem ARGS workdir=WORK` in a fresh process (the console script's `main`)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, f"workdir={work}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def fingerprint(work: Path) -> dict:
    """Every file under the memory with its size: any commit (item table, forget list, history, manifest,
    overlay) writes a new file, so equal fingerprints mean nothing was changed."""
    root = work / "memory"
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    """(workdir, data dir): a 2-shard memory of 200 synthetic 8-d items, and the input files of the cases."""
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

    work = tmp_path_factory.mktemp("cli_inputs") / "work"
    data = make_clusters(200, dim=DIM, num_classes=4, seed=3)
    build_synthetic_memory(str(work / "memory"), data, num_shards=2, index_key="IVF4,Flat", nprobe=4)
    files = work.parent / "inputs"
    files.mkdir()
    x = data.xb[:2].copy()
    np.save(files / "ok.npy", x)
    np.save(files / "int64.npy", np.rint(x * 100).astype(np.int64))
    np.save(files / "object.npy", np.array([{"not": "vectors"}, None], dtype=object), allow_pickle=True)
    (files / "text.npy").write_text("0.1 0.2 0.3\n")
    np.save(files / "one_d.npy", data.xb[0])  # (8,): one vector without its row axis
    np.save(files / "empty.npy", np.zeros((0, DIM), np.float32))
    np.save(files / "wrong_dim.npy", np.ones((2, DIM - 1), np.float32))
    np.save(files / "three_d.npy", np.ones((1, 2, DIM), np.float32))
    np.save(files / "bool.npy", np.ones((2, DIM), bool))
    np.savez(files / "archive.npz", x=x)
    nan = x.copy()
    nan[1, 3] = np.nan
    np.save(files / "nan.npy", nan)
    inf = x.copy()
    inf[0, 0] = np.inf
    np.save(files / "inf.npy", inf)
    (files / "truncated.npy").write_bytes((files / "ok.npy").read_bytes()[:100])
    (files / "bad.yaml").write_text("memory:\n  k: [1,\n")  # a YAML syntax error spans several lines
    return work, files


def assert_refused(r: subprocess.CompletedProcess, code: int, words, before: dict, work: Path) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "error" in lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert r.stdout == "", r.stdout
    assert fingerprint(work) == before, "a refused command changed the memory"


BAD_FILES = [  # file, words its error line must contain
    ("object.npy", ["object.npy", "Python objects", "(n, dim)"]),
    ("text.npy", ["text.npy", "not a .npy file"]),
    ("truncated.npy", ["truncated.npy", ".npy"]),
    ("archive.npz", ["archive.npz", ".npz"]),
    ("missing.npy", ["missing.npy", "no such file"]),
    ("one_d.npy", ["one_d.npy", "shape (8,)", "2-d array (n, dim)"]),
    ("three_d.npy", ["three_d.npy", "shape (1, 2, 8)", "2-d array (n, dim)"]),
    ("empty.npy", ["empty.npy", "no vectors", "(0, 8)"]),
    ("wrong_dim.npy", ["wrong_dim.npy", "7-d", "8-d"]),
    ("bool.npy", ["bool.npy", "dtype bool"]),
    ("nan.npy", ["nan.npy", "NaN or infinite", "row 1"]),
    ("inf.npy", ["inf.npy", "NaN or infinite", "row 0"]),
]


# Every file through `add`; a few through `query` and `classify`, which read --vectors the same way.
FILE_CASES = [("add", f, w) for f, w in BAD_FILES] + [
    (c, f, w) for c in ("query", "classify") for f, w in BAD_FILES if f in ("object.npy", "one_d.npy", "empty.npy",
                                                                             "nan.npy", "text.npy")]


@pytest.mark.parametrize("command, name, words", FILE_CASES, ids=[f"{c}-{f}" for c, f, _ in FILE_CASES])
def test_bad_vector_files_are_one_line_and_change_nothing(memory, command, name, words):
    work, files = memory
    before = fingerprint(work)
    extra = ["--label", "1", "--key", "a", "--key", "b"] if command == "add" else []
    r = vmem(command, "--vectors", str(files / name), *extra, work=work)
    assert_refused(r, 1, words, before, work)


BAD_ARGS = [  # arguments, exit code, words of the error line
    (["query", "--vectors", "{ok}", "-k", "0"], 2, ["-k", "> 0", "got 0"]),
    (["classify", "--vectors", "{ok}", "-k", "-3"], 2, ["-k", "> 0"]),
    (["query", "--vectors", "{ok}", "--nprobe", "0"], 2, ["--nprobe", "> 0"]),
    (["add", "--vectors", "{ok}", "--label", "-1", "--key", "a", "--key", "b"], 2, ["--label", ">= 0"]),
    (["add", "--vectors", "{ok}", "--label", "-7", "--key", "a", "--key", "b"], 2, ["--label", ">= 0"]),
    (["add", "--vectors", "{ok}", "--label", "x", "--key", "a", "--key", "b"], 2, ["--label", "integer"]),
    (["add", "--vectors", "{ok}", "--label", "1", "--label", "2", "--label", "3", "--key", "a", "--key", "b"], 1,
     ["--label given 3 times", "2 vector(s)"]),
    (["add", "--vectors", "{ok}", "--label", "1", "--key", "a"], 1, ["--key given 1 times", "2 vector(s)"]),
    (["add", "--vectors", "{ok}", "--label", "1"], 1, ["--key is required"]),
    (["add", "--label", "1"], 1, ["give image files or --vectors"]),
    (["relabel", "--id", "5", "--label", "-2"], 2, ["--label", ">= 0"]),
    (["delete", "--id", "0"], 2, ["--id", "1..2**63-1"]),
    (["delete", "--id", "abc"], 2, ["--id", "integer"]),
    (["delete", "--label", "-1"], 2, ["--label", ">= 0"]),
    (["delete", "--id", "5"], 1, ["not in the memory"]),
    (["intervene", "--item", "abc:1"], 1, ["--item", "abc:1"]),
    (["intervene", "--label-weight", "1:-2"], 1, ["--label-weight", ">= 0"]),
    (["intervene", "--relabel", "5:-1"], 1, ["--relabel", ">= 0"]),
    (["rollback", "0"], 2, ["version", "> 0"]),
    (["compact", "memory.grace_period_s=-5"], 2, ["memory.grace_period_s", ">= 0", "-5"]),
    (["classify", "--vectors", "{ok}", "memory.k=0"], 2, ["memory.k", "> 0"]),
    (["compact", "memory.compact_threshold=1.5"], 2, ["memory.compact_threshold", "(0, 1]"]),
    (["classify", "--vectors", "{ok}", "memory.abstain.min_confidence=2"], 2, ["min_confidence", "[0, 1]"]),
    (["stats", "--config", "{dir}/bad.yaml"], 2, ["bad.yaml", "line 3"]),
    (["stats", "--config", "{dir}/missing.yaml"], 2, ["missing.yaml", "not found"]),
]


@pytest.mark.parametrize("args, code, words", BAD_ARGS, ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in BAD_ARGS])
def test_bad_arguments_and_config_values_are_one_line_and_change_nothing(memory, args, code, words):
    work, files = memory
    before = fingerprint(work)
    r = vmem(*[a.format(ok=files / "ok.npy", dir=files) for a in args], work=work)
    assert_refused(r, code, words, before, work)


def test_reads_leave_the_fingerprint_alone_and_edits_change_it(memory):
    """The refusal tests' "nothing changed" is only as good as the fingerprint: a read keeps it, an edit moves
    it. Integer vectors are converted (one note line on stderr), not refused."""
    work, files = memory
    before = fingerprint(work)
    r = vmem("query", "--vectors", str(files / "ok.npy"), "-k", "3", work=work)
    assert r.returncode == 0 and r.stdout.count("id=") == 6, r.stderr[-2000:]
    assert fingerprint(work) == before
    r = vmem("add", "--vectors", str(files / "int64.npy"), "--label", "2", "--key", "int-a", "--key", "int-b",
             work=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [line.split("\t")[1] for line in r.stdout.splitlines()] == ["int-a", "int-b"]
    note = r.stderr.strip().splitlines()
    assert len(note) == 1 and "int64" in note[0] and "float32" in note[0], r.stderr
    assert fingerprint(work) != before
    r = vmem("query", "--vectors", str(files / "int64.npy"), "-k", "1", work=work)
    assert r.returncode == 0 and "key=int-a" in r.stdout and "key=int-b" in r.stdout, r.stdout + r.stderr[-2000:]


def test_an_edit_whose_auto_compaction_fails_exits_0_with_one_warning(tmp_path):
    """A corrupt shard file makes compaction fail (checksum mismatch). A delete that crosses the compaction
    threshold is still committed: exit 0, its count printed, one warning line naming `vmem compact`; the edit
    history shows it; and `vmem compact` itself does fail, saying why in one line."""
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

    work = tmp_path / "work"
    data = make_clusters(100, dim=DIM, num_classes=4, seed=4)
    build_synthetic_memory(str(work / "memory"), data, num_shards=2, index_key="IVF4,Flat", nprobe=4)
    metas = sorted((work / "memory").rglob("*meta*.parquet"))
    assert metas, sorted(str(p) for p in (work / "memory").rglob("*"))
    for p in metas:  # every shard: whichever the deletion lands in, its rewrite must read a corrupt file
        p.write_bytes(p.read_bytes() + b"corrupt")
    ids = [str(i) for i in data.ids[:3]]
    r = vmem("delete", *sum([["--id", i] for i in ids], []), "memory.compact_threshold=0.01",
             "memory.grace_period_s=0", work=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("deleted 3 item(s)"), r.stdout
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "edit committed" in warnings[0] and "vmem compact" in warnings[0], warnings
    r = vmem("versions", work=work)
    assert r.returncode == 0 and "delete" in r.stdout.splitlines()[-1] and "3 item(s)" in r.stdout, r.stdout
    r = vmem("compact", "memory.grace_period_s=0", work=work)
    assert r.returncode != 0 and "corrupt" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
