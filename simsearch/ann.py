"""A FAISS vector index: ids and vectors in, nearest ids out, cosine (inner product on unit vectors).
It knows nothing of the table it is derived from; simsearch.catchup keeps one up to date with it.

Kinds, by size (chosen by measurement, benchmarks/results/scale.md):
- flat (exact) below `ivf_threshold` vectors;
- above it an inverted file `IVF<nlist>,<IVF_CODEC>` with nlist ~ NLIST_PER_SQRT * sqrt(n) lists and
  `nprobe` probed per query (default max(16, nlist / PROBE_FRACTION): at 1M rows of the hard
  benchmark set 4,000 lists probed 160 at a time find 0.969 of the true top 10 in 4.4 ms on 2 cores,
  where 1,000 lists needed 13 ms for 0.975 on one), and a hash-table direct map so vectors are
  removed by id in O(removed). A single query that scans many lists splits them over the cores
  (SPLIT_SCAN).
- either may store its vectors projected (`project` dims, a FAISS pre-transform: simsearch.compact).

An IVF holds its vectors centred (`center`, the training sample's mean): v - center goes in, and a
search adds q . center back to each score, so every query ranks the same as over v. The k-means runs on
the centred sample: on uncentred vectors, which share a mean direction (a million synthetic style rows
around real ones), a few lists near the mean took most of the rows (median list 2 vectors, p99 2,030,
at 100k rows) and a query probing 16 lists scanned 20k vectors; centred, the lists were 71 / 393 and
the scan 2.2k (README "Large collections"). Indexes written without a centre keep working uncentred.

Threads: a search and a change (`apply`) of one index never overlap (a reader/writer lock, writers
first), so a search sees the index before or after a change, whole. Nothing a search needs is
written into the shared FAISS object: nprobe goes with each call (SearchParametersIVF); a query
whose lists are split over the threads runs on a second IVF object over the same inverted lists
(`_make_split_view`, FAISS's parallel_mode being a property of the object); and a single query's
one-thread limit is the calling thread's own OpenMP setting (nthreads-var is per task), so
concurrent queries cannot change each other's.

An IVF index measures how well its coarse quantizer fits what it holds: the training vectors' mean
squared distance to their nearest centroid, and the same sum over every vector added since
(`trained_n`, `train_error`, `added_n`, `added_error`); catchup's retrain rule reads them.
"""

from __future__ import annotations

import base64
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from readerwriterlock import rwlock

IVF_THRESHOLD = 50_000  # below this an exact search over all vectors is fast enough (< 10 ms at 10k x 384)
NPROBE: int | None = None  # IVF lists searched per query; None: by the number of lists (`probes`)
NLIST_PER_SQRT = 4.0  # nlist = NLIST_PER_SQRT * sqrt(n): 4,000 lists at 1M rows
PROBE_FRACTION = 25  # default nprobe: this fraction of the lists (benchmarks/results/scale.md)
TRAIN_PER_LIST = 64  # k-means sample: this many vectors per list (FAISS wants >= 39)
IVF_CODEC = "Flat"  # FAISS encoding of the vectors in the lists ("Flat" exact, "SQ8" 4x smaller)
EXACT_FILTER_ROWS = 4096  # a --where set this small is scored exactly from its stored vectors
# Fewer queries than this run FAISS on one thread: OpenMP's fork/join for a single query cost 36 ms
# instead of 1 ms at 10k rows on a busy 2-core machine (benchmarks/results/speed.md, scale.md)...
PARALLEL_QUERIES = 16
# ...unless one IVF query scans at least this many vectors: then its lists are split over the threads
# (FAISS parallel_mode 1), 5.8 -> 3.5 ms for 31k vectors of 384-d at 1M rows on 2 cores.
SPLIT_SCAN = 20_000
META = ("kind", "nlist", "codec", "project", "trained_n", "train_error", "added_n", "added_error")  # what `meta` records besides sizes


@contextmanager
def _omp_threads(threads: int | None):
    """FAISS runs on `threads` OpenMP threads inside the block (None: as configured); the calling
    thread's setting only."""
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
    """flat or ivf for n vectors; an IVF index stays IVF down to half the threshold (no flapping)."""
    if current == "ivf":
        return "ivf" if n >= ivf_threshold // 2 else "flat"
    return "ivf" if n >= ivf_threshold else "flat"


def nlist_for(n: int, per_sqrt: float = NLIST_PER_SQRT) -> int:
    """Lists for n vectors: per_sqrt * sqrt(n), with at least 39 vectors a list (what FAISS wants)."""
    return max(1, min(int(per_sqrt * np.sqrt(n)), n // 39))


@dataclass
class VectorIndex:
    index: faiss.Index  # CPU index; ids are the caller's (simsearch: row keys)
    kind: str  # "flat" | "ivf"
    nlist: int = 0
    codec: str = "Flat"  # FAISS encoding of the vectors in the lists
    project: int = 0  # dims the vectors are stored at, projected (a FAISS pre-transform); 0: as given
    trained_n: int = 0  # vectors when the quantizer was trained
    train_error: float = 0.0  # their mean squared distance to the nearest centroid
    added_n: int = 0  # vectors added since training, and the sum of their squared distances
    added_error: float = 0.0
    version: object = None  # what the caller says the vectors reflect (simsearch: a table version), changed with them
    center: np.ndarray | None = None  # (d,) an IVF's: subtracted from what it holds, q . center added to scores
    _gpu: faiss.Index | None = None
    _centroids: np.ndarray | None = None
    _lock: rwlock.RWLockWrite = field(default_factory=rwlock.RWLockWrite, repr=False)  # searches | one change
    _gpu_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # a GPU index serves one call at a time
    _split: faiss.Index | None = None  # `_make_split_view`

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def probes(self, nprobe: int | None = None) -> int:
        """Lists searched per query: `nprobe`, or by default 1 in PROBE_FRACTION lists (at least 16)."""
        return min(self.nlist, nprobe or max(16, -(-self.nlist // PROBE_FRACTION)))

    @property
    def d(self) -> int:
        return self.index.d

    @classmethod
    def create(cls, d: int, n: int, ivf_threshold: int = IVF_THRESHOLD, nlist: int | None = None,
               codec: str = IVF_CODEC, projection: np.ndarray | None = None) -> "VectorIndex":
        """An empty index for about `n` vectors of `d` dims: flat below `ivf_threshold`, else IVF with
        `nlist` lists (default nlist_for(n)) of `codec` vectors, to be `fit` before vectors are added.
        With `projection` (P, d), each vector v is stored as projection @ v (P dims)."""
        stored_d = d if projection is None else len(projection)
        if want_kind(n, ivf_threshold) == "flat":
            inner, kind, nlist, codec = faiss.IndexIDMap2(faiss.IndexFlatIP(stored_d)), "flat", 0, "Flat"
        else:
            kind, nlist = "ivf", nlist or nlist_for(n)
            inner = faiss.index_factory(stored_d, f"IVF{nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
            inner.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids by id without a scan
        if projection is None:
            return cls(index=inner, kind=kind, nlist=nlist, codec=codec)
        linear = faiss.LinearTransform(d, stored_d, False)
        faiss.copy_array_to_vector(np.ascontiguousarray(projection, dtype=np.float32).ravel(), linear.A)
        linear.is_trained = True
        return cls(index=faiss.IndexPreTransform(linear, inner), kind=kind, nlist=nlist, codec=codec, project=stored_d)

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, ivf_threshold: int = IVF_THRESHOLD, nlist: int | None = None,
              codec: str = IVF_CODEC) -> "VectorIndex":
        """`create`, `fit` and add, from vectors in memory (benchmarks/scale.py compares other lists and
        codecs through here)."""
        n, d = vectors.shape if vectors.size else (0, 1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        vi = cls.create(d, n, ivf_threshold, nlist, codec)
        if vi.kind == "ivf":
            rng = np.random.default_rng(0)  # training sample is seeded: rebuilds are reproducible
            vi.fit(vectors[np.sort(rng.choice(n, size=min(n, vi.train_size(n)), replace=False))], n)
        if n:
            vi.add(ids, vectors)
        return vi

    def train_size(self, n: int) -> int:
        """Vectors an IVF's k-means wants (TRAIN_PER_LIST per list), at most n."""
        return min(n, TRAIN_PER_LIST * self.nlist)

    def fit(self, sample: np.ndarray, n: int) -> None:
        """Train an IVF's coarse quantizer (and codec) on `sample`, vectors as stored (`stored`), centred
        on its mean, for an index of about `n` vectors."""
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        mean = sample.mean(0)
        # given vectors are centred before the projection P: the c with P c = mean, so P (v - c) = P v - mean
        self.center = mean if not self.project else np.linalg.lstsq(self._projection(), mean, rcond=None)[0].astype(np.float32)
        self._centroids = None
        faiss.extract_index_ivf(self.index).train(sample - mean)
        self.index.is_trained = True  # a pre-transform's own flag is set when it is made, not by its parts
        self.trained_n = n
        self.train_error = float(self.quantisation_error(sample).mean())  # centres the sample itself

    def stored(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as the index stores them, before centring: projected when it projects."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.project:
            return vectors
        return faiss.downcast_VectorTransform(self.index.chain.at(0)).apply(vectors)

    def _projection(self) -> np.ndarray:
        """(project, d) the pre-transform's matrix."""
        linear = faiss.downcast_VectorTransform(self.index.chain.at(0))
        return faiss.vector_to_array(linear.A).reshape(linear.d_out, linear.d_in)

    def _centred(self, vectors: np.ndarray) -> np.ndarray:
        """Given vectors as the FAISS index takes them: less the centre."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return vectors if self.center is None else np.ascontiguousarray(vectors - self.center)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add `vectors` under `ids` (the caller orders this against searches: `apply` does)."""
        self.index.add_with_ids(self._centred(vectors), np.ascontiguousarray(ids, dtype=np.int64))

    # -- incremental -------------------------------------------------------------------------
    def quantisation_error(self, vectors: np.ndarray) -> np.ndarray:
        """Squared distance of each vector (as stored, `stored`) to its nearest IVF centroid."""
        ivf = faiss.extract_index_ivf(self.index)
        if self._centroids is None:
            self._centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        if self.center is not None:
            vectors = vectors - self.stored(self.center[None])[0]
        _, nearest = ivf.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        return ((vectors - self._centroids[nearest[:, 0]]) ** 2).sum(1)

    def apply(self, removed: np.ndarray, ids: np.ndarray, vectors: np.ndarray, version: object = None) -> None:
        """Remove the vectors of `removed` ids (those it holds), then add `vectors` under `ids`, and
        label the result `version`: one change, which no search overlaps."""
        self.apply_all([(removed, ids, vectors)], version)

    def apply_all(self, changes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], version: object = None) -> None:
        """`apply` each (removed, ids, vectors) in turn, all as one change."""
        changes = [(np.ascontiguousarray(removed, dtype=np.int64), np.ascontiguousarray(ids, dtype=np.int64),
                    np.ascontiguousarray(vectors, dtype=np.float32)) for removed, ids, vectors in changes]
        errors = [float(self.quantisation_error(self.stored(v)).sum()) if self.kind == "ivf" and len(i) else 0.0
                  for _, i, v in changes]
        with self._lock.gen_wlock():
            for (removed, ids, vectors), error in zip(changes, errors):
                if len(removed):
                    self.index.remove_ids(faiss.IDSelectorArray(removed))
                if len(ids):
                    self.add(ids, vectors)
                    self.added_n += len(ids) if self.kind == "ivf" else 0
                    self.added_error += error
            self.version = version
            self._gpu = None
            if self._split is not None:  # the view reads the same lists; only its count is its own
                faiss.extract_index_ivf(self._split).ntotal = self.index.ntotal

    # -- search ------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               nprobe: int | None = NPROBE) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) -> scores (Q, k), ids (Q, k); id -1 pads when fewer than k match. An IVF
        index probes `probes(nprobe)` lists.

        With `allowed` (ids), only those vectors count; an IVF search starts from as many lists as
        scan as many allowed vectors as an unfiltered search scans vectors (probes / selectivity),
        and probes more until every query has min(k, len(allowed)) hits (all lists probed is exact)."""
        return self.search_at(queries, k, allowed, nprobe)[:2]

    def search_at(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
                  nprobe: int | None = NPROBE) -> tuple[np.ndarray, np.ndarray, object]:
        """`search`, and the `version` the vectors it searched were labelled with."""
        q, probes = np.ascontiguousarray(queries, dtype=np.float32), self.probes(nprobe)
        split = self.kind == "ivf" and len(q) < PARALLEL_QUERIES and self.scan_size(probes) >= SPLIT_SCAN
        if split and self._split is None:
            self._make_split_view()
        with _omp_threads(None if split or len(q) >= PARALLEL_QUERIES else 1), self._lock.gen_rlock():
            scores, ids = self._search(q, k, allowed, probes, split)
            if self.center is not None:
                scores = np.where(ids >= 0, scores + (q @ self.center)[:, None], scores)
            return scores, ids, self.version

    def scan_size(self, probes: int | None = None) -> int:
        """Vectors one query compares against: all of them, or the probed lists' share."""
        return self.ntotal if self.kind == "flat" else self.ntotal * (probes or self.probes()) // max(self.nlist, 1)

    def _make_split_view(self) -> None:
        """This IVF index's quantizer (a copy) over its own inverted lists (shared, not copied), with
        each query's lists searched in parallel: made once, kept in step by `apply`.

        FAISS cannot serialise an IVF index without its lists (IO_FLAG_SKIP_IVF_DATA is ignored on
        write), and a whole copy of a 1M-row index put three more copies' worth in memory for a moment
        (load peak 6.2 GB for a 1.5 GB index). So the lists are taken out for the serialisation, under
        the write lock: no search runs on the index while it has none."""
        with self._lock.gen_wlock():
            if self._split is not None:
                return
            ivf = faiss.extract_index_ivf(self.index)
            lists, owned = ivf.invlists, ivf.own_invlists
            ivf.own_invlists = False  # replace_invlists deletes the lists it replaces when the index owns them
            empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
            ivf.replace_invlists(empty, False)
            try:
                data = faiss.VectorIOWriter()
                faiss.write_index(self.index, data)
            finally:
                ivf.replace_invlists(lists, owned)
            reader = faiss.VectorIOReader()
            reader.data = data.data
            view = faiss.read_index(reader)
            view_ivf = faiss.extract_index_ivf(view)
            view_ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # searches need no map from ids
            view_ivf.replace_invlists(lists, False)
            view_ivf.ntotal, view_ivf.parallel_mode = self.index.ntotal, 1
            self._split = view

    def _search(self, q: np.ndarray, k: int, allowed: np.ndarray | None, probes: int,
                split: bool) -> tuple[np.ndarray, np.ndarray]:
        if allowed is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            if self.kind == "flat":
                return self.index.search(q, k, params=faiss.SearchParameters(sel=sel))  # selectors run on the CPU index
            want = min(k, len(allowed))
            nprobe = min(self.nlist, -(-probes * self.ntotal // max(len(allowed), 1)))
            while True:
                scores, ids = self.index.search(q, k, params=faiss.SearchParametersIVF(sel=sel, nprobe=nprobe))
                if nprobe >= self.nlist or (ids[:, :want] >= 0).all():
                    return scores, ids
                nprobe = min(self.nlist, 4 * nprobe)
        params = faiss.SearchParametersIVF(nprobe=probes) if self.kind == "ivf" else None
        if not gpu_available():
            return (self._split if split else self.index).search(q, k, params=params)
        with self._gpu_lock:
            if self._gpu is None:
                self._res = faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._res, 0, self.index)
            return self._gpu.search(q, k, params=params)

    # -- persistence -------------------------------------------------------------------------
    def meta(self) -> dict:
        """What `read` needs besides the FAISS file, and what describes the index."""
        center = None if self.center is None else base64.b64encode(self.center.astype("<f4").tobytes()).decode()
        return {name: getattr(self, name) for name in META} | {"ntotal": self.ntotal, "d": self.d, "center": center}

    @staticmethod
    def center_of(meta: dict) -> np.ndarray | None:
        """The centre `meta` recorded (None: an uncentred index, or one written before centring)."""
        return None if meta.get("center") is None else np.frombuffer(base64.b64decode(meta["center"]), "<f4").astype(np.float32)

    def write(self, file: Path) -> None:
        faiss.write_index(self.index, str(file))

    @classmethod
    def read(cls, file: Path) -> "VectorIndex":
        """The index `write` wrote; its quantizer measurements come back with `restore`."""
        index = faiss.read_index(str(file))
        ivf = faiss.try_extract_index_ivf(index)
        project = index.index.d if isinstance(index, faiss.IndexPreTransform) else 0
        return cls(index=index, kind="flat" if ivf is None else "ivf", nlist=0 if ivf is None else ivf.nlist, project=project)

    def restore(self, meta: dict) -> None:
        """Take back the measurements `meta` recorded (when they describe an index of this size)."""
        if (meta["kind"], meta["ntotal"], meta["d"]) != (self.kind, self.ntotal, self.d):
            raise ValueError(f"a {meta['kind']} index of {meta['ntotal']} x {meta['d']} recorded, "
                             f"{self.kind} {self.ntotal} x {self.d} read")
        for name in META:
            setattr(self, name, meta.get(name, 0) if name == "project" else meta[name])  # older sidecars: no projection
        self.center = self.center_of(meta)
