"""Benchmark protocols on folders: grouped (Sref-style), Sref, and IP ordering.

    grouped / Sref:  ROOT/<group>/<image>          a group is one style or one instance
    IP:              ROOT/<ip>/reference.<ext>, ROOT/<ip>/<weight>.<ext>   (weight a number, e.g. 0.8)

One mechanism for all: images -> FeatureSet (descriptors computed once) -> a similarity per metric
-> the protocol's statistics. Every metric is reported side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SimsearchError
from ..images import IMAGE_EXTENSIONS, iter_image_files
from ..paths import normalize
from .features import METRICS, FeatureSet, zscore_combine
from .metrics import leave_one_out, ordering_accuracy, sample_triplets, triplet_accuracy, wilson


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
                    progress: tuple[Callable, Callable] | None = None, **feature_kw) -> BenchResult:
    """Triplet accuracy (seeded sample, 95% interval), leave-one-out mAP and recall@k per metric.
    `combined` z-scores and averages AAS with the vector of `mode` (content -> cosine, style -> style)."""
    if mode not in ("content", "style"):
        raise SimsearchError(f"unknown mode '{mode}' (choose content or style)")
    paths, labels = read_groups(root)
    _triplets(labels, 1, seed, root)  # fail before embedding anything
    fs = _features(paths, progress, **feature_kw)
    try:
        group_of = dict(zip(paths, labels))
        y = np.asarray([group_of[p] for p in fs.paths])
        trip = _triplets(y, triplets, seed, root)  # unreadable images may have emptied a group
        sims = {m: fs.matrix(m) for m in metrics}
        primary = "cosine" if mode == "content" else "style"
        if "aas" in sims and primary in sims:
            sims["combined"] = zscore_combine([sims[primary], sims["aas"]])
        result = BenchResult(protocol, str(root), len(fs.paths), len(set(y)), config=fs.config,
                             failed=fs.report.failed)
        result.config.update({"mode": mode, "triplets": triplets, "seed": seed})
        for m, sim in sims.items():
            result.metrics[m] = {"triplet_accuracy": triplet_accuracy(sim, trip).to_dict(),
                                 **leave_one_out(sim, y, ks)}
        return result
    finally:
        fs.close()


def evaluate_sref(root: str | Path, **kw) -> BenchResult:
    """Sref protocol: style groups (one style rendered over several subjects), style mode."""
    return evaluate_groups(root, mode="style", protocol="sref", **kw)


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
