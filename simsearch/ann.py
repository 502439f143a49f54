"""FAISS indexes derived from the LanceDB table: one per vector column, cosine (inner product on
unit vectors), exact below `IVF_THRESHOLD` rows and IVF above. Each saved index records the table
version it reflects; `load_fresh` rebuilds it whenever the table has moved on, so a search never
answers from a stale index.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .store import ImageStore

IVF_THRESHOLD = 50_000  # below this an exact search over all vectors is fast enough (< 10 ms at 10k x 384)
NPROBE = 16  # IVF lists searched per query


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class VectorIndex:
    index: faiss.Index  # CPU index with ids = store keys
    table_version: int
    kind: str  # "flat" | "ivf<nlist>"
    nprobe: int = NPROBE
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
        """Write the index under a name of its own, then the sidecar that vouches for it.

        Every build writes a new uniquely named file and the sidecar (replaced atomically) names it
        with its digest, so two processes saving at once can never pair one's sidecar with the
        other's index; superseded files are removed afterwards.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".faiss", dir=path.parent)
        os.close(fd)
        faiss.write_index(self.index, tmp)
        side = {"file": Path(tmp).name, "digest": _digest(Path(tmp)), "table_version": self.table_version,
                "kind": self.kind, "ntotal": self.ntotal, "d": self.index.d, "weights": self.weights}
        fd, side_tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".json.tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(side, f)
        os.replace(side_tmp, path.with_suffix(".json"))
        for old in path.parent.glob(f"{path.name}.*.faiss"):
            if old.name != side["file"]:
                old.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> "VectorIndex | None":
        """The saved index, or None when it is missing, damaged or not the file its sidecar vouches for."""
        try:
            side = json.loads(path.with_suffix(".json").read_text())
            file = path.parent / side["file"]
            if _digest(file) != side["digest"]:
                return None
            index = faiss.read_index(str(file))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            return None
        if (index.ntotal, index.d) != (side.get("ntotal"), side.get("d")):
            return None
        return cls(index=index, table_version=side["table_version"], kind=side["kind"], weights=side.get("weights", ""))


def _digest(file: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def index_path(store: ImageStore, column: str) -> Path:
    return store.root / "ann" / column


def _matches(cached: "VectorIndex | None", store: ImageStore, column: str) -> bool:
    # The version alone is not enough: a table deleted and rebuilt (other model) restarts its numbering.
    dim = store.table.schema.field(column).type.list_size
    return cached is not None and (cached.table_version, cached.weights, cached.index.d) == (
        store.version, store.meta["weights"], dim)


def load_fresh(store: ImageStore, column: str, ivf_threshold: int = IVF_THRESHOLD) -> tuple[VectorIndex, bool]:
    """The index for `column`, rebuilt and saved if missing or behind the table. -> (index, rebuilt)."""
    from filelock import FileLock

    path = index_path(store, column)
    cached = VectorIndex.load(path)
    if _matches(cached, store, column):
        return cached, False
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):  # one rebuild at a time; the next finds it fresh
        store.refresh()
        cached = VectorIndex.load(path)
        if _matches(cached, store, column):
            return cached, False
        version = store.version  # read before the rows: a commit in between makes the index stale, not wrong
        keys, vectors = store.vectors(column)
        fresh = VectorIndex.build(keys, vectors, version, ivf_threshold)
        fresh.weights = store.meta["weights"]
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
