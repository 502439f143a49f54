"""One ViT feature extractor for every transformers ViT family (DINOv2, DINO v1).

It runs the model's own modules block by block so that it can
- change the patch-embedding stride (overlapping patches, Amir et al.) with the position table
  interpolated to the new grid,
- return the hidden state entering any block (from which token/query/key/value facets follow),
- and stay exact: at stride == patch size it reproduces `model(pixel_values).last_hidden_state`.
Family differences are data (`ViTFamily`), not code paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTFamily:
    model_type: str  # transformers config.model_type
    model_class: str  # transformers class name
    blocks: str  # dotted path from the model to its list of transformer blocks
    prenorm: str  # attribute of a block holding the layer norm in front of attention


FAMILIES = {
    "dinov2": ViTFamily("dinov2", "Dinov2Model", "encoder.layer", "norm1"),
    "dino": ViTFamily("vit", "ViTModel", "layers", "layernorm_before"),
}


@dataclass
class ViTOutput:
    hidden: dict[int, torch.Tensor]  # block index -> hidden state entering it, (B, 1+N, C)
    tokens: torch.Tensor  # final normed tokens, (B, 1+N, C)
    grid: tuple[int, int]  # (h, w) patch grid


class ViTBackbone(nn.Module):
    """Wraps a transformers ViT (`Dinov2Model` / `ViTModel`) loaded by `from_pretrained`."""

    def __init__(self, model: nn.Module, family: ViTFamily):
        super().__init__()
        self.model = model.eval()
        self.family = family
        cfg = model.config
        self.patch_size = int(cfg.patch_size)
        self.dim = int(cfg.hidden_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_layers = int(cfg.num_hidden_layers)
        self.blocks = model.get_submodule(family.blocks)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.cls_token.device

    def grid_size(self, height: int, width: int, stride: int | None = None) -> tuple[int, int]:
        s = stride or self.patch_size
        return 1 + (height - self.patch_size) // s, 1 + (width - self.patch_size) // s

    def embed(self, pixels: torch.Tensor, stride: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch + position embedding. pixels (B, 3, H, W) -> tokens (B, 1+h*w, C), (h, w)."""
        emb = self.model.embeddings
        s = stride or self.patch_size
        if self.patch_size % s:
            raise ValueError(f"stride {s} must divide the patch size {self.patch_size}")
        conv = emb.patch_embeddings.projection
        x = F.conv2d(pixels.to(conv.weight.dtype), conv.weight, conv.bias, stride=s)  # (B, C, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        pos = emb.position_embeddings  # (1, 1+n, C), trained on a square grid
        n = pos.shape[1] - 1
        side = int(round(n**0.5))
        patch_pos = pos[:, 1:]
        if (h, w) != (side, side):
            patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            # Interpolate in float32: bicubic in half precision shifts the embeddings.
            patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False)
            patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        cls = emb.cls_token.expand(x.shape[0], -1, -1) + pos[:, :1]
        return torch.cat([cls, x + patch_pos], dim=1), (h, w)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, keep: set[int] | frozenset[int] = frozenset(),
                stride: int | None = None, last_block: int | None = None) -> ViTOutput:
        """Run the blocks, keeping the hidden state entering each block in `keep`.

        `last_block` stops early (exclusive) when the final tokens are not needed; `tokens` is then None.
        """
        x, grid = self.embed(pixels, stride)
        stop = self.num_layers if last_block is None else last_block
        hidden: dict[int, torch.Tensor] = {}
        for i in range(stop):
            if i in keep:
                hidden[i] = x
            x = self.blocks[i](x)
        if stop in keep:
            hidden[stop] = x
        tokens = self.model.layernorm(x) if stop == self.num_layers else None
        return ViTOutput(hidden=hidden, tokens=tokens, grid=grid)

    def prenorm(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The layer-normed input that block `layer`'s attention sees."""
        return getattr(self.blocks[layer], self.family.prenorm)(hidden)

    def qkv(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention projections of block `layer` from the hidden state entering it.

        hidden (B, T, C) -> q, k, v each (B, heads, T, C/heads).
        """
        attn = self.blocks[layer].attention
        x = self.prenorm(layer, hidden.to(attn.q_proj.weight.dtype))
        b, t, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.num_heads, -1).transpose(1, 2)

        return heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
