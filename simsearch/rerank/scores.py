"""Second-stage scores and their fusion with the first stage (see simsearch.rerank)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from . import DEFAULT_RERANKER, RERANKERS
from ..descriptors.facets import cls_attention, merge_heads
from ..descriptors.saliency import cls_saliency
from ..images import flat_cells
from .aas import aligned_attention_score
from .correspondence import mutual_nn_share
from .photometric import photometric_agreement, region_agreement
from .verify import GeometricVerifier, PatchSet

# final = first-stage cosine + sum of weight * max(0, score - floor) over the method's scores.
# Fitted by grid search for the mean R@1 over edit types on the tuning part of the copy-detection
# proxy (40 of its 120 tuning originals x 7 edits; benchmarks/copydetect.py, README "Measured"):
# each inlier beyond RANSAC's minimum of 3 is worth 0.01 of cosine (the share of salient mass
# verified ranked worse: 0.757 against 0.789); AAS and mutual matches at a quarter of their value.
FUSION = {
    # Then the thumbnails' agreement under each inlier transform (rerank.photometric), computed for the
    # AGREEMENT_TOP candidates that rank highest without it (30 gradient steps each: ~5 ms a candidate
    # here). Fitted on all 840 tuning queries (120 originals x 7 edits): mean R@1 over edit types, first
    # stage 61.2, verified 71.1, with the agreement 73.3 (crop to a quarter 75.8 -> 83.3, rotation + JPEG
    # 77.5 -> 82.5); over all 50 candidates 73.6.
    "verified": {"inliers": (0.01, 3.0), "agreement": (0.1, 0.3)},
    "aas": {"aas": (0.25, 0.0)},
    "matches": {"matches": (0.25, 0.0)},
    "both": {"aas": (0.25, 0.0), "matches": (0.25, 0.0)},
    # A region query's verification (RerankQuery.region): the aligned cells' mean cosine, fitted the same
    # way on the proxy's 177 tuning regions (1/4, 1/9, 1/16 of an original); mean R@1 over the three
    # areas 50.3 (MaxSim alone) -> 60.5 at weight 4, 64.4 at 16, 63.8 for the alignment alone. Then
    # the thumbnails' agreement (rerank.photometric.region_agreement), on the same 177 regions: R@1 at
    # 1/4, 1/9, 1/16 89.8 / 67.8 / 35.6 -> 98.3 / 88.1 / 66.1 at weight 16 (32 gave the same; 8: 96.6 /
    # 88.1 / 54.2). The agreement then decides among candidates, the alignment between equal agreements.
    "region": {"aligned": (16.0, 0.0), "agreement": (16.0, 0.0)},
}
AGREEMENT_TOP = 10  # a copy query's candidates whose thumbnails are compared (the fit's figure, top 20: 73.5)


@dataclass
class RerankQuery:
    """What the second stage knows of a query: its dense tensor at the index's input size, the
    same at other input sizes (verification's scale views) and the size of the image it shows."""

    dense: np.ndarray  # (T, C) source of dense_layer, as an index stores it
    size: tuple[int, int]  # (width, height) pixels
    views: list[np.ndarray] = field(default_factory=list)  # (T', C) each, from other input sizes
    region: bool = False  # a region of a picture, looked for inside candidates (verified by alignment)
    grey: np.ndarray | None = None  # (H, W) its thumbnail in grey (images.grey_thumbnail): flat cells cast no vote


def patch_keys(backbone, keys: torch.Tensor) -> torch.Tensor:
    """Unit-normalised patch keys (B, N, C) of attention keys (B, H, T, d), prefix tokens dropped."""
    return F.normalize(merge_heads(keys)[:, backbone.prefix_tokens:].float(), dim=-1)


def positional_prior(backbone, layer, sample: np.ndarray) -> torch.Tensor:
    """The mean unit patch key at each grid cell (N, C) over a sample of stored sources (S, T, C).

    A ViT's mid-level keys carry their position: unrelated images' patches at the same cell are each
    other's mutual nearest neighbours, and the identity transform verifies. Subtracting this mean
    leaves what the patch shows."""
    return patch_keys(backbone, backbone.attention_keys(layer, torch.as_tensor(sample))[0]).mean(0)


def without_flat(patches: PatchSet, greys) -> PatchSet:
    """`patches` with no vote from cells whose pixels are flat (images.flat_cells) in each image's grey
    thumbnail of `greys` (B,; None: no thumbnail, every cell kept). A blank canvas, sky or page has
    keys like any other blank area's, so two rotated copies' black corners would verify each other.
    The flat cells still count in the mass a score is a share of: taking them out of it too raised
    every picture with large blank areas (diagrams on white) and cost dedup precision (0.41 -> 0.39)."""
    flat = [np.zeros(patches.weight.shape[1], bool) if g is None else flat_cells(g, patches.grid) for g in greys]
    return replace(patches, weight=patches.weight * torch.as_tensor(~np.stack(flat)), mass=patches.total())


def patch_set(backbone, layer, source: torch.Tensor, sizes, prior: torch.Tensor | None = None) -> PatchSet:
    """Patch keys less the positional prior (when given), and CLS-attention saliency (uniform for
    families without a CLS token), of stored sources (B, T, C) of `layer` of images of `sizes` (B, 2)."""
    k, q_prefix = backbone.attention_keys(layer, torch.as_tensor(source))  # (B, H, T, d), (B, H, P, d)
    keys = patch_keys(backbone, k)  # (B, N, C)
    if prior is not None:
        keys = keys - prior
    if backbone.prefix_tokens:
        attn = cls_attention(q_prefix[:, :, 0].float(), merge_heads(k).float())  # (B, H, T): the CLS row only
        weight = cls_saliency(attn[:, :, None, [0, *range(backbone.prefix_tokens, k.shape[2])]])
    else:
        weight = torch.ones(keys.shape[:2])
    return PatchSet.on_grid(keys, weight, backbone.patch_grid(k.shape[2]), sizes)


@torch.inference_mode()
def rerank_scores(backbone, layer, query, cand_dense: np.ndarray, method: str = DEFAULT_RERANKER,
                  cand_sizes=None, verifier: GeometricVerifier | None = None, prior: torch.Tensor | None = None,
                  cand_greys: list | None = None) -> dict:
    """query: a RerankQuery, or a bare (T, C) dense tensor (no views, square image); cand_dense
    (M, T, C): attention sources of `layer` as the index stores them; cand_sizes (M, 2) pixels;
    prior: `positional_prior` of the table (verification without it matches positions, not content);
    cand_greys: the candidates' grey thumbnails (images.grey_thumbnail; None each: none), which a
    region query with its own `grey` is also compared with (rerank.photometric.region_agreement).

    -> {"aas" | "matches" | "verified" (or "aligned" and "agreement" for a region query) | "inliers":
    (M,), "pairs": per candidate (P, 4) query and candidate pixels, "transform": (M, 3) complex, the
    inliers' similarity (verified only, not a region)}: what `method` needs, before fusion (see `fuse`;
    a copy's agreement: `top_agreement`, once every chunk of candidates is scored)."""
    if method not in RERANKERS:
        raise ValueError(f"unknown reranker '{method}' (choose from {', '.join(RERANKERS)})")
    if not isinstance(query, RerankQuery):
        query = RerankQuery(np.asarray(query), (1, 1))
    cand_dense = torch.as_tensor(cand_dense).float()  # (M, T, C): float16 as stored converts faster here
    m = len(cand_dense)
    out: dict = {}
    if method == "verified":
        sizes = np.ones((m, 2)) if cand_sizes is None else np.asarray(cand_sizes, dtype=np.float32)
        views = [patch_set(backbone, layer, query.dense[None], [query.size], prior)]
        views += [patch_set(backbone, layer, v[None], [query.size], _regrid(prior, v.shape[0] - backbone.prefix_tokens))
                  for v in query.views]
        if query.grey is not None:
            views = [without_flat(v, [query.grey]) for v in views]
        verifier, cands = verifier or GeometricVerifier(), patch_set(backbone, layer, cand_dense, sizes, prior)
        if query.region:
            ver = verifier.align(views, cands)
            out.update(aligned=ver.score.numpy(), inliers=ver.inliers.numpy(), pairs=ver.pairs)
            # 0 without thumbnails (the query's or a candidate's): the alignment alone ranks them
            out["agreement"] = (np.zeros(m, np.float32) if query.grey is None else
                                region_agreement(query.grey, cand_greys or [None] * m, ver.transform).numpy())
        else:
            ver = verifier(views, cands)
            out.update(verified=ver.score.numpy(), inliers=ver.inliers.numpy(), pairs=ver.pairs, transform=ver.transform.numpy())
        return out
    qkv_a = backbone.attention_inputs(layer, torch.as_tensor(query.dense)[None])
    qkv_b = backbone.attention_inputs(layer, cand_dense)
    if method in ("aas", "both"):
        out["aas"] = aligned_attention_score(qkv_a, qkv_b).float().cpu().numpy()
    if method in ("matches", "both"):
        p = backbone.prefix_tokens
        keys_a = merge_heads(qkv_a[1])[0, p:]  # (N, C) patch keys, CLS and registers dropped
        keys_b = merge_heads(qkv_b[1])[:, p:]  # (M, N, C)
        out["matches"] = mutual_nn_share(keys_a.float(), keys_b.float()).cpu().numpy()
    return out


def fuse(first_stage: np.ndarray, scores: dict, method: str, rule: dict | None = None) -> np.ndarray:
    """The final sort key: first-stage score plus each second-stage score above its floor, weighted
    (FUSION[method], FUSION["region"] for a region's alignment, unless `rule` is given: {score name:
    (weight, floor)}). The thumbnails' agreement, which needs thumbnails, adds nothing where absent."""
    rule = rule or FUSION["region" if "aligned" in scores else method]
    final = np.asarray(first_stage, dtype=np.float64).copy()
    for name, (weight, floor) in rule.items():
        if name in scores or name != "agreement":  # any other missing score is a KeyError
            final += weight * np.maximum(0.0, np.asarray(scores[name], dtype=np.float64) - floor)
    return final


def agreement_candidates(first_stage: np.ndarray, scores: dict, top: int = AGREEMENT_TOP) -> list[int]:
    """The candidates of a copy query whose thumbnails are compared: the `top` by the verified fusion
    without the agreement, those with inliers (a transform to compare under)."""
    without = {name: rule for name, rule in FUSION["verified"].items() if name != "agreement"}
    best = np.argsort(-fuse(first_stage, scores, "verified", without), kind="stable")[:top]
    return [int(i) for i in best if scores["inliers"][i] > 0]


def top_agreement(m: int, chosen: list[int], transform: np.ndarray, query_grey: np.ndarray, greys: list) -> np.ndarray:
    """A copy query's thumbnail agreement (rerank.photometric.photometric_agreement) with the `chosen`
    of its m candidates (agreement_candidates; `greys` their thumbnails, None: none), each under its
    inlier transform (M, 3) complex (rerank_scores' "transform") -> (m,); 0 for the rest."""
    out = np.zeros(m, np.float32)
    live = [(i, g) for i, g in zip(chosen, greys) if g is not None]
    if live:
        at = [i for i, _ in live]
        out[at] = photometric_agreement(query_grey, [g for _, g in live], torch.as_tensor(transform[at])).numpy()
    return out


def _regrid(prior: torch.Tensor | None, cells: int) -> torch.Tensor | None:
    """A square grid's prior (N, C) resampled to `cells` cells (a view at another input size)."""
    if prior is None or prior.shape[0] == cells:
        return prior
    side, to = round(prior.shape[0] ** 0.5), round(cells ** 0.5)
    grid = prior.T.reshape(1, -1, side, side)
    return F.adaptive_avg_pool2d(grid, to).flatten(2)[0].T if to < side else \
        F.interpolate(grid, size=(to, to), mode="bilinear", align_corners=False).flatten(2)[0].T
