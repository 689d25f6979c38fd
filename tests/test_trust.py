"""Trust signals on real embeddings: a small Fashion-MNIST memory (500 train images, efficientnet_lite0 at
32 px, 2 IVF shards, the tars kept so `get_image` works) queried with 400 real test images.

Calibration lowers ECE on held-out queries; the abstain policy answers "unknown" with the reason; rerankers
from the registry reorder the neighbours and the vote follows the new order; the paper study runs and
prints verdicts computed from its numbers."""
from __future__ import annotations

import numpy as np
import pytest

N_TRAIN, N_TEST, SIZE = 500, 400, 32


def _embed_split(cfg, split: str, enc):
    from pipeline.data.shards import iter_split_samples, write_shards
    from pipeline.embed.parts import to_table, write_part
    from pipeline.embed.preprocess import decode_image
    from pipeline import storage

    write_shards(cfg, split)
    samples = list(iter_split_samples(cfg.shards_dir(split)))
    x = enc.encode([decode_image(s["image"]) for s in samples])
    meta = {c: [s[c] for s in samples] for c in ("id", "key", "label", "label_name", "source", "shard")}
    write_part(to_table(meta, x), storage.join(cfg.embeddings_dir(split), "part-00000.parquet"))
    return samples, x


@pytest.fixture(scope="module")
def real(tmp_path_factory, fmnist_dir):
    """(cfg, train samples, xb, test labels, xq): the memory lives at cfg.memory_dir."""
    from pipeline.config import load_config
    from pipeline.embed.encoders import create_encoder
    from pipeline.memory.synthetic import Synthetic, build_synthetic_memory

    work = tmp_path_factory.mktemp("trust") / "work"
    cfg = load_config(None, [f"workdir={work}", f"data.input={fmnist_dir}", f"data.splits.train={N_TRAIN}",
                             f"data.splits.test={N_TEST}", "data.samples_per_shard=400", f"embed.image_size={SIZE}",
                             "eval.ks=[1,10,50]", "memory.rerank_k=20", "memory.rerank_encoder=efficientnet_lite1",
                             "memory.ood_neighbors=50"])
    enc = create_encoder("efficientnet_lite0", pretrained=True, image_size=SIZE)
    train, xb = _embed_split(cfg, "train", enc)
    test, xq = _embed_split(cfg, "test", enc)
    data = Synthetic(xb, np.array([s["label"] for s in train]), [s["key"] for s in train],
                     np.array([s["id"] for s in train], np.int64), np.zeros((0, xb.shape[1])))
    names = {s["label"]: s["label_name"] for s in train}
    build_synthetic_memory(cfg.memory_dir, data, index_key="IVF8,Flat", nprobe=8,
                           label_names=[names.get(c, str(c)) for c in range(max(names) + 1)],
                           shards=[s["shard"] for s in train], encoder={"name": "efficientnet_lite0",
                                                                        "image_size": SIZE},
                           build={"split": "train"})
    return cfg, train, xb, np.array([s["label"] for s in test]), xq, test, names


def _open(cfg, *overrides):
    from pipeline.config import load_config
    from pipeline.memory.memory import VisualMemory

    cfg = load_config(None, [f"workdir={cfg.workdir}", f"data.input={cfg.data.input}",
                             "memory.rerank_k=20", "memory.rerank_encoder=efficientnet_lite1", *overrides])
    return VisualMemory.open(cfg.memory_dir, cfg=cfg)


def test_predictions_carry_confidence_and_ood_score(real):
    cfg, _, _, yq, xq, _, _ = real
    mem = _open(cfg)
    preds = mem.classify(embeddings=xq[:50], k=11, method="rank")  # no calibration is fitted at k=11
    nb = mem.search(embeddings=xq[:50], k=11)
    for q, p in enumerate(preds):
        total = sum(p.scores.values())
        assert p.confidence == pytest.approx(p.scores[p.label_name] / total)
        second = sorted(p.scores.values())[-2] if len(p.scores) > 1 else 0.0
        assert p.margin == pytest.approx((p.scores[p.label_name] - second) / total)
        assert p.ood_score == pytest.approx(np.mean(1 - nb.D[q]), abs=1e-5)  # k=11 < ood_neighbors
        assert p.probability is None and p.ood is None and not p.abstained  # no calibration stored yet
    assert "confidence" in preds[0].to_dict() and "ood_score" in preds[0].to_dict()
    mem.close()


def test_calibration_lowers_ece_on_held_out_queries_and_is_stored(real, capsys):
    from pipeline import storage
    from pipeline.cli import main
    from pipeline.memory.trust import apply_map, calibration_url, load_calibration

    cfg, _, _, yq, xq, _, _ = real
    # k=50 of 600 items: vote shares spread over classes, the raw share is under-confident, so a fit has
    # something to correct (at k=10 the raw share is already within the ECE noise of 300 queries).
    args = [f"workdir={cfg.workdir}", f"data.input={cfg.data.input}", "eval.ks=[1,10,50]", "memory.k=50",
            "memory.ood_neighbors=50"]
    assert main(["eval", *args]) == 0
    out = capsys.readouterr().out
    assert "ECE before" in out and "OOD study" in out and "IndexFlatIP" in out
    rows = {r.split(",")[0]: r.split(",") for r in storage.read_bytes(
        storage.join(cfg.workdir, "eval", "calibration.csv")).decode().splitlines()[1:]}
    before = np.array([float(r[3]) for r in rows.values()])
    after = np.array([float(r[4]) for r in rows.values()])
    assert set(rows) == {"plurality", "distance", "softmax", "rank"}
    assert after.mean() < before.mean(), (before, after)  # measured on the half the fit never saw
    for name in ("reliability.png", "ood.png", "ood.csv", "accuracy.csv"):
        assert storage.exists(storage.join(cfg.workdir, "eval", name)), name
    mem = _open(cfg, "memory.ood_neighbors=50")
    assert storage.exists(calibration_url(cfg.memory_dir, mem.version))
    cal = load_calibration(cfg.memory_dir, mem.version)
    preds = mem.classify(embeddings=xq[:20], k=50, method="softmax")
    for p in preds:  # the stored map turns the vote share into the reported probability
        assert cal.methods["softmax"]["kind"] == "platt"
        assert p.probability == pytest.approx(float(apply_map(cal.methods["softmax"], np.array([p.confidence]),
                                                              50)[0]))
        assert p.ood == (p.ood_score > cal.ood_threshold)
    assert mem.classify(embeddings=xq[:2], k=7, method="softmax")[0].probability is None  # fitted at k=50 only
    mem.close()


def test_abstain_policy_answers_unknown_with_the_reason(real):
    cfg, _, _, yq, xq, _, _ = real
    mem = _open(cfg, "memory.abstain.min_confidence=0.95")
    preds = mem.classify(embeddings=xq[:100], k=9, method="plurality")  # k=9: no calibration, raw share
    low = [p for p in preds if p.abstained]
    high = [p for p in preds if not p.abstained]
    assert low and high  # real queries: some unanimous, some not
    for p in low:
        assert p.label == -1 and p.label_name == "unknown" and p.voted_label >= 0
        assert "min_confidence" in p.abstain_reason and p.confidence < 0.95
    assert all(p.confidence >= 0.95 and p.label >= 0 for p in high)
    mem.close()
    scores = [p.ood_score for p in preds]
    thr = float(np.median(scores))
    mem = _open(cfg, f"memory.abstain.max_ood={thr}")
    preds = mem.classify(embeddings=xq[:100], k=9, method="plurality")
    flagged = [p for p in preds if p.abstained]
    assert len(flagged) == sum(s > thr for s in scores) > 0
    assert all("OOD score" in p.abstain_reason and p.ood for p in flagged)
    mem.close()


def test_encoder_reranker_reorders_through_the_registry_and_the_vote_follows(real):
    from pipeline.embed.encoders import create_encoder
    from pipeline.embed.preprocess import decode_image
    from pipeline.memory.votes import vote

    cfg, _, _, yq, xq, test, names = real
    mem = _open(cfg, "memory.reranker=encoder")
    images = [s["image"] for s in test[:4]]
    preds = mem.classify(images=images, k=5, method="rank")
    # independent reference: the stronger encoder's similarity over the plain search's 20 candidates
    enc = create_encoder("efficientnet_lite1", pretrained=True, image_size=SIZE)
    cand = mem.search(images=images, k=20)
    reordered = 0
    for q, p in enumerate(preds):
        assert p.reranker == "encoder"
        x = enc.encode([decode_image(mem.get_image(int(i))) for i in cand.I[q]])
        xr = enc.encode([decode_image(images[q])])[0]
        order = np.argsort(-(x @ xr), kind="stable")[:5]
        assert [n.id for n in p.neighbors] == cand.I[q, order].tolist()
        assert [n.rank_before for n in p.neighbors] == order.tolist()
        reordered += order.tolist() != list(range(5))
        ref = vote("rank", 1 - cand.D[q:q + 1, order], cand.labels[q:q + 1, order])
        assert p.label == int(ref.label[0])
        assert [n.weight for n in p.neighbors] == pytest.approx([1 / (2 + i) for i in range(5)])
    assert reordered > 0  # the second encoder changed at least one order
    with pytest.raises(Exception, match="needs the query images"):
        mem.classify(embeddings=xq[:1], k=5)
    mem.close()


def test_registered_reranker_weights_reach_the_vote(real):
    from pipeline.memory import rerankers

    class LastFirst(rerankers.Reranker):
        """Reverse the candidates and silence the (new) first one."""

        def rerank(self, images, xq, nb, load_image):
            order = np.tile(np.arange(nb.I.shape[1])[::-1], (nb.I.shape[0], 1))
            w = np.ones(nb.I.shape)
            w[:, 0] = 0.0
            return order, w

    if "test_last_first" not in rerankers.available_rerankers():
        rerankers.register_reranker("test_last_first")(lambda mem, cfg: LastFirst())
    cfg, _, _, yq, xq, _, _ = real
    mem = _open(cfg, "memory.reranker=test_last_first")
    plain = mem.search(embeddings=xq[:3], k=20)
    preds = mem.classify(embeddings=xq[:3], k=5, method="plurality")
    for q, p in enumerate(preds):
        assert [n.id for n in p.neighbors] == plain.I[q, ::-1][:5].tolist()
        assert [n.weight for n in p.neighbors] == [0.0, 1.0, 1.0, 1.0, 1.0]
        assert sum(p.scores.values()) == pytest.approx(4.0)
    mem.close()
    with pytest.raises(Exception, match="unknown reranker 'nope'.*encoder"):
        _open(cfg, "memory.reranker=nope").classify(embeddings=xq[:1])


@pytest.mark.slow
def test_paper_study_prints_verdicts_from_computed_numbers(real, ray_session, capsys):
    from pipeline.cli import main

    cfg, train, xb, yq, xq, _, _ = real
    assert main(["eval", "--study", "paper", "--label", "3", f"workdir={cfg.workdir}",
                 f"data.input={cfg.data.input}", "eval.ks=[1,10,50]", "memory.ood_neighbors=50",
                 "memory.hard_prune_threshold=20"]) == 0
    out = capsys.readouterr().out
    assert out.count("verdict: ") == 5
    import json
    from pipeline import storage

    claims = json.loads(storage.read_bytes(storage.join(cfg.workdir, "eval", "paper.json")))
    assert [c["claim"] for c in claims] == ["large_k", "soft_pruning", "add_class", "delete_class", "ood"]
    assert all(c["verdict"] in ("HOLDS", "FAILS", "INCONCLUSIVE") for c in claims)
    # the numbers are computed: k=1 plurality = the nearest neighbour's label, recomputed here by brute force
    yb = np.array([s["label"] for s in train])
    nn = np.argmax(xq @ xb.T, axis=1)
    assert claims[0]["numbers"]["accuracy"]["plurality"][0] == pytest.approx(np.mean(yb[nn] == yq))
    add = claims[2]["numbers"]
    assert add["label"] == 3 and add["before"]["class"] == 0.0 and add["added"] == int((yb == 3).sum())
    assert claims[3]["numbers"]["before_compaction"]["queries_labelled_with_it"] == 0
    rows = claims[4]["numbers"]["rows"]
    assert len(rows) == 10 and all(0 <= r["auroc"] <= 1 for r in rows)
    assert claims[4]["numbers"]["mean"]["auroc"] == pytest.approx(np.mean([r["auroc"] for r in rows]))


@pytest.mark.browser
@pytest.mark.slow
def test_explorer_shows_confidence_ood_abstain_and_rerank_order(real, tmp_path):
    """The explorer page in headless Chromium against the API (create_api + uvicorn on 127.0.0.1)."""
    import os
    import threading
    import time

    import uvicorn
    from playwright.sync_api import expect, sync_playwright

    from pipeline.serve.api import create_api
    from test_browser import ARGS, CHROMIUM
    from test_serve import free_port

    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian chromium is missing: apt-get install -y chromium")
    cfg, _, _, _, _, test, _ = real
    mem = _open(cfg, "memory.reranker=encoder", "memory.abstain.max_ood=0.0")  # every query is "too far"
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_api(mem.cfg, mem, token="t"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    query = tmp_path / "q.png"
    query.write_bytes(test[0]["image"])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#k", "5")
            page.set_input_files("#file", str(query))
            expect(page.locator(".nb")).to_have_count(5, timeout=60_000)
            expect(page.locator("#label")).to_have_text("unknown")
            expect(page.locator("#trust")).to_contain_text("vote share")
            expect(page.locator("#trust")).to_contain_text("OOD score")
            expect(page.locator("#ood-flag")).to_be_visible()
            expect(page.locator("#abstain")).to_contain_text("memory.abstain.max_ood")
            expect(page.locator("#rerank")).to_contain_text("re-ranked by encoder")
            expect(page.locator(".nb .lbl").first).to_contain_text("(was #")
            page.screenshot(path=str(tmp_path / "trust.png"), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
        mem.close()
