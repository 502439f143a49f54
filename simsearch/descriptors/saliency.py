"""CLS-attention saliency (Amir et al.): how much the CLS token attends to each patch."""

from __future__ import annotations

import torch


def cls_saliency(attn: torch.Tensor, heads: list[int] | None = None) -> torch.Tensor:
    """attn (B, H, Tq, 1+N) of the last block, CLS query first (Tq = 1 suffices)
    -> (B, N) in [0, 1], min-max normalised per image."""
    cls_to_patch = attn[:, :, 0, 1:]  # (B, H, N)
    if heads is not None:
        cls_to_patch = cls_to_patch[:, heads]
    s = cls_to_patch.mean(1)
    lo, hi = s.min(-1, keepdim=True).values, s.max(-1, keepdim=True).values
    return (s - lo) / (hi - lo).clamp_min(1e-12)
