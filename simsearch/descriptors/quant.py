"""A learned compact codec for dense token tensors (T, C): the hidden states the rerankers read, in
at most BUDGET bytes per image, for any T and C (transform coding).

Per token: its mean and standard deviation over channels are kept as float16 (4 bytes) and the
standardised token u = (h - mean) / std is coded; the rerankers' LayerNorm sees u anyway, and the
decoder gives back u * std + mean. The codec rotates u onto the principal components of the fitted
tokens, divides each component by its standard deviation, and quantises component j uniformly over
[-CLIP, CLIP) with b_j bits, b_j in 0..8 chosen by reverse water-filling (each extra bit goes where
it removes the most error: about 0.5 * log2(variance) + const, the classic transform-coding rule)
so that all components' bits fit the budget. Bits are packed per token.

Measured on the embedded DINOv2-S/14 (257x384 tokens, 64 KB instead of 197 KB float16):
benchmarks/results/scale.md. A codec is fitted once (on the rows of a table's first commit) and
stored with the table (`to_bytes`/`from_bytes`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch

BUDGET = 64 * 1024
COMPACT_CODECS = ("pca",)
CLIP = 5.0  # standard deviations covered by a component's quantiser
MAX_BITS = 8
STAT_BYTES = 4  # float16 mean and std per token


@dataclass
class DenseCodec:
    tokens: int
    dim: int
    mean: np.ndarray  # (C,) mean of standardised tokens
    basis: np.ndarray  # (C, C) principal directions (columns)
    scale: np.ndarray  # (C,) standard deviation of each component
    bits: np.ndarray  # (C,) int, bits per component
    kind: str = "pca"
    _layout_cache: tuple | None = field(default=None, repr=False)

    @property
    def code_bytes(self) -> int:
        return -(-int(self.bits.sum()) // 8)

    @property
    def nbytes(self) -> int:
        return self.tokens * (self.code_bytes + STAT_BYTES)

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """For each packed bit: its component and place value (most significant bit first)."""
        if self._layout_cache is None:
            comp = np.repeat(np.arange(self.dim), self.bits)
            place = np.concatenate([2 ** np.arange(b - 1, -1, -1) for b in self.bits if b] or [np.zeros(0, int)])
            self._layout_cache = comp, place
        return self._layout_cache

    def encode(self, x: np.ndarray) -> bytes:
        """x (T, C) float -> bytes: packed codes, then float16 means and stds."""
        x = np.asarray(x, np.float64)
        stats = np.stack([x.mean(1), x.std(1)], 1).astype(np.float16)
        std = np.maximum(stats[:, 1:].astype(np.float64), 1e-6)
        z = ((x - stats[:, :1].astype(np.float64)) / std - self.mean) @ self.basis / self.scale
        levels = 2 ** self.bits
        step = 2 * CLIP / levels
        q = np.clip(np.floor(z / step) + levels // 2, 0, levels - 1).astype(np.int64)  # unsigned, 0..levels-1
        comp, place = self._layout()
        bits = (q[:, comp] // place) % 2
        return np.packbits(bits.astype(np.uint8), axis=1).tobytes() + stats.tobytes()

    def decode(self, blobs: list[bytes]) -> np.ndarray:
        """bytes of N images -> (N, T, C) float32."""
        for b in blobs:
            if len(b) != self.nbytes:
                raise ValueError(f"dense blob has {len(b)} bytes, the {self.kind} codec expects {self.nbytes}")
        n, t = len(blobs), self.tokens
        data = np.frombuffer(b"".join(blobs), np.uint8).reshape(n, -1)
        code = data[:, :t * self.code_bytes].reshape(n * t, self.code_bytes)
        stats = data[:, t * self.code_bytes:].copy().view(np.float16).reshape(n * t, 2).astype(np.float32)
        coded = np.flatnonzero(self.bits)  # components given 0 bits decode to their mean
        bits = self.bits[coded]
        first = np.concatenate([[0], np.cumsum(bits)[:-1]])  # where each code starts, in bits
        # A code of b <= 8 bits starting at bit `shift` of byte i lies inside bytes i, i+1: read them as
        # one big-endian 16-bit window, shift it down and mask (a third of the time of unpacking bits).
        padded = np.concatenate([code, np.zeros((n * t, 1), np.uint8)], axis=1)
        window = (padded[:, first // 8].astype(np.uint16) << 8) | padded[:, first // 8 + 1]
        q = (window >> (16 - first % 8 - bits).astype(np.uint16)) & ((1 << bits) - 1).astype(np.uint16)
        step = (self.scale[coded] * 2 * CLIP / 2.0 ** bits).astype(np.float32)  # component units per level
        z = q.astype(np.float32) * step + (0.5 - 2.0 ** (bits - 1)).astype(np.float32) * step  # (NT, coded)
        # The rotation runs in torch, not numpy: OpenBLAS's threads keep spinning after a numpy matmul
        # and slowed the rerankers' torch projections that follow by ~50 ms per 50 images (2 cores).
        u = torch.from_numpy(z) @ torch.from_numpy(np.ascontiguousarray(self.basis[:, coded].T)) + torch.from_numpy(self.mean)
        stats = torch.from_numpy(stats)
        return (u * stats[:, 1:] + stats[:, :1]).reshape(n, t, self.dim).numpy()

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, kind=self.kind, shape=np.array([self.tokens, self.dim]), mean=self.mean, basis=self.basis,
                 scale=self.scale, bits=self.bits)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DenseCodec":
        with np.load(io.BytesIO(data)) as z:
            tokens, dim = (int(v) for v in z["shape"])
            return cls(tokens=tokens, dim=dim, mean=z["mean"], basis=z["basis"], scale=z["scale"], bits=z["bits"],
                       kind=str(z["kind"]))


def allocate_bits(variances: np.ndarray, total: int) -> np.ndarray:
    """Integer bits per component (0..MAX_BITS) summing to at most `total`, by reverse water-filling:
    b_j = round(0.5 * log2(variance_j) - theta), theta the smallest that fits."""
    logv = 0.5 * np.log2(np.maximum(variances, 1e-30))

    def bits(theta: float) -> np.ndarray:
        return np.clip(np.round(logv - theta), 0, MAX_BITS).astype(np.int64)

    lo, hi = float(logv.min() - MAX_BITS - 1), float(logv.max() + 1)  # bits(lo) is all MAX_BITS, bits(hi) all 0
    if bits(lo).sum() <= total:
        return bits(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bits(mid).sum() > total else (lo, mid)
    return bits(hi)


def max_nbytes(tokens: int, dim: int, budget: int = BUDGET) -> int:
    """The most bytes per image a codec fitted for (tokens, dim) takes (within `budget`)."""
    return tokens * (min(MAX_BITS * dim, 8 * (budget // tokens - STAT_BYTES)) // 8 + STAT_BYTES)


def fit(samples: np.ndarray, budget: int = BUDGET) -> DenseCodec:
    """Fit a codec on samples (N, T, C) of the tensors it will store."""
    _, tokens, dim = samples.shape
    if budget // tokens <= STAT_BYTES:
        raise ValueError(f"{budget} bytes cannot hold {tokens} tokens")
    x = samples.reshape(-1, dim).astype(np.float64)
    u = (x - x.mean(1, keepdims=True)) / np.maximum(x.std(1, keepdims=True), 1e-6)
    mean = u.mean(0)
    cov = np.cov(u - mean, rowvar=False) if len(u) > 1 else np.eye(dim)
    variances, basis = np.linalg.eigh(cov)
    order = np.argsort(variances)[::-1]
    variances, basis = np.maximum(variances[order], 0), basis[:, order]
    bits = allocate_bits(variances, min(MAX_BITS * dim, 8 * (budget // tokens - STAT_BYTES)))
    return DenseCodec(tokens=tokens, dim=dim, mean=mean.astype(np.float32), basis=basis.astype(np.float32),
                      scale=np.sqrt(np.maximum(variances, 1e-12)).astype(np.float32), bits=bits)
