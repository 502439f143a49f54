"""Benchmark protocols on folders: grouped (Sref-style), Sref, and IP ordering.

    grouped / Sref:  ROOT/<group>/<image>          a group is one style or one instance
    IP:              ROOT/<ip>/reference.<ext>, ROOT/<ip>/<weight>.<ext>   (weight a number, e.g. 0.8)

One mechanism for all: images -> FeatureSet (descriptors computed once) -> a similarity per metric
-> the protocol's statistics. Every metric is reported side by side.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..embedder import DescriptorConfig
from ..errors import SimsearchError
from ..images import IMAGE_EXTENSIONS, iter_image_files
from ..paths import normalize
from .features import METRIC_HELP, METRICS, FeatureSet
from .metrics import (average_precisions, average_rank, bootstrap_ci, leave_one_out, ordering_accuracy, reranked,
                      sample_triplets, top_candidates, triplet_accuracy, wilson)

# Ranking statistics of AAS and `combined` rerank each query's first this many candidates (by the mode's
# vector); triplet accuracy is always exact. 0 or None on the command line: every pair.
RERANK_CANDIDATES = 50
# combined = w z(AAS) + (1 - w) z(vector): w chosen by mean rank on the proxy suite (benchmarks/results/quality_suite.md)
COMBINED_AAS_WEIGHT = 0.5
CALIBRATION_PAIRS = 1000  # random pairs whose scores z-score the parts of `combined`
CALIBRATION_SEED = 12345  # fixed: part of the metric's definition, not of the triplet sample


@dataclass
class BenchResult:
    protocol: str
    root: str
    images: int
    groups: int
    metrics: dict[str, dict] = field(default_factory=dict)  # metric -> statistics
    config: dict = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "root": self.root, "images": self.images, "groups": self.groups,
                "metrics": self.metrics, "config": self.config,
                "failed": [{"path": p, "reason": r} for p, r in self.failed]}


def read_groups(root: str | Path) -> tuple[list[str], list[str]]:
    """-> image paths and their group names (the first-level folder)."""
    root = Path(root)
    if not root.is_dir():
        raise SimsearchError(f"{root}: not a folder (expected ROOT/<group>/<image>)")
    paths, labels = [], []
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in iter_image_files(group):
            paths.append(normalize(f))
            labels.append(group.name)
    if len(set(labels)) < 2:
        raise SimsearchError(f"{root}: needs at least two group folders with images (found {len(set(labels))})")
    return paths, labels


SUITE_MANIFEST = "suite.json"


def read_suite(root: str | Path) -> dict[str, dict]:
    """The proxy suite at `root`: {set: {"mode": "style"|"content", "root": folder, ...}} from
    ROOT/suite.json ({"sets": {name: {"mode": ..., anything else}}}), each set a grouped folder ROOT/<name>
    (benchmarks/data.py `suite` writes one)."""
    root = Path(root)
    manifest = root / SUITE_MANIFEST
    try:
        sets = json.loads(manifest.read_text())["sets"]
    except FileNotFoundError:
        raise SimsearchError(f"{manifest}: no suite manifest (build one with: python benchmarks/data.py suite)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SimsearchError(f"{manifest}: not a suite manifest ({e!r}); expected {{\"sets\": {{name: {{\"mode\": ...}}}}}}") from None
    out = {}
    for name, info in sets.items():
        mode = info.get("mode") if isinstance(info, dict) else None
        if mode not in ("style", "content"):
            raise SimsearchError(f"{manifest}: set '{name}' has mode {mode!r} (expected style or content)")
        if not (root / name).is_dir():
            raise SimsearchError(f"{manifest}: set '{name}' has no folder {root / name}")
        out[name] = {**info, "root": root / name}
    if not out:
        raise SimsearchError(f"{manifest}: lists no sets")
    return out


def _triplets(labels, n: int, seed: int, root) -> np.ndarray:
    try:
        return sample_triplets(np.asarray(labels), n, seed)
    except ValueError as e:
        raise SimsearchError(f"{root}: {e}") from None


def _features(paths, progress: Callable | None, **kw) -> FeatureSet:
    on_total, on_advance = progress if progress else (None, None)
    return FeatureSet(paths, on_total=on_total, on_advance=on_advance, **kw)


def evaluate_groups(root: str | Path, mode: str = "content", metrics: tuple[str, ...] = METRICS,
                    triplets: int = 2000, seed: int = 0, ks: tuple[int, ...] = (1, 5), protocol: str = "groups",
                    candidates: int | None = RERANK_CANDIDATES, aas_weight: float = COMBINED_AAS_WEIGHT,
                    intervals: bool = False, progress: tuple[Callable, Callable] | None = None,
                    **feature_kw) -> BenchResult:
    """Triplet accuracy (seeded sample, 95% interval), leave-one-out mAP and recall@k per metric.

    The vector metrics (cosine, style) are exact over all pairs. AAS is computed only for the pairs a
    statistic reads: exactly for the sampled triplets, and for the ranking statistics over each query's
    first `candidates` by the mode's vector (content -> cosine, style -> style), reranked by AAS (the
    rest follow in first-stage order; candidates=None or >= N-1: every pair, exact). `combined` is
    aas_weight * z(AAS) + (1 - aas_weight) * z(the mode's vector), z-scored by the mean and standard
    deviation over CALIBRATION_PAIRS seeded random pairs (labels unused, the same for every seed).
    `intervals` adds a 95% bootstrap interval over queries to each mAP (`mAP_ci95`). What each
    statistic was computed over is stated in result.config["definitions"]."""
    if mode not in ("content", "style"):
        raise SimsearchError(f"unknown mode '{mode}' (choose content or style)")
    if unknown := set(metrics) - set(METRICS):
        raise SimsearchError(f"unknown metric '{sorted(unknown)[0]}' (choose from {', '.join(METRICS)})")
    paths, labels = read_groups(root)
    _triplets(labels, 1, seed, root)  # fail before embedding anything
    fs = _features(paths, progress, **feature_kw)
    try:
        group_of = dict(zip(paths, labels))
        y = np.asarray([group_of[p] for p in fs.paths])
        result = BenchResult(protocol, str(root), len(fs.paths), len(set(y)), config=fs.config,
                             failed=fs.report.failed)
        result.metrics, config = score_groups(fs, np.arange(len(y)), y, mode, metrics, triplets, seed, ks,
                                              candidates, aas_weight, intervals, root)
        result.config.update(config)
        return result
    finally:
        fs.close()


def score_groups(fs: FeatureSet, idx: np.ndarray, labels: np.ndarray, mode: str, metrics: tuple[str, ...],
                 triplets: int, seed: int, ks: tuple[int, ...] = (1, 5), candidates: int | None = RERANK_CANDIDATES,
                 aas_weight: float = COMBINED_AAS_WEIGHT, intervals: bool = False, root: str | Path = ""
                 ) -> tuple[dict[str, dict], dict]:
    """evaluate_groups' statistics of the images `idx` of `fs` (labels aligned with idx).
    -> ({metric: statistics}, {what was computed how})."""
    trip = _triplets(labels, triplets, seed, root)  # unreadable images may have emptied a group
    first = first_stage(mode)
    n = len(idx)
    k = n - 1 if not candidates else min(candidates, n - 1)
    sims = {m: fs.matrix(m, idx) for m in metrics if m != "aas"}
    first_sim = sims[first] if first in sims else fs.matrix(first, idx)
    if "aas" in metrics:
        sims["aas"] = sparse_aas(fs, idx, [trip[:, [0, 1]], trip[:, [0, 2]], calibration_pairs(n),
                                           pairs_of(top_candidates(first_sim, k))])
    stats = group_statistics(sims, first_sim, labels, trip, mode, k, aas_weight, ks, intervals, seed)
    config = {"mode": mode, "triplets": triplets, "seed": seed, "candidates": k, "aas_weight": aas_weight,
              "definitions": definitions(list(stats), mode, k, n, aas_weight)}
    return stats, config


def first_stage(mode: str) -> str:
    """The vector metric a mode retrieves with (and whose candidates AAS reranks)."""
    return "cosine" if mode == "content" else "style"


def group_statistics(sims: dict[str, np.ndarray], first_sim: np.ndarray, labels: np.ndarray, trip: np.ndarray,
                     mode: str, k: int, aas_weight: float = COMBINED_AAS_WEIGHT, ks: tuple[int, ...] = (1, 5),
                     intervals: bool = False, seed: int = 0) -> dict[str, dict]:
    """evaluate_groups' statistics from similarity matrices: the vector metrics' full (N, N), `aas` full
    or filled at least for the triplets', the calibration pairs' and each row's first k candidates'
    pairs by `first_sim` (the mode's vector). Adds `combined` when the mode's vector is among `sims`."""
    first = first_stage(mode)
    sims, ranking = dict(sims), dict(sims)
    if "aas" in sims:
        ranking["aas"] = reranked(first_sim, sims["aas"], k)
        if first in sims:
            sims["combined"] = combine(sims[first], sims["aas"], calibration_pairs(len(labels)), aas_weight)
            ranking["combined"] = reranked(first_sim, sims["combined"], k)
    out = {}
    for m, sim in sims.items():
        out[m] = {"triplet_accuracy": triplet_accuracy(sim, trip).to_dict(), **leave_one_out(ranking[m], labels, ks)}
        if intervals:
            out[m]["mAP_ci95"] = list(bootstrap_ci(average_precisions(ranking[m], labels), seed=seed))
    return out


def calibration_pairs(n: int, count: int = CALIBRATION_PAIRS) -> np.ndarray:
    """(P, 2) distinct unordered pairs of n images, a fixed seeded sample (all pairs when fewer)."""
    i, j = np.triu_indices(n, k=1)
    if len(i) > count:
        keep = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(len(i), count, replace=False))
        i, j = i[keep], j[keep]
    return np.c_[i, j]


def pairs_of(cand: np.ndarray) -> np.ndarray:
    """(N, K) candidate columns per row -> (N*K, 2) (row, column) pairs."""
    return np.c_[np.repeat(np.arange(len(cand)), cand.shape[1]), cand.ravel()]


def sparse_aas(fs: FeatureSet, idx: np.ndarray, pair_lists: list[np.ndarray]) -> np.ndarray:
    """(n, n) AAS among the images `idx` of `fs`, filled (symmetrically) for the union of the given
    (P, 2) pair lists (positions in idx) only, NaN elsewhere; the diagonal is 1. Each unordered pair is
    scored once, in the order FeatureSet.matrix scores it."""
    n = len(idx)
    pairs = np.unique(np.sort(np.concatenate(pair_lists), axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    sim = np.full((n, n), np.nan, dtype=np.float32)
    np.fill_diagonal(sim, 1.0)
    sim[pairs[:, 0], pairs[:, 1]] = sim[pairs[:, 1], pairs[:, 0]] = fs.pair_scores("aas", idx[pairs[:, 0]], idx[pairs[:, 1]])
    return sim


def combine(vector: np.ndarray, aas: np.ndarray, calib: np.ndarray, aas_weight: float) -> np.ndarray:
    """aas_weight * z(aas) + (1 - aas_weight) * z(vector), each z-scored by its mean and standard deviation
    over the calibration pairs (NaN where AAS was not computed)."""
    def z(sim):
        c = sim[calib[:, 0], calib[:, 1]].astype(np.float64)
        sd = c.std()
        return (sim - c.mean()) / (sd if sd > 1e-12 else 1.0)
    return (aas_weight * z(aas) + (1 - aas_weight) * z(vector)).astype(np.float32)


def definitions(metrics: list[str], mode: str | None, k: int, n: int | None, aas_weight: float) -> dict[str, str]:
    """What each metric's statistics were computed over, in words (printed under the table). mode and
    n None: for a whole suite (each set in its own mode and size)."""
    first = first_stage(mode) if mode else "the set's mode vector (cosine on content sets, style on style sets)"
    ranked = ("exact over all pairs" if not k or (n is not None and k >= n - 1) else
              f"over each query's first {k} candidates by {first}, reranked (the rest follow in first-stage order)")
    pairs = f"all {n * (n - 1) // 2} pairs" if n is not None else "all pairs"
    out = {}
    for m in metrics:
        if m in ("cosine", "style"):
            out[m] = f"{METRIC_HELP[m]}; every statistic exact over {pairs}"
        elif m == "aas":
            out[m] = f"{METRIC_HELP[m]}; triplet accuracy exact on the sampled triplets; mAP and recall@k {ranked}"
        else:
            part = first_stage(mode) if mode else "the mode vector"
            out[m] = (f"{aas_weight:g} z(aas) + {1 - aas_weight:g} z({part}), z-scored over {CALIBRATION_PAIRS} fixed "
                      f"random pairs; triplet accuracy exact on the sampled triplets; mAP and recall@k {ranked}")
    return out


def evaluate_sref(root: str | Path, **kw) -> BenchResult:
    """Sref protocol: style groups (one style rendered over several subjects), style mode."""
    return evaluate_groups(root, mode="style", protocol="sref", **kw)


@dataclass
class SuiteResult:
    """Every protocol on every set of a suite: rows = (descriptor variant, metric), columns = sets."""

    root: str
    sets: dict[str, dict]  # set -> {"mode", "images", "groups", ...what the manifest says}
    rows: dict[str, dict[str, dict]] = field(default_factory=dict)  # "<variant>: <metric>" -> set -> statistics
    ranks: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> {"style"|"content"|"all": mean rank}
    config: dict = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"root": self.root, "sets": self.sets, "rows": self.rows, "ranks": self.ranks, "config": self.config,
                "failed": [{"path": p, "reason": r} for p, r in self.failed]}


def evaluate_suite(root: str | Path, variants: dict[str, dict] | None = None, metrics: tuple[str, ...] = METRICS,
                   triplets: int = 2000, seed: int = 0, candidates: int | None = RERANK_CANDIDATES,
                   aas_weight: float = COMBINED_AAS_WEIGHT, intervals: bool = True, cache: str | Path | None = None,
                   model: str | None = None, device: str = "auto", runtime: str = "auto", on_set: Callable[[str, str], None] | None = None,
                   progress: tuple[Callable, Callable] | None = None, **descriptors) -> SuiteResult:
    """evaluate_groups on every set of the suite at `root` (read_suite), in the set's mode, for each
    descriptor variant ({name: DescriptorConfig fields over the model's defaults and `descriptors`};
    default: one variant, `descriptors` alone).

    Each variant embeds every distinct image of the suite once (sets that share images through
    symlinks share descriptors; `cache`: keep them in CACHE/<variant>-<config digest>.db between runs).
    Rows are ranked per set by triplet accuracy (1 = best, ties share the mean rank) and the ranks
    averaged over the style sets, the content sets and all sets. `on_set(variant, set)` is called as
    each set is scored."""
    suite = read_suite(root)
    variants = variants or {"default": {}}
    groups = {name: read_groups(info["root"]) for name, info in suite.items()}
    for name, (_, labels) in groups.items():
        _triplets(labels, 1, seed, suite[name]["root"])  # fail before embedding anything
    every = list(dict.fromkeys(os.path.realpath(p) for paths, _ in groups.values() for p in paths))
    result = SuiteResult(str(root), {n: {k: v for k, v in info.items() if k != "root"} for n, info in suite.items()})
    result.config = {"triplets": triplets, "seed": seed, "candidates": candidates, "aas_weight": aas_weight,
                     "variants": {}, "definitions": {"suite": definitions(_with_combined(metrics), None, candidates or 0,
                                                                          None, aas_weight)}}
    for variant, overrides in variants.items():
        db = None
        if cache:
            conf = DescriptorConfig.for_model(**({"model": model} if model else {}),
                                              **{k: v for k, v in {**descriptors, **overrides}.items() if v is not None})
            db = Path(cache) / f"{variant}-{hashlib.blake2b(conf.describe().encode(), digest_size=6).hexdigest()}.db"
        fs = _features(every, progress, cache=db, model=model, device=device, runtime=runtime, **{**descriptors, **overrides})
        try:
            result.config["variants"][variant] = fs.config
            result.failed += [f for f in fs.report.failed if f not in result.failed]
            for name, (paths, labels) in groups.items():
                if on_set:
                    on_set(variant, name)
                kept = [(fs.pos[r], g) for p, g in zip(paths, labels) if (r := os.path.realpath(p)) in fs.pos]
                idx, y = np.asarray([i for i, _ in kept]), np.asarray([g for _, g in kept])
                stats, config = score_groups(fs, idx, y, suite[name]["mode"], metrics, triplets, seed,
                                             candidates=candidates, aas_weight=aas_weight, intervals=intervals,
                                             root=suite[name]["root"])
                result.config["definitions"][name] = config["definitions"]
                for m, st in stats.items():
                    result.rows.setdefault(f"{variant}: {m}", {})[name] = st
        finally:
            fs.close()
    result.ranks = mean_ranks(result.rows, {n: info["mode"] for n, info in suite.items()})
    return result


def _with_combined(metrics: tuple[str, ...]) -> list[str]:
    return [*metrics, "combined"] if "aas" in metrics else list(metrics)


def mean_ranks(rows: dict[str, dict[str, dict]], modes: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per set, rank the rows by triplet accuracy (1 = best; ties share their mean rank); -> each row's
    mean rank over the style sets, the content sets and all sets (rows scored on every set only)."""
    names = [r for r in rows if all(s in rows[r] for s in modes)]
    per_set = {}
    for s in modes:
        per_set[s] = average_rank([rows[r][s]["triplet_accuracy"]["value"] for r in names])
    out = {}
    for i, r in enumerate(names):
        out[r] = {}
        for group in ("style", "content", "all"):
            sets = [s for s, m in modes.items() if group in ("all", m)]
            if sets:
                out[r][group] = float(np.mean([per_set[s][i] for s in sets]))
    return out


def _weight(path: Path) -> float | None:
    try:
        return float(path.stem)
    except ValueError:
        return None


def read_ip(root: str | Path) -> list[tuple[str, str, list[tuple[float, str]]]]:
    """-> [(ip name, reference path, [(weight, variant path), ...]), ...]"""
    root = Path(root)
    if not root.is_dir():
        raise SimsearchError(f"{root}: not a folder (expected ROOT/<ip>/reference.<ext> and <weight>.<ext>)")
    sets = []
    for ip in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [f for f in sorted(ip.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        refs = [f for f in files if f.stem == "reference"]
        variants = [(w, normalize(f)) for f in files if (w := _weight(f)) is not None]
        if len(refs) != 1:
            raise SimsearchError(f"{ip}: expected exactly one reference.<ext> (found {len(refs)})")
        if len({w for w, _ in variants}) < 2:
            raise SimsearchError(f"{ip}: needs at least two variants with different numeric weights, e.g. 0.2.png, 0.8.png")
        sets.append((ip.name, normalize(refs[0]), sorted(variants)))
    if not sets:
        raise SimsearchError(f"{root}: no IP folders found")
    return sets


def evaluate_ip(root: str | Path, metrics: tuple[str, ...] = METRICS,
                progress: tuple[Callable, Callable] | None = None, **feature_kw) -> BenchResult:
    """IP protocol: for every pair of variants of one IP, correct when the variant with the higher
    weight scores as more similar to the reference. Pooled over IPs, with a 95% interval."""
    sets = read_ip(root)
    paths = [p for _, ref, variants in sets for p in (ref, *[v for _, v in variants])]
    fs = _features(paths, progress, **feature_kw)
    try:
        result = BenchResult("ip", str(root), len(fs.paths), len(sets), config=fs.config, failed=fs.report.failed)
        per_metric = {m: [0.0, 0] for m in metrics}
        per_ip: dict[str, dict[str, float]] = {}
        for name, ref, variants in sets:
            kept = [(w, v) for w, v in variants if v in fs.pos]
            if ref not in fs.pos or len(kept) < 2:
                continue
            i = np.full(len(kept), fs.pos[ref])
            j = np.asarray([fs.pos[v] for _, v in kept])
            weights = np.asarray([w for w, _ in kept])
            for m in metrics:
                est = ordering_accuracy(fs.pair_scores(m, i, j), weights)
                per_metric[m][0] += est.value * est.n
                per_metric[m][1] += est.n
                per_ip.setdefault(name, {})[m] = est.value
        for m, (wins, n) in per_metric.items():
            result.metrics[m] = {"ordering_accuracy": wilson(wins, n).to_dict()}
        result.config["per_ip"] = per_ip
        return result
    finally:
        fs.close()
