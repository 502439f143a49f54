"""Plain functions for the one-shot operations (match two images, build a matcher), callable from
Python exactly as the CLI calls them."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .backbones import DEFAULT_MODEL, load_backbone
from .errors import NAME_ONLY, ImageError, SimsearchError
from .images import open_image
from .rerank.correspondence import DenseMatcher, Matcher, Matches

MATCH_METHODS = ("nn", "best-buddies", "ldm")
FEATURES = ("dino", "sd", "sd+dino")


def dense_matcher(model: str | None = None, device: str = "auto", **conf) -> DenseMatcher:
    """A DenseMatcher on `model` (default: the embedded DINOv2-S/14). Unset options take the backbone's
    defaults (for a ViT the stride is half the patch size: overlapping patches)."""
    return DenseMatcher(load_backbone(model or DEFAULT_MODEL, device), **conf)


def _sd_backbone(model: str | None, device: str, **why):
    """The Stable Diffusion backbone `model`; `why`, one {parameter: value}, is what needs it."""
    (needs,) = why
    if model is None:
        raise SimsearchError("{%s} needs {model}: a Stable Diffusion model (registry name such as sd15, folder or file)"
                             % needs, model=NAME_ONLY, **why)
    sd = load_backbone(model, device)
    if sd.family != "sd":
        raise SimsearchError("{model} is not a Stable Diffusion model ({%s})" % needs, model=model, **why)
    return sd


def make_matcher(features: str = "dino", model: str | None = None, dino: str | None = None, device: str = "auto",
                 layer=None, facet: str | None = None, stride: int | None = None, log_bin: bool | None = None,
                 image_size: int | None = None, dino_size: int | None = None) -> Matcher:
    """The matcher for `features`: "dino" (a ViT's facets: `model`, default the embedded DINOv2), "sd"
    (Stable Diffusion decoder features of `model`, input `image_size`) or "sd+dino" (those fused with
    the ViT `dino`, input `dino_size`). Unset settings (None) take the defaults."""
    return make_matchers([features], model, dino, device, layer=layer, facet=facet, stride=stride, log_bin=log_bin,
                         image_size=image_size, dino_size=dino_size)[features]


def make_matchers(features: list[str], model: str | None = None, dino: str | None = None, device: str = "auto",
                  layer=None, facet: str | None = None, stride: int | None = None, log_bin: bool | None = None,
                  image_size: int | None = None, dino_size: int | None = None) -> dict[str, Matcher]:
    """{features: matcher} for several feature sets compared on the same data, each backbone loaded once
    (see make_matcher). With "dino" among SD features, the ViT is `dino` (default: the embedded model)."""
    from .rerank.fusion import FusedMatcher

    bad = [f for f in features if f not in FEATURES]
    if bad:
        raise SimsearchError(f"unknown features '{bad[0]}' (choose from {', '.join(FEATURES)})")
    uses_sd = any(f != "dino" for f in features)
    vit_only = {k: v for k, v in (("layer", layer), ("facet", facet), ("stride", stride), ("log_bin", log_bin)) if v is not None}
    if uses_sd and vit_only:
        raise SimsearchError(", ".join(f"{{{k}}}" for k in vit_only) + " apply to {features} only (SD features are "
                             "fixed: Zhang et al.'s layers)", **vit_only, features="dino")
    sd = _sd_backbone(model, device, features=",".join(features)) if uses_sd else None
    vit_name = (dino or DEFAULT_MODEL) if uses_sd else (model or DEFAULT_MODEL)
    vit = load_backbone(vit_name, device) if "dino" in features or "sd+dino" in features else None
    matchers: dict[str, Matcher] = {}
    for f in features:
        if f == "dino":
            # beside SD features, DINO alone runs at the size it has in the fusion: same pairs, same ViT input
            matchers[f] = DenseMatcher(vit, layer=layer, facet=facet, stride=stride, log_bin=log_bin,
                                       image_size=(dino_size or FusedMatcher.default_conf["dino_size"]) if uses_sd else image_size)
        else:
            matchers[f] = FusedMatcher(sd, vit if f == "sd+dino" else None, sd_size=image_size, dino_size=dino_size)
    return matchers


def match_images(image_a: str | Path, image_b: str | Path, points=None, n: int = 10, method: str = "best-buddies",
                 model: str | None = None, device: str = "auto", out: str | Path | None = None,
                 matcher: Matcher | None = None, features: str = "dino", dino: str | None = None,
                 on_point: Callable[[int], None] | None = None, ldm: dict | None = None, **conf) -> Matches:
    """Correspondences from A to B: `points` [(x, y), ...] in A's pixels transferred to B, or (no points)
    the n best-buddy pairs (method "best-buddies") or the n most confident salient NN matches ("nn").
    Method "ldm" transfers `points` with Hedlin et al.'s prompt optimisation on the SD `model`
    (`ldm`: its settings, e.g. steps, repeats, seed; slow: `on_point` reports progress)."""
    import numpy as np

    if method not in MATCH_METHODS:
        raise SimsearchError(f"unknown match method '{method}' (choose from {', '.join(MATCH_METHODS)})")
    img_a, img_b = (open_image(Path(p)).image for p in (image_a, image_b))
    if points is not None:
        w, h = img_a.size
        bad = [p for p in points if not (0 <= p[0] < w and 0 <= p[1] < h)]
        if bad:
            raise ImageError(image_a, f"point {bad[0]} lies outside the {w}x{h} image")
    if method == "ldm":
        from .rerank.ldm import LDMCorrespondence

        if points is None:
            raise SimsearchError("{method} transfers given {points}, and none were given", method="ldm", points=NAME_ONLY)
        result = LDMCorrespondence(_sd_backbone(model, device, method="ldm"), **(ldm or {})).transfer(
            img_a, img_b, points, on_point=on_point)
    else:
        matcher = matcher or make_matcher(features, model, dino, device, **conf)
        a, b = matcher.describe(img_a), matcher.describe(img_b)
        if points is not None:
            result = matcher.match_points(a, b, np.asarray(points, dtype=np.float32))
        elif method == "best-buddies":
            result = matcher.best_buddies(a, b, n)
        else:
            result = matcher.nearest(a, b, n)
    if out is not None:
        from .viz import draw_matches

        draw_matches(img_a, img_b, result.points_a, result.points_b, result.confidence).save(out)
    return result
