"""Benchmark metrics on hand-built inputs whose answers were worked out by hand.

Each case is chosen so that a correct implementation gets the stated number and a plausible broken one
(self not excluded, ascending instead of descending order, ties counted as wins, weights reversed,
wrong normaliser) gets another.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from simsearch.bench.metrics import (leave_one_out, ordering_accuracy, sample_triplets, triplet_accuracy,
                                     wilson)

# -- leave-one-out mAP / recall@k ---------------------------------------------------------------
# Six images; labels 0,0,0,1,1,2 (image 5 is alone in its group: it is never a query).
HAND_SIM = np.array([
    [1.00, 0.90, 0.20, 0.80, 0.10, 0.30],
    [0.90, 1.00, 0.70, 0.60, 0.50, 0.40],
    [0.20, 0.70, 1.00, 0.30, 0.85, 0.15],
    [0.80, 0.60, 0.30, 1.00, 0.35, 0.05],
    [0.10, 0.50, 0.85, 0.35, 1.00, 0.25],
    [0.30, 0.40, 0.15, 0.05, 0.25, 1.00],
])
HAND_LABELS = np.array([0, 0, 0, 1, 1, 2])
# Rankings by hand (self left out):
#   q0 (pos 1,2): 1 3 5 2 4 -> rel 1 0 0 1 0 -> AP (1/1 + 2/4)/2 = 0.75
#   q1 (pos 0,2): 0 2 3 4 5 -> rel 1 1 0 0 0 -> AP 1
#   q2 (pos 0,1): 4 1 3 0 5 -> rel 0 1 0 1 0 -> AP (1/2 + 2/4)/2 = 0.5
#   q3 (pos 4):   0 1 4 2 5 -> rel 0 0 1     -> AP 1/3
#   q4 (pos 3):   2 1 3 5 0 -> rel 0 0 1     -> AP 1/3
HAND_MAP = (0.75 + 1 + 0.5 + 1 / 3 + 1 / 3) / 5  # 0.58333
HAND_RECALL = {1: 2 / 5, 2: 3 / 5, 3: 1.0}


def reference_loo(sim: np.ndarray, labels: np.ndarray, ks=(1,)) -> dict:
    """A slow, obviously-correct leave-one-out for matrices without ties."""
    aps, recalls = [], {k: [] for k in ks}
    for q in range(len(labels)):
        others = [j for j in range(len(labels)) if j != q]
        ranked = sorted(others, key=lambda j: -sim[q, j])
        rel = [labels[j] == labels[q] for j in ranked]
        if not any(rel):
            continue
        hits, precisions = 0, []
        for r, is_rel in enumerate(rel, 1):
            if is_rel:
                hits += 1
                precisions.append(hits / r)
        aps.append(np.mean(precisions))
        for k in ks:
            recalls[k].append(any(rel[:k]))
    return {"mAP": float(np.mean(aps)), **{f"recall@{k}": float(np.mean(v)) for k, v in recalls.items()}}


def test_leave_one_out_hand_computed():
    out = leave_one_out(HAND_SIM, HAND_LABELS, ks=(1, 2, 3))
    assert out["queries"] == 5  # the singleton is no query
    assert out["mAP"] == pytest.approx(HAND_MAP, abs=1e-9)
    for k, r in HAND_RECALL.items():
        assert out[f"recall@{k}"] == pytest.approx(r, abs=1e-9)
    assert reference_loo(HAND_SIM, HAND_LABELS, (1, 2, 3)) == pytest.approx(
        {"mAP": HAND_MAP, **{f"recall@{k}": r for k, r in HAND_RECALL.items()}})


def test_leave_one_out_broken_variants_differ():
    """The hand case separates the usual mistakes from the right answer."""
    # ascending order (treating sim as a distance) gives another number
    assert leave_one_out(-HAND_SIM, HAND_LABELS)["mAP"] != pytest.approx(HAND_MAP, abs=1e-3)
    # the diagonal must not be used: a huge self-similarity changes nothing
    big_diag = HAND_SIM + np.eye(6) * 100
    assert leave_one_out(big_diag, HAND_LABELS)["mAP"] == pytest.approx(HAND_MAP, abs=1e-9)
    # a very low self-similarity changes nothing either (self is removed, not ranked last by luck)
    low_diag = HAND_SIM - np.eye(6) * 100
    assert leave_one_out(low_diag, HAND_LABELS)["mAP"] == pytest.approx(HAND_MAP, abs=1e-9)


def block_sim(n_per: int = 3, groups: int = 2) -> np.ndarray:
    """Within-group 0.9 - 0.01 (i + j), across 0.1 - 0.01 (i + j): no ties, perfectly separated."""
    n = n_per * groups
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    same = (i // n_per) == (j // n_per)
    sim = np.where(same, 0.9, 0.1) - 0.01 * (i + j)
    np.fill_diagonal(sim, 1.0)
    return sim


def test_perfectly_separated_groups_give_map_one():
    sim = block_sim(3, 2)
    labels = np.array([0, 0, 0, 1, 1, 1])
    out = leave_one_out(sim, labels, ks=(1, 5))
    assert out["mAP"] == 1.0 and out["recall@1"] == 1.0 and out["recall@5"] == 1.0 and out["queries"] == 6
    # also with more, uneven groups
    sim4 = block_sim(4, 3)
    assert leave_one_out(sim4, np.repeat([0, 1, 2], 4))["mAP"] == 1.0


def test_swapping_two_labels_lowers_map_by_a_computable_amount():
    """Labels of images 2 and 3 swapped: 0,0,1,0,1,1 on the block matrix 0,0,0 | 1,1,1.
    Rankings (i + j ordering inside each block, so no ties):
      q0 pos {1,3}: 1 2 3 4 5 -> 1 0 1 0 0 -> (1 + 2/3)/2 = 5/6
      q1 pos {0,3}: 0 2 3 4 5 -> 1 0 1 0 0 -> 5/6
      q2 pos {4,5}: 0 1 3 4 5 -> 0 0 0 1 1 -> (1/4 + 2/5)/2 = 0.325
      q3 pos {0,1}: 4 5 0 1 2 -> 0 0 1 1 0 -> (1/3 + 2/4)/2 = 5/12
      q4 pos {2,5}: 3 5 0 1 2 -> 0 1 0 0 1 -> (1/2 + 2/5)/2 = 0.45
      q5 pos {2,4}: 3 4 0 1 2 -> 0 1 0 0 1 -> 0.45
    """
    sim = block_sim(3, 2)
    swapped = np.array([0, 0, 1, 0, 1, 1])
    expected = (5 / 6 + 5 / 6 + 0.325 + 5 / 12 + 0.45 + 0.45) / 6  # 0.551389
    out = leave_one_out(sim, swapped, ks=(1,))
    assert out["mAP"] == pytest.approx(expected, abs=1e-9)
    assert 1.0 - out["mAP"] == pytest.approx(0.448611, abs=1e-6)
    assert out["recall@1"] == pytest.approx(2 / 6, abs=1e-9)
    assert reference_loo(sim, swapped)["mAP"] == pytest.approx(expected, abs=1e-9)


def test_leave_one_out_matches_reference_on_random_matrices():
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(5, 15))
        x = rng.normal(size=(n, 4))
        sim = x @ x.T
        labels = rng.integers(0, 3, n)
        if len(np.unique(labels)) < 2:
            continue
        got = leave_one_out(sim, labels, ks=(1, 3))
        want = reference_loo(sim, labels, (1, 3))
        assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-9)
        assert got["recall@1"] == pytest.approx(want["recall@1"], abs=1e-9)
        assert got["recall@3"] == pytest.approx(want["recall@3"], abs=1e-9)


def test_leave_one_out_is_invariant_to_the_order_of_the_images():
    """A metric of a set must not depend on the order its images are listed in. With tied scores
    (a constant matrix: a collapsed model, or duplicates) a stable argsort breaks ties by index, so
    the group listed first wins every tie: a constant matrix scores mAP 0.667 with labels 0,0,1,1 and
    0.583 with 0,1,0,1, and recall@1 1.0 for the first group. Ties must be broken independently of
    position (pessimistically: negatives before positives, or by their expectation)."""
    const = np.full((4, 4), 0.5)
    a = leave_one_out(const, np.array([0, 0, 1, 1]))
    b = leave_one_out(const, np.array([0, 1, 0, 1]))
    c = leave_one_out(const, np.array([1, 1, 0, 0]))
    assert a["mAP"] == pytest.approx(b["mAP"]) == pytest.approx(c["mAP"])
    assert a["recall@1"] == pytest.approx(b["recall@1"])
    # a model that says nothing must not look better than chance (1 positive among 3 tied others:
    # the expected AP under a random order is (1 + 1/2 + 1/3)/3 = 0.611)
    assert a["mAP"] <= 0.611 + 1e-9


def test_leave_one_out_permutation_invariance_random_ties():
    """Same property on a matrix with many exact ties (quantised scores)."""
    rng = np.random.default_rng(3)
    n = 12
    x = rng.normal(size=(n, 3))
    sim = np.round(x @ x.T, 0)  # coarse: many ties
    labels = np.repeat([0, 1, 2], 4)
    base = leave_one_out(sim, labels)
    for seed in range(5):
        p = np.random.default_rng(seed).permutation(n)
        out = leave_one_out(sim[np.ix_(p, p)], labels[p])
        assert out["mAP"] == pytest.approx(base["mAP"], abs=1e-9)


# -- triplets ---------------------------------------------------------------------------------
def test_triplet_accuracy_ties_count_half_hand_case():
    sim = np.array([
        [1.0, 0.8, 0.3, 0.5],
        [0.8, 1.0, 0.8, 0.2],
        [0.3, 0.8, 1.0, 0.9],
        [0.5, 0.2, 0.9, 1.0],
    ])
    triplets = np.array([
        [0, 1, 2],  # 0.8 > 0.3 win
        [1, 0, 2],  # 0.8 == 0.8 tie -> half
        [2, 3, 1],  # 0.9 > 0.8 win
        [3, 0, 2],  # 0.5 < 0.9 loss
    ])
    e = triplet_accuracy(sim, triplets)
    assert e.n == 4
    assert e.value == pytest.approx(2.5 / 4)
    w = wilson(2.5, 4)
    assert (e.low, e.high) == pytest.approx((w.low, w.high))
    # all ties -> exactly one half; reversed similarities -> 1 - value (ties stay half)
    assert triplet_accuracy(np.zeros((4, 4)), triplets).value == 0.5
    assert triplet_accuracy(-sim, triplets).value == pytest.approx(1 - 2.5 / 4)


def test_sample_triplets_are_valid_seeded_and_seed_dependent():
    labels = np.repeat(np.arange(4), 5)
    t = sample_triplets(labels, 500, seed=11)
    assert t.shape == (500, 3)
    a, p, c = t.T
    assert np.all(labels[a] == labels[p]) and np.all(a != p) and np.all(labels[a] != labels[c])
    assert np.array_equal(t, sample_triplets(labels, 500, seed=11))
    assert not np.array_equal(t, sample_triplets(labels, 500, seed=12))
    # every group can be an anchor group, and a singleton group is only ever a negative
    labels2 = np.array([0, 0, 0, 1, 1, 2])
    t2 = sample_triplets(labels2, 300, seed=0)
    assert set(labels2[t2[:, 0]]) == {0, 1}
    assert 2 in set(labels2[t2[:, 2]])


# -- IP ordering ------------------------------------------------------------------------------
WEIGHTS = np.array([1.0, 0.8, 0.5, 0.2])


def test_ordering_accuracy_monotone_reversed_and_one_swap():
    mono = 0.1 + 0.9 * WEIGHTS  # scores increase with weight
    e = ordering_accuracy(mono, WEIGHTS)
    assert (e.value, e.n) == (1.0, 6)
    assert ordering_accuracy(mono[::-1], WEIGHTS).value == 0.0
    assert ordering_accuracy(-mono, WEIGHTS).value == 0.0
    # any strictly increasing transform keeps 1 (only the order matters)
    assert ordering_accuracy(np.exp(5 * mono), WEIGHTS).value == 1.0
    # swapping the scores of weights 0.8 and 0.5: one of six pairs wrong
    swapped = mono.copy()
    swapped[[1, 2]] = swapped[[2, 1]]
    assert ordering_accuracy(swapped, WEIGHTS).value == pytest.approx(5 / 6)
    # the order of the variants in the input does not matter
    perm = np.array([2, 0, 3, 1])
    assert ordering_accuracy(mono[perm], WEIGHTS[perm]).value == 1.0
    assert ordering_accuracy(swapped[perm], WEIGHTS[perm]).value == pytest.approx(5 / 6)


def test_ordering_accuracy_ties_and_equal_weights():
    # two scores tied: that pair counts half
    s = np.array([0.9, 0.5, 0.5, 0.1])
    assert ordering_accuracy(s, WEIGHTS).value == pytest.approx(5.5 / 6)
    # equal weights are not compared: 3 weights distinct among 4 variants -> 5 pairs
    w = np.array([1.0, 0.5, 0.5, 0.2])
    e = ordering_accuracy(np.array([0.9, 0.6, 0.4, 0.1]), w)
    assert e.n == 5 and e.value == 1.0


def test_ordering_accuracy_matches_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(30):
        v = int(rng.integers(2, 7))
        w = rng.choice([0.1, 0.2, 0.5, 0.8, 1.0], size=v)
        s = rng.choice([0.1, 0.3, 0.6, 0.9], size=v)  # ties likely
        wins = n = 0
        for i, j in itertools.combinations(range(v), 2):
            if w[i] == w[j]:
                continue
            hi, lo = (i, j) if w[i] > w[j] else (j, i)
            n += 1
            wins += 1.0 if s[hi] > s[lo] else 0.5 if s[hi] == s[lo] else 0.0
        e = ordering_accuracy(s, w)
        assert e.n == n
        if n:
            assert e.value == pytest.approx(wins / n)


# -- Wilson interval ----------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,low,high", [
    (8, 10, 0.490, 0.943),     # the usual textbook example
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Stat. Med. 17:857, table I
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_textbook_values(k, n, low, high):
    e = wilson(k, n)
    assert e.value == pytest.approx(k / n)
    assert e.n == n
    assert e.low == pytest.approx(low, abs=6e-4)
    assert e.high == pytest.approx(high, abs=6e-4)
    assert e.to_dict() == {"value": e.value, "n": n, "ci95": [e.low, e.high]}


def test_wilson_interval_contains_its_estimate_and_reaches_the_bounds():
    """All successes -> upper bound exactly 1, none -> lower bound exactly 0, and always
    low <= value <= high. (Rounding made e.g. wilson(6, 6).high = 0.9999999999999999 < value 1.0 and
    wilson(0, 11).low > 0, so a reader checking low <= value <= high saw a broken interval.)"""
    for n in range(1, 600):
        assert wilson(n, n).high == 1.0, n
        assert wilson(0, n).low == 0.0, n
        for k in (0, 0.5, n / 3, n - 0.5, n):
            e = wilson(k, n)
            assert 0.0 <= e.low <= e.value <= e.high <= 1.0, (k, n, e)
