"""Unsupervised semantic correspondence with Stable Diffusion (Hedlin et al.; their code:
ubc-vision/LDM_correspondences, utils/optimize_token.py and utils/optimize.py).

For one source point, a random prompt embedding (1, 77, D) is optimised with Adam so that the
cross-attention maps of chosen attn2 layers, for token 1, averaged over heads and upsampled to the
model input, match a Gaussian at the point. Every step sees the source image cropped at random (80 %
of the side, the point kept 15 % away from the crop's border), flipped with probability 1/2, and
noised at `opt_timestep`. That is repeated `repeats` times. Each optimised embedding is then run on
`crops` crops of the target (the first four at the corners, then around the current maximum) whose
maps are accumulated over the image; the maps of all repeats are averaged, softmaxed per layer and
averaged over layers, and their argmax is the match.

Kept from their code: the layers (the first six cross-attentions of at most 32 x 32 tokens in forward
order), the head subset (their prompt-to-prompt controller keeps the second half of the batch*heads
axis: heads h/2..h-1 for one image), uniform noise (`torch.rand_like`), the timesteps (DDIM index 10
of 50, t = 780, while optimising; index -3, t = 40, in the target), Adam at 1e-3, sigma 32 px at 512.
Deterministic: every random draw comes from generators seeded with `seed`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..backbones.base import StopForward, module_at
from .correspondence import Matches

DEFAULT_LAYERS = [f"{block}.transformer_blocks.0.attn2" for block in (
    "down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.2.attentions.0",
    "down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.1.attentions.0")]
DEFAULTS = dict(steps=100, repeats=5, crops=20, lr=1e-3, opt_timestep=780, match_timestep=40, sigma=1 / 16,
                crop=0.8, margin=0.15, flip=0.5, token=1, image_size=512, seed=0)


# -- cross-attention maps with gradients ----------------------------------------------------------------
class CrossAttentionMaps:
    """Attention processor: records softmax(Q K^T / sqrt(d)) of its cross-attention (gradients kept),
    then computes the output with the processor it replaced. Stops the UNet after the last layer."""

    def __init__(self, name: str, inner, maps: dict, last: bool):
        self.name, self.inner, self.maps, self.last = name, inner, maps, last

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        self.maps[self.name] = attn.get_attention_scores(q, k, None)  # (B*heads, N, 77)
        if self.last:
            raise StopForward
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


@contextmanager
def cross_attention_maps(unet, layers: list[str]) -> Iterator[dict]:
    """While active, each forward fills {layer: maps} for the attn2 `layers` (in that order) and stops
    after the last one; the UNet's own processors are restored afterwards (from a saved copy:
    set_attn_processor pops the dict it is given)."""
    saved = dict(unet.attn_processors)
    maps: dict = {}
    mine = dict(saved)
    for i, layer in enumerate(layers):
        key = f"{layer}.processor"
        mine[key] = CrossAttentionMaps(layer, saved[key], maps, last=i == len(layers) - 1)
    unet.set_attn_processor(mine)
    try:
        yield maps
    finally:
        unet.set_attn_processor(dict(saved))


def layer_maps(maps: dict, layers: list[str], token: int, size: int) -> torch.Tensor:
    """{layer: (heads, N, 77)} of one image -> (L, heads/2, size, size): token `token` of the second half
    of the heads (their controller's), each square map upsampled bilinearly."""
    out = []
    for layer in layers:
        m = maps[layer]
        m = m[m.shape[0] // 2:, :, token]  # (heads/2, N)
        side = round(m.shape[1] ** 0.5)
        out.append(F.interpolate(m.reshape(1, -1, side, side), size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)


def gaussian(center_xy: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(size, size) exp(-d^2 / 2 sigma^2) around center (x, y) in pixels of a size x size map."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    return torch.exp(-((xs - center_xy[0]) ** 2 + (ys - center_xy[1]) ** 2) / (2 * sigma ** 2))


def crop_window(point_xy: np.ndarray, side: int, crop: float, margin: float, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random square crop of `crop` * side keeping the point `margin` * crop away from its border
    (as far as the image allows). -> (x0, y0, crop side)"""
    c = int(side * crop)
    safe = int(c * margin)
    starts = []
    for v in point_xy:
        lo = min(max(0, v - c + safe), side - c)
        hi = min(max(0, v - safe), side - c)
        starts.append(int(rng.integers(int(lo), int(hi) + 1)))
    return starts[0], starts[1], c


# -- the method ----------------------------------------------------------------------------------------
class LDMCorrespondence:
    """Hedlin et al.'s point transfer on a Stable Diffusion backbone (backbones.sd)."""

    def __init__(self, sd, layers: list[str] | None = None, **conf):
        unknown = set(conf) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown LDM options: {', '.join(sorted(unknown))}")
        self.sd = sd
        self.conf = {**DEFAULTS, **{k: v for k, v in conf.items() if v is not None}}
        self.layers = [module_at(sd.unet, path)[0] for path in (layers or DEFAULT_LAYERS)]

    def _latents(self, pixels: torch.Tensor, t: int, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            latents = self.sd.vae.encode(pixels.to(self.sd.device, self.sd.vae.dtype)).latent_dist.mean * self.sd.scaling_factor
        noise = torch.rand(latents.shape, generator=gen).to(latents)  # uniform, as theirs
        return self.sd.scheduler.add_noise(latents, noise, torch.tensor([t]))

    def _maps(self, pixels: torch.Tensor, context: torch.Tensor, t: int, gen: torch.Generator, size: int) -> torch.Tensor:
        """(L, heads/2, size, size) attention maps of `context` on one image (gradients flow to context)."""
        noisy = self._latents(pixels, t, gen)
        with cross_attention_maps(self.sd.unet, self.layers) as maps:
            try:
                self.sd.unet(noisy, torch.tensor([t], device=noisy.device), encoder_hidden_states=context.to(noisy.dtype))
            except StopForward:
                pass
        return layer_maps(maps, self.layers, self.conf["token"], size)

    @staticmethod
    def _crop(pixels: torch.Tensor, x0: int, y0: int, c: int, size: int) -> torch.Tensor:
        return F.interpolate(pixels[..., y0:y0 + c, x0:x0 + c], size=(size, size), mode="bilinear", align_corners=False)

    def optimise(self, pixels: torch.Tensor, point_xy: np.ndarray, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        """A prompt embedding whose maps peak at `point_xy` (model-input pixels) in `pixels` (1, 3, S, S)."""
        c, size = self.conf, pixels.shape[-1]
        context = torch.randn(self.sd.prompt_embedding.shape, generator=gen).to(self.sd.device).requires_grad_(True)
        optimiser = torch.optim.Adam([context], lr=c["lr"])
        for _ in range(c["steps"]):
            image, point = pixels, np.asarray(point_xy, dtype=np.float64)
            if rng.random() <= c["flip"]:
                image, point = image.flip(-1), np.array([size - point[0], point[1]])
            x0, y0, side = crop_window(point, size, c["crop"], c["margin"], rng)
            target = gaussian(torch.tensor((point - (x0, y0)) / side * size), size, c["sigma"] * size)
            with torch.enable_grad():
                maps = self._maps(self._crop(image, x0, y0, side, size), context, c["opt_timestep"], gen, size).mean(1)
                loss = F.mse_loss(maps.flatten(1), target.to(maps).flatten()[None].expand(len(maps), -1))
                loss.backward()
            optimiser.step()
            optimiser.zero_grad()
        return context.detach()

    @torch.no_grad()
    def locate(self, pixels: torch.Tensor, context: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        """(L, S, S) head-averaged maps of `context` over the target, accumulated over crops."""
        c, size = self.conf, pixels.shape[-1]
        total = torch.zeros(len(self.layers), size, size)
        count = torch.zeros(size, size)
        for i in range(c["crops"]):
            if i < 4:  # the four corners first
                at = np.array([(0, 0), (0, size), (size, 0), (size, size)][i], dtype=np.float64)
            else:
                mean = (total / count.clamp_min(1)).mean(0)
                at = np.array(divmod(int(mean.argmax()), size)[::-1], dtype=np.float64) + 0.5
            x0, y0, side = crop_window(at, size, c["crop"], c["margin"], rng)
            maps = self._maps(self._crop(pixels, x0, y0, side, size), context, c["match_timestep"], gen, side).mean(1)
            total[:, y0:y0 + side, x0:x0 + side] += maps.float().cpu()
            count[y0:y0 + side, x0:x0 + side] += 1
        return total / count.clamp_min(1)

    def transfer(self, image_a: Image.Image, image_b: Image.Image, points_xy,
                 on_point: Callable[[int], None] | None = None) -> Matches:
        """Points (x, y) in image a's pixels -> their matches in image b."""
        c, size = self.conf, self.conf["image_size"]
        pa = self.sd.preprocess(image_a, size)[None]
        pb = self.sd.preprocess(image_b, size)[None]
        points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        scale_a = np.array([size / image_a.width, size / image_a.height])
        scale_b = np.array([image_b.width / size, image_b.height / size])
        found, confidence = [], []
        for n, point in enumerate(points):
            rng, gen = np.random.default_rng([c["seed"], n]), torch.Generator().manual_seed(c["seed"] * 100_003 + n)
            maps = torch.stack([self.locate(pb, self.optimise(pa, point * scale_a, rng, gen), rng, gen)
                                for _ in range(c["repeats"])]).mean(0)  # (L, S, S)
            prob = torch.softmax(maps.flatten(1), dim=-1).mean(0)  # per-layer softmax, then the layer mean
            best = int(prob.argmax())
            y, x = divmod(best, size)
            found.append((np.array([x, y]) + 0.5) * scale_b)
            confidence.append(float(prob[best]))
            if on_point:
                on_point(1)
        return Matches(points_a=points.astype(np.float32), points_b=np.asarray(found, np.float32),
                       confidence=np.asarray(confidence, np.float32))
