"""Plain functions for the one-shot operations (match two images, build a matcher), callable from
Python exactly as the CLI calls them."""

from __future__ import annotations

from pathlib import Path

from .backbones import DEFAULT_MODEL, load_backbone
from .errors import ImageError, SimsearchError
from .images import open_image
from .rerank.correspondence import DenseMatcher, Matches

MATCH_METHODS = ("nn", "best-buddies")


def dense_matcher(model: str | None = None, device: str = "auto", **conf) -> DenseMatcher:
    """A DenseMatcher on `model` (default: the embedded DINOv2-S/14). Unset options take the backbone's
    defaults (for a ViT the stride is half the patch size: overlapping patches)."""
    return DenseMatcher(load_backbone(model or DEFAULT_MODEL, device), **conf)


def match_images(image_a: str | Path, image_b: str | Path, points=None, n: int = 10, method: str = "best-buddies",
                 model: str | None = None, device: str = "auto", out: str | Path | None = None,
                 matcher: DenseMatcher | None = None, **conf) -> Matches:
    """Correspondences from A to B: `points` [(x, y), ...] in A's pixels transferred to B, or (no points)
    the n best-buddy pairs (method "best-buddies") or the n most confident salient NN matches ("nn")."""
    import numpy as np
    import torch

    if method not in MATCH_METHODS:
        raise SimsearchError(f"unknown match method '{method}' (choose from {', '.join(MATCH_METHODS)})")
    img_a, img_b = (open_image(Path(p)).image for p in (image_a, image_b))
    if points is not None:
        w, h = img_a.size
        bad = [p for p in points if not (0 <= p[0] < w and 0 <= p[1] < h)]
        if bad:
            raise ImageError(image_a, f"point {bad[0]} lies outside the {w}x{h} image")
    matcher = matcher or dense_matcher(model, device, **conf)
    a, b = matcher.describe(img_a), matcher.describe(img_b)
    if points is not None:
        result = matcher.match_points(a, b, np.asarray(points, dtype=np.float32))
    elif method == "best-buddies":
        result = matcher.best_buddies(a, b, n)
    else:
        salient = torch.nonzero(a.saliency > matcher.conf["saliency_threshold"]).squeeze(1)
        probe = matcher.match_points(a, b, a.cell_to_xy(torch.stack([salient // a.grid[1], salient % a.grid[1]], 1)))
        top = np.argsort(-probe.confidence, kind="stable")[:n]
        result = Matches(probe.points_a[top], probe.points_b[top], probe.confidence[top])
    if out is not None:
        from .viz import draw_matches

        draw_matches(img_a, img_b, result.points_a, result.points_b, result.confidence).save(out)
    return result
