"""Keypoint transfer on the SPair-71k layout: PCK@alpha per point, averaged per category, then over
categories.

    ROOT/JPEGImages/<category>/<image>.jpg
    ROOT/PairAnnotation/<split>/*.json   {src_imname, trg_imname, category, src_kps, trg_kps,
                                          src_bndbox, trg_bndbox}   kps: [[x, y], ...], bbox: [x1, y1, x2, y2]
A point is correct when its transferred position lies within alpha * max(target bbox w, h).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import SimsearchError
from ..images import open_image


@dataclass
class PairAnnotation:
    category: str
    src: Path
    trg: Path
    src_kps: np.ndarray  # (P, 2) x, y
    trg_kps: np.ndarray  # (P, 2)
    trg_bbox: np.ndarray  # (4,) x1, y1, x2, y2


def read_pairs(root: str | Path, split: str = "test", categories: Iterable[str] | None = None) -> list[PairAnnotation]:
    root = Path(root)
    ann_dir = root / "PairAnnotation" / split
    if not ann_dir.is_dir():
        raise SimsearchError(f"{ann_dir}: no such folder (expected the SPair-71k layout, split '{split}')")
    wanted = set(categories) if categories else None
    pairs = []
    for f in sorted(ann_dir.glob("*.json")):
        try:
            a = json.loads(f.read_text())
            cat = a["category"]
            if wanted and cat not in wanted:
                continue
            src_kps, trg_kps = np.asarray(a["src_kps"], float), np.asarray(a["trg_kps"], float)
            if src_kps.shape != trg_kps.shape or src_kps.ndim != 2 or src_kps.shape[1] != 2:
                raise ValueError("src_kps and trg_kps must both be [[x, y], ...] of one length")
            pairs.append(PairAnnotation(cat, root / "JPEGImages" / cat / a["src_imname"],
                                        root / "JPEGImages" / cat / a["trg_imname"], src_kps, trg_kps,
                                        np.asarray(a["trg_bndbox"], float)))
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            raise SimsearchError(f"{f}: bad pair annotation ({e})") from None
    if not pairs:
        raise SimsearchError(f"{ann_dir}: no pair annotations" + (f" for categories {sorted(wanted)}" if wanted else ""))
    return pairs


def pck(pred: np.ndarray, gt: np.ndarray, bbox: np.ndarray, alpha: float) -> np.ndarray:
    """(P, 2), (P, 2), (4,) -> (P,) bool: within alpha * max bbox side."""
    threshold = alpha * max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    return np.linalg.norm(pred - gt, axis=1) <= threshold


@dataclass
class PCKResult:
    alphas: list[float]
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)  # cat -> {"pck@a": v, "points": n}
    mean: dict[str, float] = field(default_factory=dict)  # "pck@a" -> mean over categories
    pairs: int = 0
    points: int = 0
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"alphas": self.alphas, "mean": self.mean, "per_category": self.per_category,
                "pairs": self.pairs, "points": self.points, "config": self.config}


def evaluate_pck(matcher, pairs: list[PairAnnotation], alphas=(0.1,),
                 on_advance: Callable[[int], None] | None = None) -> PCKResult:
    """Transfer every source keypoint with `matcher` (any correspondence.Matcher) and score it."""
    cache: dict[Path, object] = {}

    def describe(path: Path):
        if path not in cache:
            if len(cache) > 64:
                cache.clear()  # pairs share images; bound the memory
            cache[path] = matcher.describe(open_image(path).image)
        return cache[path]

    correct: dict[str, dict[float, list[np.ndarray]]] = {}
    n_points = 0
    for pair in pairs:
        src, trg = describe(pair.src), describe(pair.trg)
        pred = matcher.match_points(src, trg, pair.src_kps).points_b
        per_alpha = correct.setdefault(pair.category, {a: [] for a in alphas})
        for a in alphas:
            per_alpha[a].append(pck(pred, pair.trg_kps, pair.trg_bbox, a))
        n_points += len(pred)
        if on_advance:
            on_advance(1)
    result = PCKResult(alphas=list(alphas), pairs=len(pairs), points=n_points, config=dict(matcher.conf))
    for cat, per_alpha in sorted(correct.items()):
        result.per_category[cat] = {f"pck@{a}": float(np.concatenate(v).mean()) for a, v in per_alpha.items()}
        result.per_category[cat]["points"] = int(sum(len(x) for x in per_alpha[alphas[0]]))
    for a in alphas:
        result.mean[f"pck@{a}"] = float(np.mean([c[f"pck@{a}"] for c in result.per_category.values()]))
    return result
