"""The trust math (pipeline.memory.confidence) against values computed by hand, and its plumbing on a memory."""
import math

import numpy as np
import pytest

from pipeline.memory import confidence as C
from pipeline.memory.votes import vote


def test_vote_confidence_by_hand():
    # query 0: plurality over labels [1, 1, 2, 3] -> totals 1:2, 2:1, 3:1; query 1: a unanimous vote
    v = vote("plurality", np.zeros((2, 4)), np.array([[1, 1, 2, 3], [2, 2, 2, 2]]))
    col = np.searchsorted(v.classes, v.label)
    c = C.vote_confidence(v.totals, v.present, col)
    np.testing.assert_allclose(c["share"], [0.5, 1.0])
    np.testing.assert_allclose(c["margin"], [0.25, 1.0])
    np.testing.assert_allclose(c["entropy"], [-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), 0.0])


def test_vote_confidence_rank_weights_and_missing_rows():
    # rank weights 1/2, 1/3, 1/4 on labels [5, 6, 5]: 5 -> 3/4, 6 -> 1/3 of a total 13/12
    v = vote("rank", np.zeros((2, 3)), np.array([[5, 6, 5], [-1, -1, -1]]))
    col = np.where(v.label >= 0, np.searchsorted(v.classes, v.label), -1)
    c = C.vote_confidence(v.totals, v.present, col)
    assert c["share"][0] == pytest.approx(0.75 / (13 / 12))
    assert c["margin"][0] == pytest.approx((0.75 - 1 / 3) / (13 / 12))
    assert (c["share"][1], c["margin"][1], c["entropy"][1]) == (0.0, 0.0, 0.0)


def test_ood_score_is_the_mean_of_the_first_n_distances():
    d = np.array([[0.1, 0.2, 0.3, 0.9], [0.4, np.nan, np.nan, np.nan], [np.nan] * 4])
    s = C.ood_score(d, n=3)
    np.testing.assert_allclose(s[:2], [0.2, 0.4])
    assert np.isnan(s[2])


def test_ece_and_reliability_by_hand():
    conf = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0, 1, 0])
    r = C.reliability(conf, correct, bins=10)
    assert r["count"][9] == 4 and r["count"][5] == 2 and r["count"].sum() == 6
    # bins: 0.9-1.0 acc 0.75 conf 0.95 (|0.20| x 4/6); 0.5-0.6 acc 0.5 conf 0.55 (|0.05| x 2/6)
    assert C.ece(conf, correct) == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.05)
    assert C.ece(np.ones(3), np.ones(3)) == 0.0


def test_isotonic_pools_adjacent_violators():
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.4])
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    kx, ky = C.fit_isotonic(x, y)
    np.testing.assert_allclose(kx, [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(ky, [0.0, 0.5, 0.5, 1.0])  # 1, 0 at 0.2, 0.3 pooled to 0.5
    np.testing.assert_allclose(C.apply_isotonic([0.0, 0.25, 1.0], kx, ky), [0.0, 0.5, 1.0])
    assert (np.diff(C.fit_isotonic(np.random.default_rng(0).random(200),
                                   np.random.default_rng(1).random(200))[1]) >= 0).all()


def test_share_logit_and_platt_fit():
    np.testing.assert_allclose(C.share_logit([0.5, 1.0, 0.0], k=10), [0.0, math.log(0.95 / 0.05),
                                                                         math.log(0.05 / 0.95)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-(2.0 * x - 0.5)))).astype(float)
    a, b = C.fit_platt(x, y)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(-0.5, abs=0.1)
    assert C.apply_platt(0.25, 2.0, -0.5) == pytest.approx(0.5)
