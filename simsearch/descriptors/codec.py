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


class DenseFormat:
    """How one table stores dense tensors (T, C): "raw" in a dtype of DENSE_DTYPES, or a compact
    codec of descriptors.quant ("pca"), which is fitted on the first rows written (`needs_fit`)."""

    def __init__(self, kind: str, tokens: int, dim: int, dtype: str, codec=None):
        self.kind, self.tokens, self.dim, self.dtype, self.codec = kind, tokens, dim, dtype, codec

    @classmethod
    def of_table(cls, meta: dict, codec_blob: bytes | None) -> "DenseFormat":
        """The format a table's metadata records (tables made before compact codecs are raw), with
        its saved codec."""
        kind = meta.get("dense_codec", "raw")
        codec = None
        if kind != "raw" and codec_blob is not None:
            from .quant import DenseCodec

            codec = DenseCodec.from_bytes(codec_blob)
        return cls(kind, *meta["dense_shape"], meta["config"]["dense_dtype"], codec)

    @property
    def needs_fit(self) -> bool:
        return self.kind != "raw" and self.codec is None

    @property
    def name(self) -> str:
        """What `info` calls it: the raw dtype or the codec's kind."""
        return self.dtype if self.kind == "raw" else self.kind

    @property
    def nbytes(self) -> int:
        """Bytes per image (for a codec not fitted yet, the most it may take)."""
        if self.kind == "raw":
            return dense_nbytes(self.tokens, self.dim, self.dtype)
        from .quant import max_nbytes

        return self.codec.nbytes if self.codec is not None else max_nbytes(self.tokens, self.dim)

    def encode(self, x: np.ndarray) -> list[bytes]:
        """x (N, T, C) float -> N stored blobs."""
        if self.needs_fit:
            raise ValueError(f"the {self.kind} codec is not fitted yet")
        if self.kind == "raw":
            return [encode_dense(t, self.dtype) for t in x]
        return [self.codec.encode(t) for t in x]

    def decode(self, blobs: list[bytes], as_stored: bool = False) -> np.ndarray:
        """Stored blobs -> (N, T, C) float32 (`as_stored`: float16 blobs as float16, for a caller that
        converts faster itself; numpy's float16 conversion is scalar code)."""
        if self.kind != "raw":
            return self.codec.decode(blobs)
        if self.dtype != "float16":
            return np.stack([decode_dense(b, self.tokens, self.dim, self.dtype) for b in blobs])
        size = dense_nbytes(self.tokens, self.dim, self.dtype)
        bad = next((len(b) for b in blobs if len(b) != size), None)
        if bad is not None:
            raise ValueError(f"dense blob has {bad} bytes, expected {size}")
        # one buffer, writable: torch takes it as it is
        x = np.frombuffer(bytearray().join(blobs), dtype=np.float16).reshape(len(blobs), self.tokens, self.dim)
        return x if as_stored else x.astype(np.float32)
