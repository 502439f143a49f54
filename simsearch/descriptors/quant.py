"""A learned compact codec for dense token tensors (T, C): the hidden states the rerankers read, in
at most BUDGET bytes per image, for any T and C (transform coding).

Per token: its mean and standard deviation over channels are kept as float16 (4 bytes) and the
standardised token u = (h - mean) / std is coded; the rerankers' LayerNorm sees u anyway, and the
decoder gives back u * std + mean. The codec maps u onto the principal components of the fitted
tokens, divides each component by its standard deviation, and quantises component j uniformly with
b_j bits, b_j in 0..8 chosen by reverse water-filling (each extra bit goes where it removes the most
error: about 0.5 * log2(variance) + const, the classic transform-coding rule) so that all
components' bits fit the budget; each component's step is the one with the least squared error on
the fitted tokens. Bits are packed per token.

Errors count where the rerankers see them: with a `metric` G (C x C) the principal components are
those of u L (L L^T = G), so the coding error is smallest in G's norm. Backbones give G = M M^T for
the linear map M from the standardised source onto the attention's q, k and v
(`Backbone.dense_metric`); the mutual-match share, which compares keys among near-tied candidates,
needs that (benchmarks/results/scale.md).

Measured on the embedded DINOv2-S/14 (257x384 tokens, 64 KB instead of 197 KB float16):
benchmarks/results/scale.md. A codec is fitted once (on the rows of a table's first commit) and
stored with the table (`to_bytes`/`from_bytes`); codecs stored before metrics and fitted steps
(a 5-standard-deviation range for every component) still decode.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch

from .codec import COMPACT_CODECS  # noqa: F401 - where callers found it

BUDGET = 64 * 1024
CLIP = 5.0  # standard deviations covered by a component's quantiser in codecs stored before fitted steps
MAX_BITS = 8
STAT_BYTES = 4  # float16 mean and std per token
STEP_SAMPLES = 8192  # tokens the quantiser steps are fitted on
RIDGE = 0.01  # of a metric's mean eigenvalue, added to every direction


@dataclass
class DenseCodec:
    tokens: int
    dim: int
    mean: np.ndarray  # (C,) mean of standardised tokens
    encoder: np.ndarray  # (C, C) u - mean -> components (L times the principal directions)
    decoder: np.ndarray  # (C, C) components -> u - mean (the encoder's inverse)
    scale: np.ndarray  # (C,) standard deviation of each component
    bits: np.ndarray  # (C,) int, bits per component
    step: np.ndarray  # (C,) quantiser step of each component, in its standard deviations
    kind: str = "pca"
    _layout_cache: tuple | None = field(default=None, repr=False)
    _decoding_cache: tuple | None = field(default=None, repr=False)

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
        z = ((x - stats[:, :1].astype(np.float64)) / std - self.mean) @ self.encoder / self.scale
        q = quantise(z, self.bits, self.step)
        comp, place = self._layout()
        bits = (q[:, comp] // place) % 2
        return np.packbits(bits.astype(np.uint8), axis=1).tobytes() + stats.tobytes()

    def _decoding(self) -> tuple:
        """What decoding needs of the codec, once: the coded components' bit offsets and masks, and
        the rotation with each component's quantiser step folded in (level -> u - mean in one product)."""
        if self._decoding_cache is None:
            coded = np.flatnonzero(self.bits)  # components given 0 bits decode to their mean
            bits = self.bits[coded]
            first = np.concatenate([[0], np.cumsum(bits)[:-1]])  # where each code starts, in bits
            step = self.scale[coded] * self.step[coded]  # component units per level
            rotation = torch.from_numpy(np.ascontiguousarray(self.decoder[coded] * step[:, None], np.float32))
            offset = (0.5 - 2.0 ** (bits - 1)) * step  # level 0's centre, in component units
            bias = torch.from_numpy((offset @ self.decoder[coded] + self.mean).astype(np.float32))
            self._decoding_cache = (first // 8, (16 - first % 8 - bits).astype(np.uint16),
                                    ((1 << bits) - 1).astype(np.uint16), rotation, bias)
        return self._decoding_cache

    def decode(self, blobs: list[bytes]) -> np.ndarray:
        """bytes of N images -> (N, T, C) float32."""
        for b in blobs:
            if len(b) != self.nbytes:
                raise ValueError(f"dense blob has {len(b)} bytes, the {self.kind} codec expects {self.nbytes}")
        n, t = len(blobs), self.tokens
        data = np.frombuffer(b"".join(blobs), np.uint8).reshape(n, -1)
        code = data[:, :t * self.code_bytes].reshape(n * t, self.code_bytes)
        stats = torch.from_numpy(data[:, t * self.code_bytes:].copy().view(np.float16).reshape(n * t, 2).astype(np.float32))
        byte, shift, mask, rotation, bias = self._decoding()
        # A code of b <= 8 bits starting at bit `shift` of byte i lies inside bytes i, i+1: every byte with
        # the next as one big-endian 16-bit window, each code's window taken, shifted down and masked.
        padded = np.concatenate([code, np.zeros((n * t, 1), np.uint8)], axis=1)
        windows = (padded[:, :-1].astype(np.uint16) << 8) | padded[:, 1:]
        q = (np.take(windows, byte, axis=1) >> shift) & mask  # (NT, coded) levels
        # The rotation runs in torch, not numpy: OpenBLAS's threads keep spinning after a numpy matmul
        # and slowed the rerankers' torch projections that follow by ~50 ms per 50 images (2 cores).
        u = torch.addmm(bias, torch.from_numpy(q.astype(np.float32)), rotation)
        return torch.addcmul(stats[:, :1], u, stats[:, 1:]).reshape(n, t, self.dim).numpy()

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, kind=self.kind, shape=np.array([self.tokens, self.dim]), mean=self.mean, encoder=self.encoder,
                 decoder=self.decoder, scale=self.scale, bits=self.bits, step=self.step)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DenseCodec":
        with np.load(io.BytesIO(data)) as z:
            tokens, dim = (int(v) for v in z["shape"])
            if "encoder" in z:
                encoder, decoder, step = z["encoder"], z["decoder"], z["step"]
            else:  # stored before metrics and fitted steps: an orthonormal basis, CLIP for every component
                encoder, decoder, step = z["basis"], np.ascontiguousarray(z["basis"].T), default_steps(z["bits"])
            return cls(tokens=tokens, dim=dim, mean=z["mean"], encoder=encoder, decoder=decoder, scale=z["scale"],
                       bits=z["bits"], step=step, kind=str(z["kind"]))


def default_steps(bits: np.ndarray) -> np.ndarray:
    """Steps covering [-CLIP, CLIP) with 2^b levels (in standard deviations)."""
    return (2 * CLIP / 2.0 ** np.asarray(bits)).astype(np.float32)


def quantise(z: np.ndarray, bits: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Components z (N, C) in standard deviations -> unsigned codes 0..2^b-1 (a uniform mid-rise
    quantiser centred on 0; `dequantise` gives each code's level)."""
    levels = 2 ** np.asarray(bits)
    return np.clip(np.floor(z / step) + levels // 2, 0, levels - 1).astype(np.int64)


def dequantise(q: np.ndarray, bits: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Codes -> levels (q - 2^(b-1) + 0.5) * step (DenseCodec.decode computes the same in float32)."""
    return (q - 2.0 ** (np.asarray(bits) - 1) + 0.5) * step


def fit_steps(z: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Per component, the step with the least squared error on samples z (N, C): a 5-sigma range wastes
    levels on tails (the Gaussian optimum at 5 bits covers +-3 sigma), but these components are not
    Gaussian, so the range is searched rather than taken from a table."""
    step = default_steps(bits)
    half_ranges = np.linspace(1.0, 2 * CLIP, 37)[:, None]  # (R, 1) in standard deviations
    for j in np.flatnonzero(bits):
        tried = 2 * half_ranges / 2 ** int(bits[j])  # (R, 1)
        err = ((z[None, :, j] - dequantise(quantise(z[None, :, j], bits[j], tried), bits[j], tried)) ** 2).mean(1)
        step[j] = tried[int(np.argmin(err)), 0]
    return step


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


def metric_root(metric: np.ndarray | None, dim: int) -> np.ndarray:
    """L with L L^T = metric (C, C) plus a ridge of RIDGE times its mean eigenvalue; the identity for None.
    The ridge keeps every direction coded: the rerankers' LayerNorm re-centres and re-scales each token
    over all channels, so an error left large in a direction the metric ignores would leak into the rest."""
    if metric is None:
        return np.eye(dim)
    g = np.asarray(metric, np.float64)
    if g.shape != (dim, dim):
        raise ValueError(f"a metric for {dim}-channel tokens is {dim}x{dim}, not {'x'.join(map(str, g.shape))}")
    w, v = np.linalg.eigh((g + g.T) / 2)
    w = np.maximum(w, 0) + RIDGE * max(float(w.mean()), 1e-30)
    return v * np.sqrt(w)


def fit(samples: np.ndarray, budget: int = BUDGET, metric: np.ndarray | None = None) -> DenseCodec:
    """Fit a codec on samples (N, T, C) of the tensors it will store; `metric` (C, C) weighs the
    standardised tokens' coding error (see the module docstring), None for plain squared error."""
    _, tokens, dim = samples.shape
    if budget // tokens <= STAT_BYTES:
        raise ValueError(f"{budget} bytes cannot hold {tokens} tokens")
    x = samples.reshape(-1, dim).astype(np.float64)
    u = (x - x.mean(1, keepdims=True)) / np.maximum(x.std(1, keepdims=True), 1e-6)
    mean = u.mean(0)
    root = metric_root(metric, dim)
    weighted = (u - mean) @ root
    cov = np.cov(weighted, rowvar=False) if len(u) > 1 else np.eye(dim)
    variances, basis = np.linalg.eigh(cov)
    order = np.argsort(variances)[::-1]
    variances, basis = np.maximum(variances[order], 0), basis[:, order]
    scale = np.sqrt(np.maximum(variances, 1e-12))
    bits = allocate_bits(variances, min(MAX_BITS * dim, 8 * (budget // tokens - STAT_BYTES)))
    encoder = root @ basis
    decoder = basis.T @ np.linalg.inv(root)
    steps_from = np.random.default_rng(0).permutation(len(u))[:STEP_SAMPLES]  # a search per component: bound its cost
    return DenseCodec(tokens=tokens, dim=dim, mean=mean.astype(np.float32), encoder=encoder.astype(np.float32),
                      decoder=decoder.astype(np.float32), scale=scale.astype(np.float32), bits=bits,
                      step=fit_steps(weighted[steps_from] @ basis / scale, bits).astype(np.float32))
