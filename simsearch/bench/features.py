"""Descriptors of a set of images, computed once and scored pairwise by any metric.

The images go through the normal indexer into a LanceDB cache (a temp dir, or `cache=` to keep it
between runs), so scoring reuses batching, the failure handling and the incremental skip of the
index, and every metric reads the same stored descriptors.

AAS needs q, k, v of the dense layer and each image's own attention output for every image (1.6 MB
per image for the embedded model, 16 GB for 10k images): they are computed once, QKV_CHUNK images
at a time, into a float32 scratch file beside the cache and read memory-mapped, so memory holds a
chunk and the pages of the pairs being scored.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import SimsearchError
from ..index import Index
from ..indexers.local import IndexReport, index_files
from ..rerank.aas import aligned_attention_score, attend
from ..paths import normalize
from ..store import path_key

METRICS = ("cosine", "style", "aas")
QKV_CHUNK = 64  # images whose attention inputs are computed at once
METRIC_HELP = {
    "cosine": "cosine of the content vectors",
    "style": "cosine of the style vectors (the configuration's style_pooling of its style_layer(s))",
    "aas": "Aligned Attention Score of the dense layer's self-attention (DiffSim)",
    "combined": "weighted sum of the z-scored AAS and the mode's vector metric",
}


class FeatureSet:
    def __init__(self, paths: list[str | Path], cache: str | Path | None = None, model: str | None = None,
                 device: str = "auto", batch_size: int = 16, runtime: str = "auto",
                 on_total: Callable[[int], None] | None = None, on_advance: Callable[[int], None] | None = None,
                 **descriptors):
        """`descriptors`: DescriptorConfig fields that differ from the model's defaults (e.g. timestep)."""
        self._tmp = None if cache else tempfile.TemporaryDirectory(prefix="simsearch-features-")
        self._scratch: tempfile.TemporaryDirectory | None = None  # the attention inputs' file
        descriptors = {k: v for k, v in descriptors.items() if v is not None}
        self.index = Index(cache or Path(self._tmp.name) / "features.db", model=model, device=device, runtime=runtime, **descriptors)
        self.report: IndexReport = index_files(self.index, paths, batch_size, on_total=on_total, on_advance=on_advance)
        failed = {p for p, _ in self.report.failed}
        self.paths = [p for p in dict.fromkeys(normalize(p) for p in paths) if p not in failed]
        if not self.paths:
            raise SimsearchError("none of the images could be read: " + "; ".join(f"{p}: {r}" for p, r in self.report.failed[:3]))
        self.pos = {p: i for i, p in enumerate(self.paths)}
        rows = self.index.store.rows([path_key(p) for p in self.paths], ["content", "style"])
        self.vectors = {name: np.asarray([r[name] for r in rows], dtype=np.float32) for name in ("content", "style")}
        self._qkv: tuple[torch.Tensor, ...] | None = None

    @property
    def config(self) -> dict:
        """What produced the numbers: descriptor configuration, weights fingerprint, versions."""
        import simsearch

        emb = self.index.embedder
        return {"descriptors": self.index.conf.to_dict(), "weights": emb.fingerprint, "device": str(emb.device),
                "simsearch": simsearch.__version__, "torch": torch.__version__}

    def _attention_inputs(self) -> tuple[torch.Tensor, ...]:
        """q, k, v of the dense layer and each image's own attention output (AAS needs it for every
        pair the image is in), (N, H, T, d) each, on the CPU over a memory-mapped file; computed once."""
        if self._qkv is None:
            bb, layer = self.index.embedder.backbone, self.index.conf.dense_layer
            keys = [path_key(p) for p in self.paths]
            self._scratch = tempfile.TemporaryDirectory(prefix="simsearch-qkv-", dir=self.index.root.parent)
            arrays = None
            for s in range(0, len(keys), QKV_CHUNK):
                with torch.inference_mode():
                    q, k, v = bb.attention_inputs(layer, torch.as_tensor(self.index.dense(keys[s:s + QKV_CHUNK])))
                    parts = (q, k, v, attend(q, k, v))
                if arrays is None:  # (4, N, H, T, d): q, k, v, own
                    arrays = np.lib.format.open_memmap(Path(self._scratch.name) / "qkv.npy", mode="w+", dtype=np.float32,
                                                       shape=(4, len(keys), *q.shape[1:]))
                for j, part in enumerate(parts):
                    arrays[j, s:s + len(q)] = part.float().cpu().numpy()
            arrays.flush()
            self._qkv = tuple(torch.from_numpy(arrays[j]) for j in range(4))
        return self._qkv

    @torch.inference_mode()
    def pair_scores(self, metric: str, i: np.ndarray, j: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Scores of the pairs (i[n], j[n]) (indices into self.paths) -> (P,). Symmetric metrics."""
        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        if metric in ("cosine", "style"):
            v = self.vectors["content" if metric == "cosine" else "style"]
            return np.einsum("pd,pd->p", v[i], v[j])
        if metric != "aas":
            raise SimsearchError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
        return aas_pairs(self._attention_inputs(), i, j, chunk, device=self.index.embedder.device)

    def matrix(self, metric: str, idx: np.ndarray | None = None) -> np.ndarray:
        """(n, n) similarity over all pairs of the images `idx` (indices into self.paths; default all of
        them); the diagonal is 1 by definition of every metric here."""
        idx = np.arange(len(self.paths)) if idx is None else np.asarray(idx, dtype=np.int64)
        i, j = np.triu_indices(len(idx), k=1)
        sim = np.eye(len(idx), dtype=np.float32)
        sim[i, j] = sim[j, i] = self.pair_scores(metric, idx[i], idx[j])
        return sim

    def close(self):
        self._qkv = None
        for tmp in (self._scratch, self._tmp):
            if tmp is not None:
                tmp.cleanup()


@torch.inference_mode()
def aas_pairs(qkv_own: tuple[torch.Tensor, ...], i: np.ndarray, j: np.ndarray, chunk: int = 64,
              device: torch.device | str | None = None) -> np.ndarray:
    """Symmetric AAS of the pairs (i[n], j[n]) -> (P,). qkv_own: q, k, v of every image (N, H, T, d) and
    each image's own attention output attend(q, k, v); each chunk of pairs is scored on `device`
    (None: where the tensors are)."""
    out = np.empty(len(i), dtype=np.float32)
    for a in np.unique(i):  # one anchor against all its partners, batched
        anchor = [t[a:a + 1].to(device) for t in qkv_own]
        sel = np.flatnonzero(i == a)
        for s in range(0, len(sel), chunk):
            part = sel[s:s + chunk]
            jj = torch.as_tensor(j[part])
            q, k, v, own = (t[jj].to(device) for t in qkv_own)
            out[part] = aligned_attention_score(tuple(anchor[:3]), (q, k, v), anchor[3], own).float().cpu().numpy()
    return out
