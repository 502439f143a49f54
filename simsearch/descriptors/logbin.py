"""Log-binning of dense descriptors (Amir et al.): each patch gathers 17 neighbourhood averages.

Level 0: the 3x3 neighbours of single cells (offsets {-1,0,1}^2, 9 bins).
Level 1: 3x3-averaged cells at offsets {-3,0,3}^2 minus the centre (8 bins).
Borders replicate the nearest cell. Vectorised: one pooling and nine shifted views per level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = 2
BINS = 9 + 8 * (LEVELS - 1)


def log_bin(x: torch.Tensor, levels: int = LEVELS) -> torch.Tensor:
    """x (B, C, h, w) -> (B, bins*C, h, w) with bins = 9 + 8*(levels-1) (17 for two levels)."""
    h, w = x.shape[-2:]
    parts = []
    for level in range(levels):
        s = 3**level  # window side and offset step
        pooled = F.avg_pool2d(x, s, stride=1, padding=s // 2, count_include_pad=False) if s > 1 else x
        padded = F.pad(pooled, (s, s, s, s), mode="replicate")  # (B, C, h+2s, w+2s)
        for dy in (-s, 0, s):
            for dx in (-s, 0, s):
                if level > 0 and dy == dx == 0:
                    continue  # the centre is already level 0's middle bin
                parts.append(padded[..., s + dy: s + dy + h, s + dx: s + dx + w])
    return torch.cat(parts, dim=1)


def log_bin_tokens(patches: torch.Tensor, grid: tuple[int, int], levels: int = LEVELS) -> torch.Tensor:
    """patches (B, N, C) on a (h, w) grid -> (B, N, bins*C)."""
    b, n, c = patches.shape
    h, w = grid
    x = patches.transpose(1, 2).reshape(b, c, h, w)
    return log_bin(x, levels).flatten(2).transpose(1, 2)
