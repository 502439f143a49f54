"""Vision transformers (DINOv2, DINO v1; transformers or timm) behind the Backbone interface.

The generic machinery runs the model's own modules block by block so that it can
- change the patch-embedding stride (overlapping patches, Amir et al.) with the position table
  interpolated to the new grid,
- return the hidden state entering any block (from which token/query/key/value facets follow),
- and stay exact: at stride == patch size it reproduces the library's own forward.
Where an implementation keeps its parts (patch conv, position table, prefix tokens, blocks, norms,
projections) is the subclass's business: `hf_vit.py` (transformers) and `timm_vit.py`.
"""

from __future__ import annotations

import math
import threading
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..descriptors.facets import FACETS, attention_probs, merge_heads
from ..descriptors.saliency import cls_saliency
from ..errors import SimsearchError
from .base import Backbone, GridFeatures, Layer, projection_metric
from .pixels import IMAGENET_MEAN, IMAGENET_STD, vit_pixels  # noqa: F401 - where callers found them

_KERNEL_LOCK = threading.Lock()

# Descriptor settings for a ViT of n blocks that no model card overrides (see backbones.descriptor_defaults).
DESCRIPTOR_DEFAULTS = dict(image_size=224, content_pooling="cls", content_layer=None, style_layer=4, dense_layer=9)


def vit_preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """`pixels.vit_pixels` as a tensor (3, size, size)."""
    return torch.from_numpy(vit_pixels(img, size))


@dataclass
class ViTOutput:
    hidden: dict[int, torch.Tensor]  # block index -> hidden state entering it, (B, P+N, C)
    tokens: torch.Tensor | None  # final normed tokens (B, P+N, C); None when stopped early
    grid: tuple[int, int]  # (h, w) patch grid


class ViTBackbone(Backbone):
    """Generic ViT. Subclasses say where the parts are; everything else is shared."""

    def __init__(self, model: nn.Module, patch_size: int, dim: int, num_heads: int, blocks: nn.ModuleList):
        super().__init__()
        self.model = model.eval()
        self.patch_size, self.dim, self.num_heads = patch_size, dim, num_heads
        self.size_multiple = patch_size
        self.blocks = blocks
        self.num_layers = len(blocks)
        self._matmul_users, self._kernel_before = 0, None  # matmul_attention's

    # -- where the parts are (per implementation) ---------------------------------------------
    @abstractmethod
    def patch_conv(self) -> nn.Conv2d: ...

    @abstractmethod
    def prefix(self, batch: int) -> torch.Tensor:
        """(B, P, C): CLS (+ register) tokens with their position embeddings."""

    @abstractmethod
    def patch_positions(self) -> torch.Tensor:
        """(1, n, C) position embeddings of the square patch grid the model was trained on."""

    @abstractmethod
    def prenorm(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The layer-normed input that block `layer`'s attention sees."""

    @abstractmethod
    def qkv(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention projections of block `layer` from the hidden state entering it.
        hidden (B, T, C) -> q, k, v each (B, heads, T, C/heads)."""

    @abstractmethod
    def qk(self, layer: int, hidden: torch.Tensor, query_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k of every token and q of the first `query_tokens` tokens, as `qkv` computes them:
        hidden (B, T, C) -> k (B, heads, T, C/heads), q (B, heads, query_tokens, C/heads)."""

    @abstractmethod
    def qkv_linear(self, layer: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Block `layer`'s prenorm weight (C,) and the weights (out, C) of its q, k, v projections."""

    @abstractmethod
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...

    @property
    @abstractmethod
    def attention_kernel(self) -> str:
        """How the blocks compute attention, in the words of transformers' `attn_implementation`: "sdpa"
        (the fused scaled_dot_product_attention) or "eager" (q k^T, softmax, times v); settable."""

    @contextmanager
    def matmul_attention(self) -> Iterator[None]:
        # Under CPU bf16 autocast the fused kernel runs no faster than in float32 (flash attention for
        # the CPU), while the two bf16 matrix products run ~3.5x faster: at 257 tokens, batch 16,
        # DINOv2-S, 6 against 13 ms a block. Float32 is better served fused (11 against 14 ms).
        # The kernel is the module's: another thread's forward meanwhile runs it too (the same numbers, in
        # float32 a little slower). Counted, so that overlapping blocks put back the kernel from before the first.
        with _KERNEL_LOCK:
            if not self._matmul_users:
                self._kernel_before = self.attention_kernel
                self.attention_kernel = "eager"
            self._matmul_users += 1
        try:
            yield
        finally:
            with _KERNEL_LOCK:
                self._matmul_users -= 1
                if not self._matmul_users:
                    self.attention_kernel = self._kernel_before

    # -- the generic forward --------------------------------------------------------------------
    def grid_size(self, height: int, width: int, stride: int | None = None) -> tuple[int, int]:
        s = stride or self.patch_size
        return 1 + (height - self.patch_size) // s, 1 + (width - self.patch_size) // s

    def embed(self, pixels: torch.Tensor, stride: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch + position embedding. pixels (B, 3, H, W) -> tokens (B, P+h*w, C), (h, w)."""
        s = stride or self.patch_size
        if self.patch_size % s:
            raise SimsearchError(f"stride {s} must divide the patch size {self.patch_size}")
        conv = self.patch_conv()
        x = F.conv2d(pixels.to(conv.weight.dtype), conv.weight, conv.bias, stride=s)  # (B, C, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        pos = self.patch_positions()  # (1, n, C) on a square grid
        side = math.isqrt(int(pos.shape[1]))  # int(): a constant when traced (backbones.runtime)
        if (h, w) != (side, side):
            pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            # Interpolate in float32: bicubic in half precision shifts the embeddings.
            pos = F.interpolate(pos.float(), size=(h, w), mode="bicubic", align_corners=False)
            pos = pos.to(x.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([self.prefix(x.shape[0]).to(x.dtype), x + pos], dim=1), (h, w)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, keep: set[int] | frozenset[int] = frozenset(),
                stride: int | None = None, last_block: int | None = None) -> ViTOutput:
        """Run the blocks, keeping the hidden state entering each block in `keep`.
        `last_block` stops early (exclusive) when the final tokens are not needed; `tokens` is then None."""
        x, grid = self.embed(pixels.to(self.device), stride)
        stop = self.num_layers if last_block is None else last_block
        hidden: dict[int, torch.Tensor] = {}
        for i in range(stop):
            if i in keep:
                hidden[i] = x
            x = self.blocks[i](x)
        if stop in keep:
            hidden[stop] = x
        tokens = self.final_norm(x) if stop == self.num_layers else None
        return ViTOutput(hidden=hidden, tokens=tokens, grid=grid)

    # -- the Backbone interface -----------------------------------------------------------------
    def preprocess(self, img: Image.Image, size: int) -> torch.Tensor:
        return vit_preprocess(img, size)

    def check_layer(self, layer: Layer, kind: str, role: str) -> None:
        # features of block n are the final normed tokens; a source feeds block l's attention, so l < n
        top = self.num_layers if kind == "features" else self.num_layers - 1
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer <= top:
            raise SimsearchError(f"{role}={layer!r} is outside 0..{top} ({self.num_layers} blocks)")

    @torch.inference_mode()
    def tokens(self, pixels: torch.Tensor, wanted: dict[str, tuple[Layer, str]]) -> dict[str, torch.Tensor]:
        """Features at block l: the normed input the block's attention sees (l = n: the final normed
        output). Source at block l: the raw hidden state entering it. Blocks after the last one any
        entry reads are never run."""
        layers = {layer for layer, _ in wanted.values()}
        out = self(pixels, keep=layers, last_block=max(layers))

        def take(layer: int, kind: str) -> torch.Tensor:
            if kind == "source":
                return out.hidden[layer]
            return self.final_norm(out.hidden[layer]) if layer == self.num_layers else self.prenorm(layer, out.hidden[layer])

        return {name: take(layer, kind) for name, (layer, kind) in wanted.items()}

    @torch.inference_mode()
    def attention_inputs(self, layer: Layer, source: torch.Tensor):
        return self.qkv(layer, source.to(self.device))

    @torch.inference_mode()
    def attention_keys(self, layer: Layer, source: torch.Tensor):
        return self.qk(layer, source.to(self.device), self.prefix_tokens)

    def dense_metric(self, layer: Layer):
        # LayerNorm(u) = gain * u + bias for a standardised token u, so q, k, v are linear in u
        gain, weights = self.qkv_linear(layer)
        return projection_metric(weights, gain)

    @torch.inference_mode()
    def dense_descriptors(self, pixels: torch.Tensor, layer: Layer | None = None, facet: str | None = None,
                          stride: int | None = None) -> GridFeatures:
        """Facet `facet` of block `layer` at patch stride `stride` (Amir et al.), patch tokens only, and
        the CLS-attention saliency of the last block, from one forward."""
        layer = self.match_defaults["layer"] if layer is None else layer
        facet = facet or self.match_defaults["facet"]
        stride = stride or self.patch_size
        self.check_layer(layer, "source", "layer")
        if facet not in FACETS or facet == "attn":
            raise SimsearchError(f"unknown facet '{facet}' (choose from key, query, value, token)")
        last = self.num_layers - 1
        out = self(pixels, keep={layer, last}, stride=stride, last_block=last)
        hidden = out.hidden[layer]
        if facet == "token":
            desc = self.blocks[layer](hidden)
        else:
            q, k, v = self.qkv(layer, hidden)
            desc = merge_heads({"query": q, "key": k, "value": v}[facet])
        q, k, _ = self.qkv(last, out.hidden[last])
        p = self.prefix_tokens
        cls_attn = attention_probs(q[:, :, :1], k)  # (B, H, 1, T): only the CLS row, not T x T
        saliency = cls_saliency(cls_attn[..., list(range(1)) + list(range(p, k.shape[2]))])
        return GridFeatures(desc=desc[:, p:].float(), saliency=saliency.float(), grid=out.grid, stride=stride,
                            patch=self.patch_size)

    @property
    def final_layer(self) -> int:
        return self.num_layers  # the final normed tokens

    @property
    def match_defaults(self) -> dict:
        # Amir et al.: a late block's key facet, log-binned, overlapping patches (half the patch size)
        return dict(layer=min(9, self.num_layers - 1), facet="key", stride=max(1, self.patch_size // 2),
                    log_bin=True, image_size=224)
