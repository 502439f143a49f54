"""Dense correspondences between two images (Deep ViT Features, Amir et al.).

Pure tensor functions on descriptor grids, plus `DenseMatcher`, which turns images into those
grids with any backbone (layer, facet, stride, log-binning as configuration).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..descriptors.logbin import log_bin_tokens


# -- pure functions ----------------------------------------------------------------------------
def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., Na, C), b (..., Nb, C) -> (..., Na, Nb)"""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)


def mutual_nearest_neighbours(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sim (..., Na, Nb) -> nn_ab (..., Na) and mutual (..., Na) bool: a's NN in b has a as its NN."""
    nn_ab = sim.argmax(-1)  # (..., Na)
    nn_ba = sim.argmax(-2)  # (..., Nb)
    back = torch.gather(nn_ba, -1, nn_ab)  # (..., Na)
    return nn_ab, back == torch.arange(sim.shape[-2], device=sim.device)


def mutual_nn_share(desc_a: torch.Tensor, desc_b: torch.Tensor) -> torch.Tensor:
    """Share of a's patches whose nearest neighbour in b is mutual: a correspondence-based
    similarity in [0, 1]. desc_a (Na, C), desc_b (M, Nb, C) -> (M,)"""
    sim = cosine_similarity(desc_a.unsqueeze(0), desc_b)  # (M, Na, Nb)
    _, mutual = mutual_nearest_neighbours(sim)
    return mutual.float().mean(-1)


def best_buddies(desc_a: torch.Tensor, desc_b: torch.Tensor, sal_a: torch.Tensor, sal_b: torch.Tensor,
                 n: int = 10, threshold: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Amir et al.'s best-buddy pairs: mutual NNs on salient patches, clustered into n groups
    (k-means on the concatenated pair descriptors), the most salient pair of each group.

    desc (N, C), sal (N,) in [0, 1] -> pairs (n', 2) patch indices into a and b, similarity (n',),
    ordered by saliency; n' <= n when fewer buddies exist.
    """
    sim = cosine_similarity(desc_a, desc_b)  # (Na, Nb)
    nn_ab, mutual = mutual_nearest_neighbours(sim)
    keep = mutual & (sal_a > threshold) & (sal_b[nn_ab] > threshold)
    idx_a = keep.nonzero().squeeze(1)
    idx_b = nn_ab[idx_a]
    if len(idx_a) > n:
        import faiss

        pair_desc = torch.cat([F.normalize(desc_a[idx_a], dim=-1), F.normalize(desc_b[idx_b], dim=-1)], dim=-1)
        x = np.ascontiguousarray(pair_desc.float().cpu().numpy())
        km = faiss.Kmeans(x.shape[1], n, niter=20, seed=seed, verbose=False, min_points_per_centroid=1)
        km.train(x)
        _, labels = km.index.search(x, 1)
        labels = torch.from_numpy(labels[:, 0]).to(idx_a.device)
        pair_sal = sal_a[idx_a] + sal_b[idx_b]
        chosen = []
        for c in labels.unique():
            members = (labels == c).nonzero().squeeze(1)
            chosen.append(members[pair_sal[members].argmax()])
        sel = torch.stack(chosen)
        idx_a, idx_b = idx_a[sel], idx_b[sel]
    order = (sal_a[idx_a] + sal_b[idx_b]).argsort(descending=True)
    idx_a, idx_b = idx_a[order], idx_b[order]
    return torch.stack([idx_a, idx_b], dim=1), sim[idx_a, idx_b]


def transfer_points(desc_a: torch.Tensor, desc_b: torch.Tensor, idx_a: torch.Tensor, grid_b: tuple[int, int],
                    window: int = 2, temperature: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """For patches idx_a of a, the matching position in b's grid, refined by a soft-argmax over the
    (2*window+1)^2 neighbourhood of the best cell (window=0: plain nearest neighbour).

    -> positions (P, 2) as (row, col) in grid cells (float), confidence (P,) = best cosine.
    """
    hb, wb = grid_b
    sim = cosine_similarity(desc_a[idx_a], desc_b)  # (P, Nb)
    conf, best = sim.max(-1)
    row, col = (best // wb).float(), (best % wb).float()
    if window == 0:
        return torch.stack([row, col], 1), conf
    grid = sim.view(-1, 1, hb, wb)
    k = 2 * window + 1
    patches = F.unfold(F.pad(grid, (window,) * 4, value=-1e4), k).view(len(best), k * k, hb * wb)
    local = patches[torch.arange(len(best)), :, best]  # (P, k*k) similarities around the best cell
    w = torch.softmax(local / temperature, dim=-1)
    offs = torch.arange(-window, window + 1, dtype=torch.float32, device=sim.device)
    dy, dx = torch.meshgrid(offs, offs, indexing="ij")
    refined = torch.stack([row + (w * dy.flatten()).sum(-1), col + (w * dx.flatten()).sum(-1)], 1)
    refined[:, 0].clamp_(0, hb - 1)
    refined[:, 1].clamp_(0, wb - 1)
    return refined, conf


# -- images to descriptor grids ----------------------------------------------------------------
@dataclass
class DenseDescriptors:
    desc: torch.Tensor  # (N, D) patch descriptors
    saliency: torch.Tensor  # (N,) in [0, 1]
    grid: tuple[int, int]  # (h, w)
    stride: int
    patch: int
    input_size: int  # the square side the image was resized to
    image_size: tuple[int, int]  # original (width, height)

    def cell_to_xy(self, rc: torch.Tensor) -> np.ndarray:
        """(P, 2) grid (row, col) -> (P, 2) original-image pixel (x, y) of the patch centres."""
        rc = rc.float().cpu()
        centre = rc * self.stride + self.patch / 2
        sx, sy = self.image_size[0] / self.input_size, self.image_size[1] / self.input_size
        return torch.stack([centre[:, 1] * sx, centre[:, 0] * sy], 1).numpy()

    def xy_to_index(self, xy: np.ndarray) -> torch.Tensor:
        """(P, 2) original-image (x, y) -> (P,) index of the patch whose centre is nearest."""
        xy = torch.as_tensor(np.asarray(xy, dtype=np.float32).reshape(-1, 2))
        sx, sy = self.input_size / self.image_size[0], self.input_size / self.image_size[1]
        h, w = self.grid
        col = ((xy[:, 0] * sx - self.patch / 2) / self.stride).round().clamp(0, w - 1).long()
        row = ((xy[:, 1] * sy - self.patch / 2) / self.stride).round().clamp(0, h - 1).long()
        return row * w + col


@dataclass
class Matches:
    points_a: np.ndarray  # (P, 2) pixel (x, y) in image a
    points_b: np.ndarray  # (P, 2) pixel (x, y) in image b
    confidence: np.ndarray  # (P,) cosine similarity

    def to_dicts(self) -> list[dict]:
        return [{"a": [round(float(v), 2) for v in pa], "b": [round(float(v), 2) for v in pb],
                 "confidence": round(float(c), 4)}
                for pa, pb, c in zip(self.points_a, self.points_b, self.confidence)]


class Matcher:
    """Correspondences between two images from per-image descriptions. `describe` is per image (cache
    it); `pair` turns two descriptions into comparable grids (identity here; per-pair co-PCA for SD
    features); the rest is shared."""

    conf: dict

    def describe(self, image: Image.Image):
        raise NotImplementedError

    def pair(self, a, b) -> tuple[DenseDescriptors, DenseDescriptors]:
        return a, b

    def match_points(self, a, b, points_xy: np.ndarray) -> Matches:
        """`points_xy` (P, 2) pixels of image a -> where they land in image b."""
        a, b = self.pair(a, b)
        idx = a.xy_to_index(points_xy)
        rc, conf = transfer_points(a.desc, b.desc, idx, b.grid, window=self.conf["refine_window"])
        return Matches(points_a=np.asarray(points_xy, dtype=np.float32).reshape(-1, 2),
                       points_b=b.cell_to_xy(rc), confidence=conf.cpu().numpy())

    def best_buddies(self, a, b, n: int = 10) -> Matches:
        a, b = self.pair(a, b)
        pairs, sim = best_buddies(a.desc, b.desc, a.saliency, b.saliency, n=n,
                                  threshold=self.conf["saliency_threshold"])
        return Matches(points_a=a.cell_to_xy(_cells(pairs[:, 0], a.grid)), points_b=b.cell_to_xy(_cells(pairs[:, 1], b.grid)),
                       confidence=sim.cpu().numpy())

    def nearest(self, a, b, n: int = 10) -> Matches:
        """The n most confident nearest-neighbour transfers of a's salient cells."""
        pa, pb = self.pair(a, b)
        salient = torch.nonzero(pa.saliency > self.conf["saliency_threshold"]).squeeze(1)
        probe = self.match_points(a, b, pa.cell_to_xy(_cells(salient, pa.grid)))
        top = np.argsort(-probe.confidence, kind="stable")[:n]
        return Matches(probe.points_a[top], probe.points_b[top], probe.confidence[top])


def _cells(index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Flat cell indices -> (P, 2) (row, col)."""
    return torch.stack([index // grid[1], index % grid[1]], 1)


class DenseMatcher(Matcher):
    """Correspondences from one backbone's dense descriptors. Configuration is data: unset settings
    (None) take the backbone's `match_defaults` (a ViT: key facet of a late block at half-patch
    stride, log-binned; the UNet: DIFT's up_blocks[1] features)."""

    default_conf = dict(
        layer=None,  # ViT block index, or UNet module path
        facet=None,  # ViT: key, query, value or token
        stride=None,  # ViT patch stride (overlapping patches)
        log_bin=None,
        image_size=None,
        saliency_threshold=0.05,  # best buddies keep patches above it (families without saliency keep all)
        refine_window=2,  # soft-argmax neighbourhood for point transfer; 0 = plain NN
    )

    def __init__(self, backbone, **conf):
        unknown = set(conf) - set(self.default_conf)
        if unknown:
            raise ValueError(f"unknown DenseMatcher options: {', '.join(sorted(unknown))}")
        given = {k: v for k, v in conf.items() if v is not None}
        self.conf = {**self.default_conf, **backbone.match_defaults, **given}
        self.backbone = backbone

    @torch.inference_mode()
    def describe(self, image: Image.Image) -> DenseDescriptors:
        c, bb = self.conf, self.backbone
        pixels = bb.preprocess(image, c["image_size"])[None]
        g = bb.dense_descriptors(pixels, c["layer"], c["facet"], c["stride"])
        desc = log_bin_tokens(g.desc, g.grid) if c["log_bin"] else g.desc
        sal = g.saliency if g.saliency is not None else torch.ones(desc.shape[:2], device=desc.device)
        return DenseDescriptors(desc=desc[0].float(), saliency=sal[0].float(), grid=g.grid, stride=g.stride,
                                patch=g.patch, input_size=c["image_size"], image_size=image.size)

    def with_conf(self, **conf) -> "DenseMatcher":
        """The same backbone with other settings (no reload)."""
        return DenseMatcher(self.backbone, **{**self.conf, **conf})
