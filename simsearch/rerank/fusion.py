"""Stable Diffusion + DINOv2 fused descriptors for zero-shot correspondence (Zhang et al., "A Tale of
Two Features"; their code: sd-dino's pck_spair_pascal.py and utils_correspondence.py).

For a pair of images:
- SD: the decoder stream entering LDM output blocks 2, 5, 8 (backbones.sd.ZHANG_LAYERS), each layer
  reduced to 256 dims by one PCA fitted on both images' tokens together (seeded), then gathered as
  sd-dino does: coarsest first, each finer layer concatenated in front of the upsampled rest, so the
  channels read [8 | 5 | 2] on layer 8's grid (layer 2 upsampled twice, bilinear);
- DINO: the token facet of the last block (layer 11 of ViT-B/14 at 840 px: 60 x 60);
- fusion: each part L2-normalised per cell, weighted alpha : 1 - alpha (sd-dino: 1 : 1) and
  concatenated; nearest neighbours by cosine (sd-dino's L2 distance ranks these the same, as each part
  has a fixed norm).
SD alone (features "sd") is the gathered SD part, normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .correspondence import DenseDescriptors, Matcher


# -- pure functions ------------------------------------------------------------------------------------
def co_pca(a: torch.Tensor, b: torch.Tensor, dims: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One PCA for both images' tokens. a (Na, C), b (Nb, C) -> (Na, d), (Nb, d), d = min(dims, C, Na+Nb).
    torch.pca_lowrank is randomised: it runs under its own seed, leaving the global RNG untouched."""
    x = torch.cat([a, b]).float()
    centred = x - x.mean(0, keepdim=True)
    d = min(dims, x.shape[1], x.shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(centred, q=d)
    reduced = centred @ v[:, :d]
    return reduced[:len(a)], reduced[len(a):]


def as_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, C) on a row-major grid -> (1, C, h, w)."""
    return tokens.T.reshape(1, -1, *grid)


def resize_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(grid) else F.interpolate(x, size=grid, mode="bilinear", align_corners=False)


def gather_layers(maps: list[torch.Tensor]) -> torch.Tensor:
    """sd-dino's gathering: maps (1, C_i, h_i, w_i) from coarse to fine -> (1, sum C_i, h, w) on the finest
    grid, finest channels first: each finer map goes in front of everything before it, upsampled."""
    out = maps[0]
    for finer in maps[1:]:
        out = torch.cat([finer, resize_map(out, finer.shape[-2:])], dim=1)
    return out


def fuse(sd: torch.Tensor, dino: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """(N, Dsd), (N, Ddino) -> (N, Dsd + Ddino): each part unit-norm per cell, weighted alpha : 1 - alpha."""
    return torch.cat([alpha * F.normalize(sd, dim=-1), (1 - alpha) * F.normalize(dino, dim=-1)], dim=-1)


# -- images to fused grids ---------------------------------------------------------------------------------
@dataclass
class PairDescription:
    """One image as the pair step needs it (before the per-pair PCA)."""

    sd: list[tuple[torch.Tensor, tuple[int, int]]] | None  # per SD layer, coarse to fine: tokens (N, C), grid
    dino: DenseDescriptors | None
    image_size: tuple[int, int]


class FusedMatcher(Matcher):
    """Correspondences from SD features ("sd"), or SD fused with a DINO ViT ("sd+dino")."""

    default_conf = dict(
        sd_size=960,  # Zhang et al.: SD input 960 px (grids 15 / 30 / 60)
        dino_size=840,  # DINOv2 input 840 px (60 x 60 at patch 14)
        dino_layer=None,  # None: the last block (layer 11 of ViT-B/14, pre final norm)
        pca_dims=256,
        alpha=0.5,
        seed=0,
        saliency_threshold=0.05,
        refine_window=0,  # sd-dino: plain nearest neighbour
    )

    def __init__(self, sd, dino=None, **conf):
        from ..backbones.sd import ZHANG_LAYERS

        unknown = set(conf) - set(self.default_conf)
        if unknown:
            raise ValueError(f"unknown FusedMatcher options: {', '.join(sorted(unknown))}")
        self.conf = {**self.default_conf, **{k: v for k, v in conf.items() if v is not None}}
        self.sd, self.dino = sd, dino
        self.sd_layers = [ZHANG_LAYERS[k] for k in sorted(ZHANG_LAYERS)]  # 2, 5, 8: coarse to fine
        if dino is not None and self.conf["dino_layer"] is None:
            self.conf["dino_layer"] = dino.num_layers - 1

    @torch.inference_mode()
    def describe(self, image: Image.Image) -> PairDescription:
        c = self.conf
        pixels = self.sd.preprocess(image, c["sd_size"])[None]
        taps = self.sd.tokens(pixels, {i: (path, "features") for i, path in enumerate(self.sd_layers)})
        sd = [(taps[i][0].float().cpu(), self.sd.patch_grid(taps[i].shape[1])) for i in range(len(self.sd_layers))]
        dino = None
        if self.dino is not None:
            g = self.dino.dense_descriptors(self.dino.preprocess(image, c["dino_size"])[None], c["dino_layer"], "token")
            dino = DenseDescriptors(desc=g.desc[0].float().cpu(), saliency=g.saliency[0].float().cpu(), grid=g.grid,
                                    stride=g.stride, patch=g.patch, input_size=c["dino_size"], image_size=image.size)
        return PairDescription(sd=sd, dino=dino, image_size=image.size)

    def pair(self, a: PairDescription, b: PairDescription) -> tuple[DenseDescriptors, DenseDescriptors]:
        c = self.conf
        maps_a, maps_b = [], []
        for (ta, grid), (tb, _) in zip(a.sd, b.sd):
            ra, rb = co_pca(ta, tb, c["pca_dims"], c["seed"])
            maps_a.append(as_map(ra, grid))
            maps_b.append(as_map(rb, grid))
        sd_a, sd_b = gather_layers(maps_a), gather_layers(maps_b)
        return self._grid(sd_a, a), self._grid(sd_b, b)

    def _grid(self, sd_map: torch.Tensor, d: PairDescription) -> DenseDescriptors:
        if d.dino is None:  # SD alone, on its finest grid
            h, w = sd_map.shape[-2:]
            cell = self.conf["sd_size"] // w
            desc = F.normalize(sd_map.flatten(2)[0].T, dim=-1)
            return DenseDescriptors(desc=desc, saliency=torch.ones(h * w), grid=(h, w), stride=cell, patch=cell,
                                    input_size=self.conf["sd_size"], image_size=d.image_size)
        sd = resize_map(sd_map, d.dino.grid).flatten(2)[0].T  # onto DINO's grid (the same 60 x 60 in the paper)
        return DenseDescriptors(desc=fuse(sd, d.dino.desc, self.conf["alpha"]), saliency=d.dino.saliency,
                                grid=d.dino.grid, stride=d.dino.stride, patch=d.dino.patch,
                                input_size=d.dino.input_size, image_size=d.image_size)
