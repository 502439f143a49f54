"""ViT facets (Amir et al.): token / query / key / value / attn of one block, heads concatenated.

The model-specific part (the block's norm and projections) is `ViTBackbone.qkv`; what follows
from q, k, v is pure tensor code.
"""

from __future__ import annotations

import torch

FACETS = ("token", "query", "key", "value", "attn")


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, T, H*d)"""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)). q (B, H, Tq, d), k (B, H, Tk, d) -> (B, H, Tq, Tk)"""
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


def cls_attention(q_cls: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The CLS row of attention_probs: q_cls (B, H, d), keys (B, T, H*d) heads merged -> (B, H, T).

    One batched matmul of the keys as they are with q laid out block-diagonally (B, H*d, H): the
    (B, H, T, d) head view that q k^T takes would be copied whole, for a single query row."""
    b, h, d = q_cls.shape
    blocks = (q_cls[..., None] * torch.eye(h, dtype=q_cls.dtype, device=q_cls.device)[:, None]).reshape(b, h * d, h)  # (B, H*d, H)
    return torch.softmax(torch.bmm(keys, blocks).transpose(1, 2) * d ** -0.5, dim=-1)


@torch.inference_mode()
def facet(backbone, layer: int, hidden: torch.Tensor, name: str) -> torch.Tensor:
    """Facet `name` of block `layer` from the hidden state entering it, hidden (B, T, C).

    token -> (B, T, C): the block's output; query/key/value -> (B, T, C); attn -> (B, H, T, T).
    """
    if name not in FACETS:
        raise ValueError(f"unknown facet '{name}' (choose from {', '.join(FACETS)})")
    if name == "token":
        return backbone.blocks[layer](hidden)
    q, k, v = backbone.qkv(layer, hidden)
    if name == "attn":
        return attention_probs(q, k)
    return merge_heads({"query": q, "key": k, "value": v}[name])
