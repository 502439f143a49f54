"""The stored descriptors of a batch as one module: a backbone's tapped tokens, pooled.

One module so that every inference runtime (backbones.runtime) runs exactly this computation: eagerly,
under bfloat16 autocast, or as an ONNX graph exported from it.
"""

from __future__ import annotations

import torch
from torch import nn

from .pooling import concat_normalized, content_vector, style_pooled


class DescriptorHead(nn.Module):
    """pixels (B, 3, S, S) -> content (B, Dc), style (B, Ds), dense (B, T, C), all float32.

    `wanted` maps "content", "dense" and "style0".."styleN" to (layer, kind) as `Backbone.tokens` takes
    them; the style vector is each style layer's `style_pooling` statistics, concatenated unit-norm."""

    def __init__(self, backbone: nn.Module, wanted: dict, content_pooling: str, style_pooling: str):
        super().__init__()
        self.backbone, self.wanted = backbone, wanted
        self.content_pooling, self.style_pooling = content_pooling, style_pooling
        self.style_names = sorted((n for n in wanted if n.startswith("style")), key=lambda n: int(n[5:]))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.backbone.prefix_tokens
        tokens = self.backbone.tokens(pixels, self.wanted)
        # statistics in float32 whatever precision the forward ran in (a covariance in bf16 loses digits)
        with torch.autocast(pixels.device.type, enabled=False):
            style = [style_pooled(tokens[n][:, p:].float(), self.style_pooling) for n in self.style_names]
            content = content_vector(tokens["content"].float(), self.content_pooling, prefix=p)
            return content, style[0] if len(style) == 1 else concat_normalized(style), tokens["dense"].float()


class DenseHead(nn.Module):
    """pixels (B, 3, S, S) -> (dense (B, T, C),) float32: the dense tap alone (no block after it runs),
    what verification takes of a query at another input size than the stored grid's (Embedder.dense_view)."""

    outputs = ("dense",)

    def __init__(self, backbone: nn.Module, layer):
        super().__init__()
        self.backbone, self.layer = backbone, layer

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.backbone.tokens(pixels, {"dense": (self.layer, "source")})["dense"].float(),)
