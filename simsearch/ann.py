"""FAISS indexes derived from the LanceDB table: one per vector column, cosine (inner product on
unit vectors). Never answers from a stale index, and keeps up with the table at the cost of what
changed, not of the table.

Kinds, by size (chosen by measurement, benchmarks/results/scale.md):
- flat (exact) below `ivf_threshold` rows;
- above it an inverted file `IVF<nlist>,<IVF_CODEC>` with nlist ~ NLIST_PER_SQRT * sqrt(n) lists and
  `nprobe` probed per query (default max(16, nlist / PROBE_FRACTION): at 1M rows of the hard
  benchmark set 4,000 lists probed 160 at a time find 0.969 of the true top 10 in 4.4 ms on 2 cores,
  where 1,000 lists needed 13 ms for 0.975 on one), and a hash-table direct map so rows are removed by key
  in O(removed). A single query that scans many lists splits them over the cores (SPLIT_SCAN).

Incremental maintenance: the store logs every key whose payload row changes (store.changed_since).
An index that reflects payload version V catches up by re-reading only those keys' vectors:
removed by key, added back if still present. Retraining (a full rebuild) happens only when the
kind no longer fits the size or the coarse quantizer no longer fits the data (RETRAIN rule, see
`VectorIndex.retrain_reason`):
- rows >= 2x the rows it was trained on (nlist should grow with sqrt(n)), or <= 1/4 of them;
- flat reaching `ivf_threshold`, or IVF falling below half of it;
- at least max(DRIFT_MIN_ROWS, 10% of the training rows) added since training whose mean squared
  distance to their nearest centroid exceeds the training rows' by DRIFT_RATIO (20%).

On disk (`ROOT/ann/<column>.*`): a base index file written by a full save and a chain of small
delta files (keys removed, keys and vectors added) written by each catch-up; the sidecar (replaced
atomically) names each file with its blake2b digest and the table version the whole chain reflects.
An index is used only if every file is the one the sidecar vouches for. The chain is folded into a
new base when its rows exceed MERGE_FRACTION of the index or MAX_DELTAS files. Concurrent writers
serialise on a file lock; every file has a unique name, so they never interleave.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .store import ImageStore

IVF_THRESHOLD = 50_000  # below this an exact search over all vectors is fast enough (< 10 ms at 10k x 384)
NPROBE: int | None = None  # IVF lists searched per query; None: by the number of lists (`probes`)
NLIST_PER_SQRT = 4.0  # nlist = NLIST_PER_SQRT * sqrt(n): 4,000 lists at 1M rows
PROBE_FRACTION = 25  # default nprobe: this fraction of the lists (benchmarks/results/scale.md)
TRAIN_PER_LIST = 64  # k-means sample: this many vectors per list (FAISS wants >= 39)
IVF_CODEC = "Flat"  # FAISS encoding of the vectors in the lists ("Flat" exact, "SQ8" 4x smaller)
EXACT_FILTER_ROWS = 4096  # a --where set this small is scored exactly from its stored vectors
DRIFT_MIN_ROWS = 1000
DRIFT_RATIO = 1.2
MERGE_FRACTION = 0.25
BUSY_WAIT_S = 0.2  # how long a query waits for a writer's lock before answering from the index it has
MAX_DELTAS = 32
# Fewer queries than this run FAISS on one thread: OpenMP's fork/join for a single query cost 36 ms
# instead of 1 ms at 10k rows on a busy 2-core machine (benchmarks/results/speed.md, scale.md)...
PARALLEL_QUERIES = 16
# ...unless one IVF query scans at least this many vectors: then its lists are split over the threads
# (FAISS parallel_mode 1), 5.8 -> 3.5 ms for 31k vectors of 384-d at 1M rows on 2 cores.
SPLIT_SCAN = 20_000


@contextmanager
def _omp_threads(threads: int | None):
    """FAISS runs on `threads` OpenMP threads inside the block (None: as configured)."""
    before = faiss.omp_get_max_threads()
    if threads is None or threads >= before:
        yield
        return
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def want_kind(n: int, ivf_threshold: int, current: str | None = None) -> str:
    """flat or ivf for n rows; an IVF index stays IVF down to half the threshold (no flapping)."""
    if current == "ivf":
        return "ivf" if n >= ivf_threshold // 2 else "flat"
    return "ivf" if n >= ivf_threshold else "flat"


def nlist_for(n: int) -> int:
    return max(1, min(int(NLIST_PER_SQRT * np.sqrt(n)), n // 39))


@dataclass
class VectorIndex:
    index: faiss.Index  # CPU index with ids = store keys
    table_version: int
    kind: str  # "flat" | "ivf"
    nlist: int = 0
    nprobe: int | None = NPROBE
    weights: str = ""  # fingerprint of the model whose vectors these are
    table_uuid: str = ""  # the payload table's identity (a table deleted and recreated restarts its versions)
    trained_n: int = 0  # rows when the quantizer was trained
    train_error: float = 0.0  # their mean squared distance to the nearest centroid
    added_n: int = 0  # vectors added since training, and the sum of their squared distances
    added_error: float = 0.0
    files: list[dict] = field(default_factory=list)  # on disk: base then deltas, {"file", "digest", "rows"}
    _gpu: faiss.Index | None = None
    _centroids: np.ndarray | None = None

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def probes(self) -> int:
        """Lists searched per query: `nprobe`, or by default 1 in PROBE_FRACTION lists (at least 16)."""
        return min(self.nlist, self.nprobe or max(16, -(-self.nlist // PROBE_FRACTION)))

    @property
    def d(self) -> int:
        return self.index.d

    @classmethod
    def build(cls, keys: np.ndarray, vectors: np.ndarray, table_version: int,
              ivf_threshold: int = IVF_THRESHOLD) -> "VectorIndex":
        n, d = vectors.shape if vectors.size else (0, 1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if want_kind(n, ivf_threshold) == "flat":
            vi = cls(index=faiss.IndexIDMap2(faiss.IndexFlatIP(d)), table_version=table_version, kind="flat")
        else:
            nlist = nlist_for(n)
            index = faiss.index_factory(d, f"IVF{nlist},{IVF_CODEC}", faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)  # training sample is seeded: rebuilds are reproducible
            sample = vectors[np.sort(rng.choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False))]
            index.train(sample)
            index.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids by key without a scan
            vi = cls(index=index, table_version=table_version, kind="ivf", nlist=nlist, trained_n=n)
            vi.train_error = float(vi.quantisation_error(sample).mean())
        if n:
            vi.index.add_with_ids(vectors, keys)
        return vi

    # -- incremental -------------------------------------------------------------------------
    def quantisation_error(self, vectors: np.ndarray) -> np.ndarray:
        """Squared distance of each vector to its nearest IVF centroid."""
        ivf = faiss.extract_index_ivf(self.index)
        if self._centroids is None:
            self._centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        _, nearest = ivf.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        return ((vectors - self._centroids[nearest[:, 0]]) ** 2).sum(1)

    def apply(self, changed: np.ndarray, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Bring the rows of `changed` keys up to date: remove them all, add back those still in the
        table (`keys`, `vectors`)."""
        changed = np.ascontiguousarray(changed, dtype=np.int64)
        if len(changed):
            self.index.remove_ids(faiss.IDSelectorArray(changed))
        if len(keys):
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            self.index.add_with_ids(vectors, np.ascontiguousarray(keys, dtype=np.int64))
            if self.kind == "ivf":
                self.added_n += len(keys)
                self.added_error += float(self.quantisation_error(vectors).sum())
        self._gpu = None

    def retrain_reason(self, ivf_threshold: int) -> str | None:
        """Why this index must be rebuilt from scratch (module docstring), or None."""
        n = self.ntotal
        if want_kind(n, ivf_threshold, self.kind) != self.kind:
            return f"{n} rows call for a {want_kind(n, ivf_threshold, self.kind)} index"
        if self.kind == "flat":
            return None
        if n >= 2 * self.trained_n or 4 * n <= self.trained_n:
            return f"{n} rows, trained on {self.trained_n}"
        if self.added_n >= max(DRIFT_MIN_ROWS, self.trained_n // 10) and \
                self.added_error / self.added_n > DRIFT_RATIO * self.train_error:
            return f"drift: new rows' quantisation error {self.added_error / self.added_n:.4f} vs {self.train_error:.4f}"
        return None

    # -- search ------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) -> scores (Q, k), keys (Q, k); key -1 pads when fewer than k match.

        With `allowed` (keys), only those rows count; an IVF search starts from as many lists as
        scan as many allowed rows as an unfiltered search scans rows (probes / selectivity), and
        probes more until every query has min(k, len(allowed)) hits (all lists probed is exact)."""
        split = self.kind == "ivf" and len(queries) < PARALLEL_QUERIES and self.scan_size() >= SPLIT_SCAN
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).parallel_mode = 1 if split else 0
        with _omp_threads(None if split or len(queries) >= PARALLEL_QUERIES else 1):
            return self._search(np.ascontiguousarray(queries, dtype=np.float32), k, allowed)

    def scan_size(self) -> int:
        """Vectors one query compares against: all of them, or the probed lists' share."""
        return self.ntotal if self.kind == "flat" else self.ntotal * self.probes // max(self.nlist, 1)

    def _search(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if allowed is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            if self.kind == "flat":
                return self.index.search(q, k, params=faiss.SearchParameters(sel=sel))  # selectors run on the CPU index
            want = min(k, len(allowed))
            nprobe = min(self.nlist, -(-self.probes * self.ntotal // max(len(allowed), 1)))
            while True:
                scores, keys = self.index.search(q, k, params=faiss.SearchParametersIVF(sel=sel, nprobe=nprobe))
                if nprobe >= self.nlist or (keys[:, :want] >= 0).all():
                    return scores, keys
                nprobe = min(self.nlist, 4 * nprobe)
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = self.probes
        return self._searcher().search(q, k)

    def _searcher(self) -> faiss.Index:
        if not gpu_available():
            return self.index
        if self._gpu is None:
            self._res = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._res, 0, self.index)
        return self._gpu

    # -- persistence -------------------------------------------------------------------------
    def sidecar(self) -> dict:
        return {"files": self.files, "table_version": self.table_version, "kind": self.kind, "nlist": self.nlist,
                "codec": IVF_CODEC if self.kind == "ivf" else "Flat", "ntotal": self.ntotal, "d": self.d,
                "weights": self.weights, "table_uuid": self.table_uuid, "trained_n": self.trained_n,
                "train_error": self.train_error, "added_n": self.added_n, "added_error": self.added_error}

    def save(self, path: Path) -> None:
        """Write the whole index as a new base under a name of its own, then the sidecar."""
        path.parent.mkdir(parents=True, exist_ok=True)
        file = _unique(path, ".faiss")
        faiss.write_index(self.index, str(file))
        self.files = [{"file": file.name, "digest": _digest(file), "rows": self.ntotal}]
        self._write_sidecar(path)

    def save_delta(self, path: Path, changed: np.ndarray, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Append one catch-up to the chain (or fold the chain into a new base when it is long)."""
        delta_rows = sum(f["rows"] for f in self.files[1:]) + len(changed) + len(keys)
        if not self.files or len(self.files) > MAX_DELTAS or delta_rows > MERGE_FRACTION * max(self.ntotal, 1):
            return self.save(path)
        file = _unique(path, ".delta.npz")
        with open(file, "wb") as f:
            np.savez(f, changed=changed.astype(np.int64), keys=keys.astype(np.int64),
                     vectors=np.asarray(vectors, np.float32).reshape(len(keys), self.d))
        self.files = [*self.files, {"file": file.name, "digest": _digest(file), "rows": len(changed) + len(keys)}]
        self._write_sidecar(path)

    def _write_sidecar(self, path: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".json.tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self.sidecar(), f)
        os.replace(tmp, path.with_suffix(".json"))
        keep = {f["file"] for f in self.files}
        for old in [*path.parent.glob(f"{path.name}.*.faiss"), *path.parent.glob(f"{path.name}.*.delta.npz")]:
            if old.name not in keep:
                old.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, current: "VectorIndex | None" = None) -> "VectorIndex | None":
        """The saved index, or None when it is missing, damaged or not the files its sidecar vouches
        for. `current` (an index of this path in memory) is reused when the sidecar's chain extends
        its own: only the new deltas are read."""
        try:
            side = read_sidecar(path)
            files = side["files"]
            mine = current.files if current is not None else []
            if mine and files[:len(mine)] == mine:
                vi, todo = current, files[len(mine):]
            else:
                base = _verified(path.parent, files[0])
                vi = cls(index=faiss.read_index(str(base)), table_version=0, kind=side["kind"])
                todo = files[1:]
            for entry in todo:
                with np.load(_verified(path.parent, entry)) as delta:
                    vi.apply(delta["changed"], delta["keys"], delta["vectors"])
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, EOFError):
            return None
        if (vi.ntotal, vi.d) != (side.get("ntotal"), side.get("d")):
            return None
        for name in ("table_version", "kind", "nlist", "weights", "table_uuid", "trained_n", "train_error",
                     "added_n", "added_error", "files"):
            setattr(vi, name, side[name])
        return vi


def read_sidecar(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def _unique(path: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _verified(folder: Path, entry: dict) -> Path:
    file = folder / entry["file"]
    if _digest(file) != entry["digest"]:
        raise ValueError(f"{file}: not the file the sidecar vouches for")
    return file


def _digest(file: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def index_path(store: ImageStore, column: str) -> Path:
    return store.root / "ann" / column


def _identity(store: ImageStore, column: str) -> tuple:
    # The version alone is not enough: a table deleted and rebuilt (other model) restarts its numbering.
    return store.meta["weights"], store.meta.get("uuid", ""), store.schema.field(column).type.list_size


def _compatible(vi: "VectorIndex | None", store: ImageStore, column: str) -> bool:
    return vi is not None and (vi.weights, vi.table_uuid, vi.d) == _identity(store, column)


def _fresh(vi: "VectorIndex | None", store: ImageStore, column: str) -> bool:
    return _compatible(vi, store, column) and vi.table_version == store.version


def load_fresh(store: ImageStore, column: str, ivf_threshold: int = IVF_THRESHOLD,
               current: VectorIndex | None = None, wait: bool = True) -> tuple[VectorIndex, bool]:
    """The index for `column` at the table's version -> (index, rebuilt in full).

    `current` is this process's copy, if any. A stale index catches up with the rows logged since
    its version and saves them as a delta; it is rebuilt in full only when missing, damaged, of
    another table, older than the log, or due for retraining.

    Catching up needs a moment between two of a writer's commits (the store's lock). A reader that
    does not `wait` gets the index as it is (consistent at its own, older version) when an index run
    holds the lock for more than BUSY_WAIT_S: a writer that commits back to back would otherwise keep
    a query waiting for the whole run. It catches up on a later call."""
    from filelock import FileLock, Timeout

    path = index_path(store, column)
    if _fresh(current, store, column):
        return current, False
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):  # one writer at a time; the next finds it fresh
        store.refresh()
        vi = VectorIndex.load(path, current)
        if _fresh(vi, store, column):
            return vi, False
        try:  # read before the rows: later changes are logged after it
            version = store.stable_version(timeout=None if wait else BUSY_WAIT_S)
        except Timeout:
            if _compatible(vi, store, column):
                return vi, False
            version = store.stable_version()  # nothing to answer from yet
        changed = store.changed_since(vi.table_version) if _compatible(vi, store, column) else None
        if changed is not None:
            keys, vectors = store.vectors_of(changed, column)
            vi.apply(changed, keys, vectors)
            vi.table_version = version
            if vi.retrain_reason(ivf_threshold) is None:
                vi.save_delta(path, changed, keys, vectors)
                return vi, False
        keys, vectors = store.vectors(column)
        fresh = VectorIndex.build(keys, vectors, version, ivf_threshold)
        fresh.weights, fresh.table_uuid, _ = _identity(store, column)
        fresh.save(path)
    return fresh, True


def index_state(store: ImageStore, column: str) -> dict:
    """For `simsearch info`: whether the saved index matches the table (reads only the sidecar)."""
    try:
        side = read_sidecar(index_path(store, column))
    except (OSError, ValueError):
        return {"state": "missing"}
    fresh = (side.get("table_version"), side.get("weights"), side.get("table_uuid")) == (
        store.version, store.meta["weights"], store.meta.get("uuid", ""))
    state = {"state": "fresh" if fresh else "stale (brought up to date on next query)", "kind": side.get("kind"),
             "ntotal": side.get("ntotal"), "table_version": side.get("table_version")}
    if side.get("kind") == "ivf":
        state |= {"nlist": side["nlist"], "codec": side["codec"], "trained_n": side["trained_n"],
                  "deltas": len(side["files"]) - 1}
    return state
