"""Vote methods against hand-computed examples and a scalar reference of the paper's scanning rule."""
import math

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.memory import votes


def _reference(method, d, labels, gamma=None, **params):
    """Scalar, loop-by-loop version of the paper's rule (strict `>` while scanning ranks)."""
    p = {**votes.DEFAULT_PARAMS, **params}
    base = method.replace("soft_", "")
    out = []
    for q in range(d.shape[0]):
        totals, best, best_total = {}, -1, -math.inf
        for i in range(d.shape[1]):
            w = {"plurality": 1.0, "distance": math.exp(-d[q, i]) ** p["xi"],
                 "softmax": math.exp((1 - d[q, i]) / p["tau"]), "rank": 1 / (p["alpha"] + i)}[base]
            if method.startswith("soft_") and gamma is not None:
                w *= gamma[q, i]
            c = int(labels[q, i])
            totals[c] = totals.get(c, 0.0) + w
            if totals[c] > best_total:
                best, best_total = c, totals[c]
        out.append(best)
    return np.array(out)


def test_plurality_ties_go_to_the_class_that_reached_the_max_first():
    d = np.zeros((2, 4))
    v = votes.vote("plurality", d, np.array([[1, 2, 2, 1], [1, 2, 1, 2]]))
    assert v.label.tolist() == [2, 1]
    assert v.scores(0) == {2: 2.0, 1: 2.0}


def test_distance_and_xi():
    d = np.array([[0.1, 0.2, 0.3]])
    v = votes.vote("distance", d, np.array([[1, 2, 2]]))
    np.testing.assert_allclose(v.weights[0], [math.exp(-0.1), math.exp(-0.2), math.exp(-0.3)])
    assert v.label[0] == 2
    v2 = votes.vote("distance", d, np.array([[1, 2, 2]]), xi=2.0)
    np.testing.assert_allclose(v2.weights[0], np.exp(-2 * d[0]))


def test_softmax_lets_one_close_neighbour_outvote_two_far_ones():
    d = np.array([[0.0, 0.1, 0.1]])
    labels = np.array([[1, 2, 2]])
    assert votes.vote("plurality", d, labels).label[0] == 2
    v = votes.vote("softmax", d, labels)
    np.testing.assert_allclose(v.weights[0], np.exp((1 - d[0]) / 0.07))
    assert v.label[0] == 1  # e^(1/0.07) > 2 e^(0.9/0.07)


def test_rank_weights_and_exact_tie():
    d = np.zeros((1, 5))
    v = votes.vote("rank", d, np.array([[1, 2, 3, 3, 2]]))
    np.testing.assert_allclose(v.weights[0], [1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])
    # class 1: 1/2; class 2: 1/3 + 1/6 = 1/2 reached later; class 3: 9/20 -> class 1 wins the tie
    assert v.totals[0, list(v.classes).index(2)] == 0.5
    assert v.label[0] == 1
    assert votes.vote("rank", d, np.array([[1, 2, 2, 3, 3]])).label[0] == 2  # 7/12 > 1/2


def test_soft_variants_multiply_by_gamma_and_hard_ones_ignore_it():
    d = np.zeros((1, 3))
    labels = np.array([[1, 2, 2]])
    gamma = np.array([[1.0, 1.75 / 11, 1.75 / 11]])  # two noisy items with v = 10
    assert votes.vote("plurality", d, labels, gamma=gamma).label[0] == 2
    v = votes.vote("soft_plurality", d, labels, gamma=gamma)
    np.testing.assert_allclose(v.weights[0], gamma[0])
    assert v.label[0] == 1


def test_multipliers_apply_to_every_method_and_missing_neighbours_weigh_nothing():
    d = np.zeros((1, 4))
    labels = np.array([[1, 2, 2, -1]])
    v = votes.vote("plurality", d, labels, multipliers=np.array([[3.0, 1.0, 1.0, 1.0]]))
    assert v.label[0] == 1 and v.weights[0, 3] == 0
    assert set(v.classes.tolist()) == {1, 2}
    empty = votes.vote("rank", d, np.full((1, 4), -1))
    assert empty.label[0] == -1


def test_unknown_method_lists_the_names():
    with pytest.raises(UserError, match="soft_rank"):
        votes.vote("majority", np.zeros((1, 1)), np.zeros((1, 1)))
    assert set(votes.available_methods()) == {
        "plurality", "distance", "softmax", "rank", "soft_plurality", "soft_distance", "soft_softmax", "soft_rank"}


@pytest.mark.parametrize("method", votes.available_methods())
def test_matches_scalar_reference_on_random_neighbour_sets(method):
    rng = np.random.default_rng(0)
    d = np.sort(rng.uniform(0, 1, (300, 15)), axis=1)
    labels = rng.integers(0, 4, (300, 15))  # few classes -> many ties for plurality
    gamma = rng.choice([1.0, 0.875, 0.5], (300, 15))
    got = votes.vote(method, d, labels, gamma=gamma).label
    np.testing.assert_array_equal(got, _reference(method, d, labels, gamma))


def test_plurality_k1_is_the_nearest_label():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, (50, 1)) * 7 + 3  # arbitrary, non-contiguous label values
    assert (votes.vote("plurality", rng.uniform(0, 1, (50, 1)), labels).label == labels[:, 0]).all()
