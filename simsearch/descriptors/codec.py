"""Compact storage of dense token tensors (T, C) as bytes: float16, or int8 with a per-token scale."""

from __future__ import annotations

import numpy as np

DENSE_DTYPES = ("float16", "int8")
COMPACT_CODECS = ("pca",)  # learned codecs (descriptors.quant); named here, where no torch loads


def dense_nbytes(tokens: int, dim: int, dtype: str) -> int:
    if dtype == "float16":
        return tokens * dim * 2
    if dtype == "int8":
        return tokens * dim + tokens * 2  # codes + one fp16 scale per token
    raise ValueError(f"unknown dense dtype '{dtype}' (choose from {', '.join(DENSE_DTYPES)})")


def encode_dense(x: np.ndarray, dtype: str) -> bytes:
    """x (T, C) float -> bytes."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        return x.astype(np.float16).tobytes()
    if dtype == "int8":
        scale = np.abs(x).max(axis=1, keepdims=True) / 127.0  # (T, 1)
        scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
        codes = np.clip(np.rint(x / scale.astype(np.float32)), -127, 127).astype(np.int8)
        return codes.tobytes() + scale.tobytes()
    raise ValueError(f"unknown dense dtype '{dtype}' (choose from {', '.join(DENSE_DTYPES)})")


def decode_dense(blob: bytes, tokens: int, dim: int, dtype: str) -> np.ndarray:
    """bytes -> (T, C) float32."""
    if len(blob) != dense_nbytes(tokens, dim, dtype):
        raise ValueError(f"dense blob has {len(blob)} bytes, expected {dense_nbytes(tokens, dim, dtype)}")
    if dtype == "float16":
        return np.frombuffer(blob, dtype=np.float16).reshape(tokens, dim).astype(np.float32)
    codes = np.frombuffer(blob, dtype=np.int8, count=tokens * dim).reshape(tokens, dim)
    scale = np.frombuffer(blob, dtype=np.float16, offset=tokens * dim).reshape(tokens, 1)
    return codes.astype(np.float32) * scale.astype(np.float32)
