"""Co-segmentation and part co-segmentation of an image set (Amir et al., "Deep ViT Features as Dense
Visual Descriptors", §5.1-5.2), step for step as their code (dino-vit-features) does it:

1. per image, the key facet of the last block at an overlapping stride, and the CLS-attention saliency
   of the last block (min-max normalised);
2. optionally the global outlier filter: an image whose CLS token has cosine < 0.7 to the set's mean
   CLS is left out (its mask is empty; their CLS is the key facet, see `cls_descriptor`);
3. k-means (FAISS) over the L2-normalised descriptors of all images for k = 1, 2, ... until the mean
   squared distance to the centroids falls by less than 2.5% (the elbow rule; that last k is kept);
4. a cluster is foreground when its mean saliency in an image exceeds 0.065 in at least 75% of the
   images (the majority vote);
5. parts (`parts=N`): a second k-means, k = N, over the foreground descriptors; every cell takes the
   nearest of the N part centroids and the background centroids of step 3.

Their refinements need OpenCV (GrabCut on the mask) and pydensecrf (a dense CRF on the parts). Here,
instead, each cell's distances to the classes are upsampled bilinearly to the image and every pixel
takes the nearest class: smooth boundaries at grid resolution, no extra dependency.

Pure numpy/FAISS functions first (testable on small arrays), then feature extraction through the
backbone interface, then the files: mask and overlay pictures and a self-contained HTML page.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import SimsearchError

FAR = 5.0  # squared distance beyond any unit vector to any centroid (<= 4): an absent class never wins
MIN_PER_CENTROID = 40  # k-means training points per centroid, at least (FAISS asks for 39)
COSEG_FACETS = ("key", "query", "value")
OUTLIER_THRESHOLD = 0.7  # theirs, for sets that may hold images without the common object


@dataclass(frozen=True)
class CosegConfig:
    """Their defaults, except the geometry, which is chosen for a patch-14 model: stride 7 (half the
    patch, as their 4 for ViT-S/8) at 392 px gives their 55 x 55 grid (stride 4 on 224 px)."""

    image_size: int = 392
    layer: int | None = None  # ViT block; None: the last (their layer 11 of 12)
    facet: str = "key"
    stride: int | None = None  # None: half the patch size
    saliency_threshold: float = 0.065
    elbow: float = 0.975
    max_clusters: int = 14
    votes: float = 0.75  # share of images in which a cluster must be salient
    sample_interval: int = 100  # k-means trains on every i-th descriptor (i lowered for small sets)
    outlier_threshold: float | None = None  # cosine to the mean CLS below which an image is dropped
    parts: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.facet not in COSEG_FACETS:
            raise SimsearchError(f"co-segmentation facet '{self.facet}': choose from {', '.join(COSEG_FACETS)}")
        if not 0 < self.votes <= 1:
            raise SimsearchError(f"votes {self.votes}: the share of images must be in (0, 1]")
        if self.parts is not None and not 1 <= self.parts <= 255:
            raise SimsearchError(f"parts {self.parts}: must be 1 to 255 (one label PNG value each)")
        if self.max_clusters < 1 or self.sample_interval < 1:
            raise SimsearchError("max_clusters and sample_interval must be at least 1")


@dataclass
class ImageFeatures:
    desc: np.ndarray  # (N, D) float32, L2-normalised, row-major over `grid`
    saliency: np.ndarray  # (N,) in [0, 1]
    grid: tuple[int, int]
    cls: np.ndarray | None = None  # (D,) the CLS token, for the outlier filter


@dataclass
class CosegResult:
    masks: list[np.ndarray]  # (H, W) bool per image, at the image's size
    parts: list[np.ndarray] | None  # (H, W) int16: part index, -1 for background; None without `parts`
    inliers: np.ndarray  # (n,) bool: False for images the outlier filter dropped
    clusters: int  # k chosen by the elbow rule
    foreground: np.ndarray  # the salient cluster ids
    n_parts: int = 0  # part centroids found (`parts`, fewer when there are fewer foreground cells)
    saliency: list[np.ndarray] = field(default_factory=list)  # (h, w) grids, for the saliency-only baseline


# -- pure functions ----------------------------------------------------------------------------
def elbow_reached(objectives: Sequence[float], elbow: float) -> bool:
    """Their stopping rule for k = 1, 2, ...: the newest k lowered the objective by less than (1 - elbow)."""
    return len(objectives) > 1 and objectives[-1] > elbow * objectives[-2]


def training_sample(per_image: Sequence[np.ndarray], interval: int, min_points: int) -> np.ndarray:
    """Every `interval`-th row of each image (theirs: 100), the step lowered so that at least
    `min_points` rows are drawn when there are that many."""
    total = sum(len(x) for x in per_image)
    step = max(1, min(interval, total // max(min_points, 1)))
    return np.ascontiguousarray(np.concatenate([x[::step] for x in per_image]))


def kmeans(x: np.ndarray, k: int, seed: int = 0):
    """FAISS k-means with their settings (300 iterations, best of 10 restarts)."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=300, nredo=10, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km


def elbow_kmeans(per_image: Sequence[np.ndarray], elbow: float = 0.975, max_k: int = 14, interval: int = 100,
                 seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """k-means over the rows of all images, k by the elbow rule. -> centroids (k, D), labels per image."""
    sample = training_sample(per_image, interval, MIN_PER_CENTROID * max_k)
    rows = np.ascontiguousarray(np.concatenate(per_image), dtype=np.float32)
    objectives: list[float] = []
    for k in range(1, min(max_k, len(sample)) + 1):
        km = kmeans(sample, k, seed)
        dist, labels = km.index.search(rows, 1)
        objectives.append(float(dist.mean()))
        if elbow_reached(objectives, elbow):
            break
    return km.centroids, np.split(labels[:, 0], np.cumsum([len(x) for x in per_image])[:-1])


def salient_clusters(labels: Sequence[np.ndarray], saliency: Sequence[np.ndarray], k: int, threshold: float = 0.065,
                     votes: float = 0.75) -> np.ndarray:
    """Clusters whose mean saliency exceeds `threshold` in at least ceil(votes * images) images (an
    image where a cluster is absent votes against it). -> sorted cluster ids"""
    tally = np.zeros(k, dtype=int)
    for lab, sal in zip(labels, saliency):
        count = np.bincount(lab, minlength=k)
        total = np.bincount(lab, weights=sal, minlength=k)
        tally += (total > threshold * count) & (count > 0)
    return np.flatnonzero(tally >= math.ceil(round(votes * len(labels), 9)))


def cosine_to_mean(x: np.ndarray) -> np.ndarray:
    """x (n, D) -> (n,) cosine of each row to the mean row."""
    mean = x.mean(0)
    return x @ mean / (np.linalg.norm(x, axis=1) * np.linalg.norm(mean)).clip(1e-12)


def inliers(cls: np.ndarray, threshold: float = OUTLIER_THRESHOLD) -> np.ndarray:
    """The global outlier filter: cls (n, D) -> (n,) bool, cosine to the mean descriptor >= threshold."""
    return cosine_to_mean(cls) >= threshold


def class_distances(desc: np.ndarray, centroids: np.ndarray, classes: Sequence[np.ndarray]) -> np.ndarray:
    """Squared distance of each row to each class, a class being a set of centroid ids (its nearest
    one counts; an empty class is FAR). desc (N, D), centroids (K, D) -> (N, len(classes))"""
    d = (desc**2).sum(1, keepdims=True) - 2 * desc @ centroids.T + (centroids**2).sum(1)
    return np.stack([d[:, c].min(1) if len(c) else np.full(len(desc), FAR, np.float32) for c in classes], 1)


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of per-cell values to the image: grid (h, w, C) -> (H, W, C), size = (H, W).
    The cell grid spans the model input, which spans the whole image."""
    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32)).permute(2, 0, 1)[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def nearest_class(dist: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """dist (h, w, C) per cell -> (H, W) index of the nearest class at every pixel."""
    return upsample(dist, size).argmin(-1)


def saliency_mask(saliency: np.ndarray, size: tuple[int, int], threshold: float = 0.065) -> np.ndarray:
    """The saliency-only baseline: saliency (h, w) upsampled like the masks, above `threshold`."""
    return upsample(saliency[..., None], size)[..., 0] > threshold


def jaccard(mask: np.ndarray, truth: np.ndarray) -> float:
    """|A and B| / |A or B| of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(mask, truth).sum()
    return float(np.logical_and(mask, truth).sum() / union) if union else 1.0


def cosegment_features(feats: Sequence[ImageFeatures], sizes: Sequence[tuple[int, int]],
                       conf: CosegConfig = CosegConfig()) -> CosegResult:
    """Steps 2-5 on extracted features; sizes are the images' (H, W)."""
    keep = inliers(np.stack([f.cls for f in feats]), conf.outlier_threshold) if conf.outlier_threshold is not None \
        else np.ones(len(feats), dtype=bool)
    masks = [np.zeros(size, dtype=bool) for size in sizes]
    parts = [np.full(size, -1, dtype=np.int16) for size in sizes] if conf.parts else None
    saliency = [f.saliency.reshape(f.grid) for f in feats]
    kept = [f for f, ok in zip(feats, keep) if ok]
    if not kept:
        return CosegResult(masks, parts, keep, 0, np.array([], dtype=int), 0, saliency)
    centroids, labels = elbow_kmeans([f.desc for f in kept], conf.elbow, conf.max_clusters, conf.sample_interval,
                                     conf.seed)
    fg = salient_clusters(labels, [f.saliency for f in kept], len(centroids), conf.saliency_threshold, conf.votes)
    bg = np.setdiff1d(np.arange(len(centroids)), fg)
    part_centroids = None
    if conf.parts and len(fg):
        fg_rows = [f.desc[np.isin(lab, fg)] for f, lab in zip(kept, labels)]
        sample = training_sample(fg_rows, conf.sample_interval, MIN_PER_CENTROID * conf.parts)
        part_centroids = kmeans(sample, min(conf.parts, len(sample)), conf.seed).centroids
    for i in np.flatnonzero(keep):
        f, (h, w) = feats[i], feats[i].grid
        masks[i] = nearest_class(class_distances(f.desc, centroids, [fg, bg]).reshape(h, w, 2), sizes[i]) == 0
        if part_centroids is not None:
            p = len(part_centroids)
            classes = [np.array([j]) for j in range(p)] + [p + np.arange(len(bg))]
            dist = class_distances(f.desc, np.concatenate([part_centroids, centroids[bg]]), classes)
            label = nearest_class(dist.reshape(h, w, p + 1), sizes[i])
            parts[i] = np.where(label == p, -1, label).astype(np.int16)
    n_parts = 0 if part_centroids is None else len(part_centroids)
    return CosegResult(masks, parts, keep, len(centroids), fg, n_parts, saliency)


# -- features through the backbone interface ---------------------------------------------------
def check_vit(backbone) -> None:
    from .backbones.vit import ViTBackbone

    if not isinstance(backbone, ViTBackbone):
        raise SimsearchError(f"co-segmentation needs a ViT backbone (CLS-attention saliency); this model is "
                             f"of the '{backbone.family}' family")


@torch.inference_mode()
def image_features(backbone, img: Image.Image, conf: CosegConfig, with_cls: bool = False) -> ImageFeatures:
    """Facet of block `conf.layer` at the overlapping stride and its saliency; with_cls also the CLS
    token (`cls_descriptor`)."""
    pixels = backbone.preprocess(img, conf.image_size)[None].to(backbone.device)
    stride = conf.stride or backbone.patch_size // 2
    layer = backbone.num_layers - 1 if conf.layer is None else conf.layer
    g = backbone.dense_descriptors(pixels, layer=layer, facet=conf.facet, stride=stride)
    return ImageFeatures(F.normalize(g.desc[0], dim=-1).cpu().numpy(), g.saliency[0].cpu().numpy(), g.grid,
                         cls_descriptor(backbone, img, conf) if with_cls else None)


@torch.inference_mode()
def cls_descriptor(backbone, img: Image.Image, conf: CosegConfig) -> np.ndarray:
    """The final (normed) CLS token, for the outlier filter, at the model's own stride. Theirs is the CLS
    token's key in the descriptor layer; on the embedded DINOv2-S/14 that key has cosine >= 0.995 to
    the set's mean for every image (0.995-0.999 on 32 benchmark composites), so no threshold separates
    anything, while the final CLS token is the model's image embedding."""
    pixels = backbone.preprocess(img, conf.image_size)[None].to(backbone.device)
    return backbone.tokens(pixels, {"cls": (backbone.final_layer, "features")})["cls"][0, 0].float().cpu().numpy()


def cosegment(backbone, images: Sequence[Image.Image], conf: CosegConfig = CosegConfig(),
              on_image: Callable[[], None] | None = None) -> CosegResult:
    """Co-segment RGB images with a ViT backbone (see the module docstring)."""
    check_vit(backbone)
    if not images:
        raise SimsearchError("co-segmentation needs at least one image")
    feats = []
    for img in images:
        feats.append(image_features(backbone, img, conf, with_cls=conf.outlier_threshold is not None))
        if on_image:
            on_image()
    return cosegment_features(feats, [(img.height, img.width) for img in images], conf)


# -- files -------------------------------------------------------------------------------------
def mask_overlay(img: Image.Image, mask: np.ndarray) -> Image.Image:
    """The foreground as it is, the background dimmed and tinted blue."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    dim = 0.3 * rgb + 0.25 * np.array([40, 60, 160], dtype=np.float32)
    return Image.fromarray(np.where(mask[..., None], rgb, dim).astype(np.uint8))


def parts_overlay(img: Image.Image, parts: np.ndarray, n: int) -> Image.Image:
    """Each part blended with its palette colour, the background dimmed."""
    from .viz import palette

    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    colours = np.array(palette(n) + [(0, 0, 0)], dtype=np.float32)  # index -1: background
    tint = colours[parts]
    out = np.where(parts[..., None] >= 0, 0.5 * rgb + 0.5 * tint, 0.3 * rgb)
    return Image.fromarray(out.astype(np.uint8))


def unique_stems(paths: Sequence[str | Path]) -> list[str]:
    """File stems, with -2, -3, ... appended where two inputs share one (hits from different folders)."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


@dataclass
class CosegReport:
    paths: list[str]  # the images co-segmented, in order
    result: CosegResult
    files: list[dict]  # per image: {"mask", "overlay"[, "parts", "parts_overlay"]} -> written path
    failed: list[tuple[str, str]]  # (path, reason) of inputs that could not be read
    html: Path | None = None

    def to_dicts(self) -> list[dict]:
        r = self.result
        rows = []
        for i, path in enumerate(self.paths):
            row = {"path": path, "inlier": bool(r.inliers[i]), "foreground": round(float(r.masks[i].mean()), 4),
                   **{k: str(v) for k, v in self.files[i].items()}}
            if r.parts is not None:
                row["part_shares"] = [round(float((r.parts[i] == j).mean()), 4) for j in range(r.n_parts)]
            rows.append(row)
        return rows


def write_outputs(images: Sequence[Image.Image], paths: Sequence[str], result: CosegResult, out_dir: str | Path
                  ) -> list[dict]:
    """Per image: STEM_mask.png (0/255, the image's size) and STEM_overlay.jpg; with parts also
    STEM_parts.png (0 background, 1..N the parts) and STEM_parts_overlay.jpg."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for img, stem, i in zip(images, unique_stems(paths), range(len(images))):
        files = {"mask": out_dir / f"{stem}_mask.png", "overlay": out_dir / f"{stem}_overlay.jpg"}
        Image.fromarray(result.masks[i].astype(np.uint8) * 255).save(files["mask"])
        mask_overlay(img, result.masks[i]).save(files["overlay"], quality=90)
        if result.parts is not None:
            files |= {"parts": out_dir / f"{stem}_parts.png", "parts_overlay": out_dir / f"{stem}_parts_overlay.jpg"}
            Image.fromarray((result.parts[i] + 1).astype(np.uint8)).save(files["parts"])
            parts_overlay(img, result.parts[i], result.n_parts).save(files["parts_overlay"], quality=90)
        written.append(files)
    return written


def write_coseg_page(report: CosegReport, images: Sequence[Image.Image], path: str | Path, title: str) -> Path:
    """A self-contained page: each image, its overlay (and parts), its foreground share."""
    from .viz import table_html, write_page

    r = report.result
    headers = ["image", "co-segmentation"] + (["parts"] if r.parts is not None else []) + ["foreground", "path"]
    rows = []
    for i, (img, p) in enumerate(zip(images, report.paths)):
        pictures = [img, mask_overlay(img, r.masks[i])] + ([parts_overlay(img, r.parts[i], r.n_parts)]
                                                           if r.parts is not None else [])
        rows.append([_img_tag(pic, Path(p).name) for pic in pictures]
                    + [f"{100 * r.masks[i].mean():.1f}%" if r.inliers[i] else "outlier (dropped)",
                       f'<span class="path">{html.escape(p)}</span>'])
    kept = f", {int(r.inliers.sum())} kept by the outlier filter" if not r.inliers.all() else ""
    summary = (f"<p>{len(report.paths)} images{kept}; k = {r.clusters} clusters by the elbow rule, "
               f"{len(r.foreground)} of them foreground (salient in most images).</p>")
    failed = "".join(f"<li>{html.escape(p)}: {html.escape(why)}</li>" for p, why in report.failed)
    return write_page(path, title, [summary, table_html(headers, rows, numeric={len(headers) - 2})]
                + ([f"<h2>not read</h2><ul>{failed}</ul>"] if failed else []))


def _img_tag(img: Image.Image, alt: str, side: int = 320) -> str:
    from .viz import image_data_uri

    thumb = img.copy()
    thumb.thumbnail((side, side))
    return f'<img alt="{html.escape(alt)}" src="{image_data_uri(thumb)}">'


def cosegment_files(paths: Sequence[str | Path], out_dir: str | Path, conf: CosegConfig = CosegConfig(),
                    model: str | None = None, device: str = "auto", backbone=None, html_path: str | Path | None = None,
                    title: str = "simsearch co-segmentation", on_image: Callable[[], None] | None = None
                    ) -> CosegReport:
    """Read the image files (unreadable ones are listed in `failed`), co-segment them with `backbone`
    (or `model`, default the embedded DINOv2-S/14) and write the masks, overlays and, with `html_path`,
    the page."""
    from .backbones import DEFAULT_MODEL, load_backbone
    from .errors import ImageError
    from .images import open_image

    images, kept, failed = [], [], []
    for p in paths:
        try:
            images.append(open_image(Path(p)).image)
            kept.append(str(p))
        except ImageError as e:
            failed.append((str(p), e.reason))
    if not images:
        raise SimsearchError(f"no readable image among the {len(paths)} given" +
                             (f" ({failed[0][0]}: {failed[0][1]})" if failed else ""))
    backbone = backbone or load_backbone(model or DEFAULT_MODEL, device)
    result = cosegment(backbone, images, conf, on_image)
    report = CosegReport(kept, result, write_outputs(images, kept, result, out_dir), failed)
    if html_path is not None:
        report.html = write_coseg_page(report, images, html_path, title)
    return report


# A query's hits may lack the object (the Internet300 case of the paper): the outlier filter is on.
QUERY_CONFIG = CosegConfig(outlier_threshold=OUTLIER_THRESHOLD)


def query_set(query: str | Path, hits) -> list[str]:
    """The query, then the hits' files as stored in the index (read again from disk), without the
    query's own row."""
    own = Path(query).resolve()
    return [str(query)] + [h.path for h in hits if Path(h.path).resolve() != own]
