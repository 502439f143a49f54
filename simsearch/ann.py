"""FAISS indexes derived from the LanceDB table: one per vector column, cosine (inner product on
unit vectors), exact below `IVF_THRESHOLD` rows and IVF above. Each saved index records the table
version it reflects; `load_fresh` rebuilds it whenever the table has moved on, so a search never
answers from a stale index.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .store import ImageStore

IVF_THRESHOLD = 50_000  # below this an exact search over all vectors is fast enough (< 10 ms at 10k x 384)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class VectorIndex:
    index: faiss.Index  # CPU index with ids = store keys
    table_version: int
    kind: str  # "flat" | "ivf<nlist>"
    nprobe: int = 16
    weights: str = ""  # fingerprint of the model whose vectors these are
    _gpu: faiss.Index | None = None

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @classmethod
    def build(cls, keys: np.ndarray, vectors: np.ndarray, table_version: int,
              ivf_threshold: int = IVF_THRESHOLD) -> "VectorIndex":
        n, d = vectors.shape if vectors.size else (0, 1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if n < ivf_threshold:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
            kind = "flat"
        else:
            nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)  # training sample is seeded: rebuilds are reproducible
            sample = vectors[rng.choice(n, size=min(n, 256 * nlist), replace=False)]
            index.train(sample)
            kind = f"ivf{nlist}"
        if n:
            index.add_with_ids(vectors, keys)
        return cls(index=index, table_version=table_version, kind=kind)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) -> scores (Q, k), keys (Q, k); key -1 pads when fewer than k match."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if allowed is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            params = (faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe) if self.kind != "flat"
                      else faiss.SearchParameters(sel=sel))
            return self.index.search(q, k, params=params)  # selectors run on the CPU index
        if self.kind != "flat":
            faiss.extract_index_ivf(self.index).nprobe = self.nprobe
        return self._searcher().search(q, k)

    def _searcher(self) -> faiss.Index:
        if not gpu_available():
            return self.index
        if self._gpu is None:
            self._res = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._res, 0, self.index)
        return self._gpu

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write atomically: the index file first, then the sidecar that vouches for it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".faiss.tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path.with_suffix(".faiss"))
        side = path.with_suffix(".json.tmp")
        side.write_text(json.dumps({"table_version": self.table_version, "kind": self.kind, "ntotal": self.ntotal,
                                    "d": self.index.d, "weights": self.weights}))
        os.replace(side, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: Path) -> "VectorIndex | None":
        try:
            side = json.loads(path.with_suffix(".json").read_text())
            index = faiss.read_index(str(path.with_suffix(".faiss")))
        except (OSError, ValueError, RuntimeError):
            return None
        if index.ntotal != side.get("ntotal") or index.d != side.get("d"):
            return None  # sidecar and index written by different runs
        return cls(index=index, table_version=side["table_version"], kind=side["kind"], weights=side.get("weights", ""))


def index_path(store: ImageStore, column: str) -> Path:
    return store.root / "ann" / column


def load_fresh(store: ImageStore, column: str, ivf_threshold: int = IVF_THRESHOLD) -> tuple[VectorIndex, bool]:
    """The index for `column`, rebuilt and saved if missing or behind the table. -> (index, rebuilt)."""
    path = index_path(store, column)
    version = store.version
    weights = store.meta["weights"]
    dim = store.table.schema.field(column).type.list_size
    cached = VectorIndex.load(path)
    # The version alone is not enough: a table deleted and rebuilt (other model) restarts its numbering.
    if cached is not None and (cached.table_version, cached.weights, cached.index.d) == (version, weights, dim):
        return cached, False
    keys, vectors = store.vectors(column)
    fresh = VectorIndex.build(keys, vectors, version, ivf_threshold)
    fresh.weights = weights
    fresh.save(path)
    return fresh, True


def index_state(store: ImageStore, column: str) -> dict:
    """For `simsearch info`: whether the saved index matches the table."""
    cached = VectorIndex.load(index_path(store, column))
    if cached is None:
        return {"state": "missing"}
    fresh = cached.table_version == store.version and cached.weights == store.meta["weights"]
    return {"state": "fresh" if fresh else "stale (rebuilt on next query)", "kind": cached.kind,
            "ntotal": cached.ntotal, "table_version": cached.table_version}
