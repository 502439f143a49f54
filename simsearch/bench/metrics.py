"""Retrieval and ordering metrics on similarity matrices. Pure numpy; no models, no I/O.

Conventions: `sim` is (N, N) with higher = more similar; `labels` (N,) are group ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Estimate:
    """A proportion with its sample size and 95% Wilson interval."""

    value: float
    n: int
    low: float
    high: float

    def to_dict(self) -> dict:
        return {"value": self.value, "n": self.n, "ci95": [self.low, self.high]}


def wilson(successes: float, n: int, z: float = 1.96) -> Estimate:
    if n == 0:
        return Estimate(float("nan"), 0, float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # min/max with p: rounding must not put the estimate outside its own interval (p = 0 or 1)
    return Estimate(p, n, max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p)))


def _ranked_relevance(sim: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(Q, N-1) relevance of each ranked list, for the Q queries with at least one other member of
    their group."""
    sim = np.asarray(sim, dtype=np.float64).copy()
    labels = np.asarray(labels)
    n = len(labels)
    np.fill_diagonal(sim, -np.inf)
    same = labels[None, :] == labels[:, None]
    # Tied scores rank negatives first (pessimistic), so the numbers do not depend on the order the
    # images are listed in and a constant matrix scores no better than chance.
    order = np.lexsort((same, -sim), axis=1)[:, : n - 1]  # (N, N-1), self last -> dropped
    relevant = np.take_along_axis(same, order, axis=1)  # (N, N-1)
    return relevant[relevant.any(1)]


def average_precisions(sim: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Leave-one-out average precision of each query that has another member of its group -> (Q,)."""
    rel = _ranked_relevance(sim, labels)
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    return (rel * hits / ranks).sum(1) / rel.sum(1)


def leave_one_out(sim: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Each image queries all others. -> {"mAP", "recall@k"...}, averaged over queries that have
    at least one other member of their group."""
    rel = _ranked_relevance(sim, labels)
    out = {"mAP": float(average_precisions(sim, labels).mean()), "queries": int(len(rel))}
    for k in ks:
        out[f"recall@{k}"] = float(rel[:, :k].any(1).mean())
    return out


def average_rank(values) -> np.ndarray:
    """(N,) values -> (N,) ranks, 1 = highest; tied values share the mean of their ranks."""
    v = np.asarray(values, dtype=float)
    better = (v[None, :] > v[:, None]).sum(1)
    ties = (v[None, :] == v[:, None]).sum(1)
    return 1 + better + (ties - 1) / 2


def bootstrap_ci(values: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. per-query AP), resampling them
    with replacement; seeded."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def reranked(first: np.ndarray, second: np.ndarray, candidates: int) -> np.ndarray:
    """The similarity matrix a two-stage search ranks by: each row's `candidates` best columns by
    `first` (itself excluded) come first, ordered by `second`; the rest follow in `first`'s order.
    Entries of `second` outside the candidates are never read (they may be NaN). With candidates >=
    N - 1 this is `second` off the diagonal."""
    first = np.asarray(first, dtype=np.float64).copy()
    n = len(first)
    np.fill_diagonal(first, -np.inf)
    out = first.copy()
    cand = top_candidates(first, candidates)
    rows = np.arange(n)[:, None]
    vals = np.asarray(second, dtype=np.float64)[rows, cand]
    if cand.shape[1] < n - 1:
        rest = np.ones_like(first, dtype=bool)
        rest[rows, cand] = False
        np.fill_diagonal(rest, False)
        # shift the rest of each row below its lowest candidate, keeping their first-stage order
        gap = vals.min(1) - np.where(rest, first, -np.inf).max(1) - 1.0
        out = np.where(rest, first + gap[:, None], out)
    out[rows, cand] = vals
    return out


def top_candidates(first: np.ndarray, candidates: int) -> np.ndarray:
    """(N, K) column indices of each row's K highest entries of `first`, itself excluded, K = min(candidates, N - 1)."""
    first = np.asarray(first, dtype=np.float64).copy()
    n = len(first)
    np.fill_diagonal(first, -np.inf)
    k = min(candidates, n - 1)
    return np.argsort(-first, axis=1, kind="stable")[:, :k]


def sample_triplets(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) index triplets (anchor, positive, negative): a, p same group, c another. Seeded."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    groups = {g: np.flatnonzero(labels == g) for g in np.unique(labels)}
    eligible = [g for g, idx in groups.items() if len(idx) >= 2]
    if not eligible or len(groups) < 2:
        raise ValueError("triplets need a group with two images and at least two groups")
    out = np.empty((n, 3), dtype=np.int64)
    for t in range(n):
        g = eligible[rng.integers(len(eligible))]
        a, p = rng.choice(groups[g], size=2, replace=False)
        others = np.flatnonzero(labels != g)
        out[t] = (a, p, others[rng.integers(len(others))])
    return out


def triplet_accuracy(sim: np.ndarray, triplets: np.ndarray) -> Estimate:
    """Share of triplets where sim(a, p) > sim(a, c); ties count half."""
    a, p, c = triplets.T
    sp, sc = sim[a, p], sim[a, c]
    wins = (sp > sc).sum() + 0.5 * (sp == sc).sum()
    return wilson(float(wins), len(triplets))


def ordering_accuracy(scores: np.ndarray, weights: np.ndarray) -> Estimate:
    """IP protocol: over every pair of variants of one reference, correct when the variant with the
    higher weight scores as more similar. scores, weights (V,); ties in score count half."""
    scores, weights = np.asarray(scores, float), np.asarray(weights, float)
    i, j = np.triu_indices(len(scores), k=1)
    keep = weights[i] != weights[j]
    i, j = i[keep], j[keep]
    hi = np.where(weights[i] > weights[j], i, j)
    lo = np.where(weights[i] > weights[j], j, i)
    wins = (scores[hi] > scores[lo]).sum() + 0.5 * (scores[hi] == scores[lo]).sum()
    return wilson(float(wins), len(i))
