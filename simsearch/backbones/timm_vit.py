"""ViTs from timm (`timm.models.VisionTransformer`): the Deep ViT Features code runs on timm, and timm
hosts DINO and DINOv2 weights (`vit_small_patch8_224.dino`, `vit_small_patch14_dinov2.lvd142m`, also
with register tokens). Loaded by hub id (`timm/<name>`) or from a `save_for_hf` directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsNotFoundError
from .base import fingerprint
from .vit import DESCRIPTOR_DEFAULTS, ViTBackbone  # noqa: F401 - the family's defaults


class TimmViT(ViTBackbone):
    family = "timm-vit"

    def __init__(self, model: nn.Module):
        if getattr(model, "pos_embed", None) is None or not hasattr(model, "blocks"):
            raise WeightsNotFoundError(f"{type(model).__name__}: not a ViT with an absolute position table")
        super().__init__(model, int(model.patch_embed.patch_size[0]), int(model.embed_dim),
                         int(model.blocks[0].attn.num_heads), model.blocks)
        self.prefix_tokens = int(model.num_prefix_tokens)  # CLS + register tokens

    def patch_conv(self) -> nn.Conv2d:
        return self.model.patch_embed.proj

    def prefix(self, batch: int) -> torch.Tensor:
        m = self.model
        tokens = [t.expand(batch, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        prefix = torch.cat(tokens, dim=1)
        # no_embed_class: the table has no entries for the prefix (DeiT-3, DINOv2 with registers)
        return prefix if m.no_embed_class else prefix + m.pos_embed[:, :self.prefix_tokens]

    def patch_positions(self) -> torch.Tensor:
        m = self.model
        return m.pos_embed if m.no_embed_class else m.pos_embed[:, self.prefix_tokens:]

    def embed(self, pixels: torch.Tensor, stride: int | None = None):
        x, grid = super().embed(pixels, stride)
        return self.model.norm_pre(x), grid  # timm normalises the whole sequence after the positions

    def prenorm(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.blocks[layer].norm1(hidden)

    def qkv(self, layer: int, hidden: torch.Tensor):
        attn = self.blocks[layer].attn
        x = self.prenorm(layer, hidden.to(attn.qkv.weight.dtype))
        b, t, _ = x.shape
        q, k, v = attn.qkv(x).reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def qk(self, layer: int, hidden: torch.Tensor, query_tokens: int):
        attn = self.blocks[layer].attn
        x = self.prenorm(layer, hidden.to(attn.qkv.weight.dtype))
        (wq, wk, _), bias = attn.qkv.weight.chunk(3), attn.qkv.bias  # the fused projection's q, k, v rows
        bq, bk = (None, None) if bias is None else bias.chunk(3)[:2]
        heads = lambda y: y.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731  (B, T, C) -> (B, H, T, d)
        return attn.k_norm(heads(F.linear(x, wk, bk))), attn.q_norm(heads(F.linear(x[:, :query_tokens], wq, bq)))

    def qkv_linear(self, layer: int):
        return self.blocks[layer].norm1.weight, [self.blocks[layer].attn.qkv.weight]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)

    @property
    def attention_kernel(self) -> str:
        return "sdpa" if all(b.attn.fused_attn for b in self.blocks) else "eager"

    @attention_kernel.setter
    def attention_kernel(self, kernel: str) -> None:
        for b in self.blocks:
            b.attn.fused_attn = kernel == "sdpa"


def detect(path: Path) -> bool:
    """A timm `save_for_hf` directory (its config.json names an `architecture`)."""
    config = path / "config.json"
    return config.is_file() and "architecture" in json.loads(config.read_text())


def load(source: str, name: str | None = None) -> TimmViT:
    """`source`: a hub id (`timm/vit_small_patch14_dinov2.lvd142m`) or a local `save_for_hf` directory."""
    import timm

    name = name or source
    path = Path(source).expanduser()
    spec = f"local-dir:{path.resolve()}" if path.is_dir() else f"hf-hub:{source}"
    try:
        net = timm.create_model(spec, pretrained=True, num_classes=0)
    except (OSError, RuntimeError, ValueError) as e:
        raise WeightsNotFoundError(f"{name}: cannot load the timm model ({str(e).splitlines()[0]})") from None
    backbone = TimmViT(net.eval())
    backbone.fingerprint = fingerprint(net)
    return backbone
