"""Global descriptors from token tensors (B, P+N, C): P prefix tokens (CLS first) before the patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONTENT_POOLINGS = ("cls", "mean", "cls+mean", "gem")


def content_vector(tokens: torch.Tensor, pooling: str = "cls", prefix: int = 1) -> torch.Tensor:
    """(B, P+N, C) with P = `prefix` tokens (CLS first, registers) before the patches -> (B, D),
    L2-normalised. D = C, or 2C for `cls+mean`."""
    cls, patches = tokens[:, 0], tokens[:, prefix:]
    if pooling == "cls":
        v = cls
    elif pooling == "mean":
        v = patches.mean(1)
    elif pooling == "cls+mean":
        # Each half normalised first so that neither dominates by scale.
        v = torch.cat([F.normalize(cls, dim=-1), F.normalize(patches.mean(1), dim=-1)], dim=-1)
    elif pooling == "gem":
        v = patches.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)
    else:
        raise ValueError(f"unknown content pooling '{pooling}' (choose from {', '.join(CONTENT_POOLINGS)})")
    return F.normalize(v.float(), dim=-1)


def style_vector(patches: torch.Tensor) -> torch.Tensor:
    """Channel statistics of patch tokens, the Gram-free style descriptor (AdaIN-style mean/std).

    patches (B, N, C) -> (B, 2C): [mean | std] over tokens, each half L2-normalised, then the whole.
    Spatial layout is averaged away, which is what makes it a style rather than content signal.
    """
    x = patches.float()
    mean = x.mean(1)
    std = x.std(1, unbiased=False)
    return F.normalize(torch.cat([F.normalize(mean, dim=-1), F.normalize(std, dim=-1)], dim=-1), dim=-1)
