"""ViTs from transformers: `Dinov2Model` (DINOv2) and `ViTModel` (DINO v1), by hub id or a
`save_pretrained` directory. Family differences are data (`HFViTKind`), not code paths."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsNotFoundError
from .base import fingerprint
from .vit import DESCRIPTOR_DEFAULTS, ViTBackbone  # noqa: F401 - the family's defaults


@dataclass(frozen=True)
class HFViTKind:
    model_type: str  # transformers config.model_type
    model_class: str  # transformers class name
    blocks: str  # dotted path from the model to its list of transformer blocks
    prenorm: str  # attribute of a block holding the layer norm in front of attention
    attention: str  # attribute of a block holding its self-attention (q_proj, k_proj, v_proj)


KINDS = {
    "dinov2": HFViTKind("dinov2", "Dinov2Model", "encoder.layer", "norm1", "attention"),
    "dino": HFViTKind("vit", "ViTModel", "layers", "layernorm_before", "attention"),
}


class HFViT(ViTBackbone):
    family = "hf-vit"
    prefix_tokens = 1

    def __init__(self, model: nn.Module, kind: HFViTKind):
        cfg = model.config
        super().__init__(model, int(cfg.patch_size), int(cfg.hidden_size), int(cfg.num_attention_heads),
                         model.get_submodule(kind.blocks))
        self.kind = kind

    def patch_conv(self) -> nn.Conv2d:
        return self.model.embeddings.patch_embeddings.projection

    def prefix(self, batch: int) -> torch.Tensor:
        emb = self.model.embeddings
        return emb.cls_token.expand(batch, -1, -1) + emb.position_embeddings[:, :1]

    def patch_positions(self) -> torch.Tensor:
        return self.model.embeddings.position_embeddings[:, 1:]

    def prenorm(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(self.blocks[layer], self.kind.prenorm)(hidden)

    def qkv(self, layer: int, hidden: torch.Tensor):
        attn = getattr(self.blocks[layer], self.kind.attention)
        x = self.prenorm(layer, hidden.to(attn.q_proj.weight.dtype))
        b, t, _ = x.shape
        return tuple(proj(x).view(b, t, self.num_heads, -1).transpose(1, 2)
                     for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def qk(self, layer: int, hidden: torch.Tensor, query_tokens: int):
        attn = getattr(self.blocks[layer], self.kind.attention)
        x = self.prenorm(layer, hidden.to(attn.q_proj.weight.dtype))
        heads = lambda y: y.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731  (B, T, C) -> (B, H, T, d)
        return heads(attn.k_proj(x)), heads(attn.q_proj(x[:, :query_tokens]))

    def qkv_linear(self, layer: int):
        attn = getattr(self.blocks[layer], self.kind.attention)
        return getattr(self.blocks[layer], self.kind.prenorm).weight, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.layernorm(hidden)

    @property
    def attention_kernel(self) -> str:
        return self.model.config._attn_implementation

    @attention_kernel.setter
    def attention_kernel(self, kernel: str) -> None:
        self.model.set_attn_implementation(kernel)


def kind_of(model_type: str, where: str) -> HFViTKind:
    for kind in KINDS.values():
        if kind.model_type == model_type:
            return kind
    known = ", ".join(k.model_type for k in KINDS.values())
    raise WeightsNotFoundError(f"{where}: model_type '{model_type}' is not a supported ViT ({known})")


def detect(path: Path) -> bool:
    """A `save_pretrained` directory of a transformers ViT we support."""
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in {k.model_type for k in KINDS.values()}


def load(source: str, kind: str | None = None, name: str | None = None) -> HFViT:
    """`source`: a hub id or a local directory; `kind`: a key of KINDS when known (registry)."""
    import transformers

    name = name or source
    if kind is None:
        try:
            cfg = transformers.AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise WeightsNotFoundError(f"{name}: cannot load its config ({str(e).splitlines()[0]})") from None
        found = kind_of(cfg.model_type, name)
    else:
        found = KINDS[kind]
    cls = getattr(transformers, found.model_class)
    kwargs = {"add_pooling_layer": False} if found.model_class == "ViTModel" else {}
    try:
        net = cls.from_pretrained(source, **kwargs)
    except OSError as e:
        raise WeightsNotFoundError(f"{name}: cannot load weights ({str(e).splitlines()[0]})") from None
    backbone = HFViT(net, found)
    backbone.fingerprint = fingerprint(net)
    return backbone
