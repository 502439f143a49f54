"""Global descriptors from token tensors (B, P+N, C): P prefix tokens (CLS first) before the patches."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .pooling_spec import CONTENT_POOLINGS, STYLE_POOLINGS, style_parts  # noqa: F401 - the names live there


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
    std = (x - mean[:, None]).square().mean(1).sqrt()  # (B, C) in two passes: 1.7 ms against torch's std(1), 4.4 ms, on a CPU
    return F.normalize(torch.cat([F.normalize(mean, dim=-1), F.normalize(std, dim=-1)], dim=-1), dim=-1)


def covariance_vector(patches: torch.Tensor) -> torch.Tensor:
    """Channel covariance of patch tokens (the centred Gram matrix of Gatys-style style transfer).

    patches (B, N, C) -> (B, C(C+1)/2): the upper triangle (diagonal included) of the C x C covariance
    over tokens, signed-square-rooted (a few high-variance channels would otherwise decide every
    cosine), then L2-normalised. Off-diagonal entries appear once, so the cosine of two vectors weights
    them half as much as in the Frobenius inner product of the matrices.
    """
    x = patches.float()
    x = x - x.mean(1, keepdim=True)
    cov = x.transpose(1, 2) @ x / x.shape[1]  # (B, C, C)
    i, j = upper_triangle(int(cov.shape[1]))
    v = cov[:, i, j]
    return F.normalize(v.sign() * v.abs().sqrt(), dim=-1)


@functools.lru_cache(maxsize=16)
def upper_triangle(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the upper triangle (diagonal included) of a channels x channels matrix;
    cached, so a traced export (backbones.runtime) sees constants rather than an op ONNX lacks."""
    i, j = torch.triu_indices(channels, channels)
    return i, j


@functools.lru_cache(maxsize=16)
def channel_projection(channels: int, k: int, seed: int = 0) -> torch.Tensor:
    """(channels, k) fixed orthonormal random directions (QR of a seeded Gaussian): projecting tokens on
    them before `covariance_vector` keeps k(k+1)/2 instead of C(C+1)/2 numbers, a random sketch of the
    covariance that needs no training data."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(channels, k, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # signs fixed: the same directions on every LAPACK


def style_pooled(patches: torch.Tensor, pooling: str = "meanstd") -> torch.Tensor:
    """One block's style statistics (B, N, C) -> (B, D): `meanstd` (style_vector), `cov`
    (covariance_vector), `cov<k>` (the covariance of the tokens projected on channel_projection(C, k));
    several joined by `+` are each unit-norm, concatenated and renormalised (concat_normalized)."""
    out = []
    for kind, k in style_parts(pooling):
        if kind == "meanstd":
            out.append(style_vector(patches))
        elif k is None:
            out.append(covariance_vector(patches))
        elif k > patches.shape[-1]:
            raise ValueError(f"style pooling cov{k}: more directions than the {patches.shape[-1]} channels")
        else:
            out.append(covariance_vector(patches.float() @ channel_projection(int(patches.shape[-1]), k).to(patches.device)))
    return out[0] if len(out) == 1 else concat_normalized(out)


def concat_normalized(parts: list[torch.Tensor]) -> torch.Tensor:
    """Unit-norm (B, D_i) parts -> their concatenation, L2-normalised: every part weighs the same in a
    cosine whatever its width (multi-block style vectors)."""
    return F.normalize(torch.cat([F.normalize(p.float(), dim=-1) for p in parts], dim=-1), dim=-1)


def fit_whitening(x: torch.Tensor, dim: int | None = None, shrink: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening learned on unlabelled vectors x (N, D) -> (mean (D,), projection (D, k)).

    k = `dim` (default: the rank of the centred data); `shrink` adds that fraction of the mean
    eigenvalue to every eigenvalue before dividing, so that near-empty directions are not blown up.
    With shrink = 0, (x - mean) @ projection has identity covariance on the data it was fit on.
    """
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    var = s**2 / x.shape[0]
    rank = int((var > var[0] * 1e-10).sum())
    k = min(dim or rank, rank)
    var = var[:k] + shrink * var[:k].mean()
    return mean.float(), (vh[:k].T / var.sqrt()).float()


def whiten(x: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, k) whitened by `fit_whitening`'s (mean, projection), L2-normalised."""
    return F.normalize((x.float() - mean) @ projection, dim=-1)
