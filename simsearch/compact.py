"""A compact index for a wide vector column. The default style vector is 5,184 floats (20.7 KB a
row): held as it is, a million rows take 21 GB in FAISS, and a rebuild that reads the whole column
twice that. From PROJECT_ROWS rows on, the index stores every vector projected to PROJECT_DIM dims
by a PCA fitted on the table, and from the IVF threshold on as 8-bit codes (CODEC) in an inverted
file: 768 bytes a row. A search ranks the top `rescored(n)` candidates of the compact index by their
exact cosine, read from the table at the version the index reflects.

The PCA is uncentred (the leading eigenvectors of the vectors' second moment, not their covariance):
the search ranks inner products, and a centred projection changes each row's inner product with a
query by a term of its own (its product with the mean), which changes the ranking.

Built in chunks of catchup.READ_ROWS rows read at one table version, never the whole column: the projection
is fitted on FIT_ROWS rows and the IVF's quantizer on its training sample (projected as it is read).
Refitted by the rule that retrains an IVF (catchup.retrain_reason: 2x or 1/4 the rows it was fitted
on, or drift), which a projected flat index follows as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ann import VectorIndex
from .catchup import Source, sample_rows

PROJECT_ROWS = 8192  # below: the vectors as they are (170 MB of style vectors at most)
PROJECT_DIM = 768  # dims kept: 1/6.75 of the style vector
FIT_ROWS = 8192  # rows the projection is fitted on
CODEC = "SQ8"  # an IVF's lists hold 8-bit codes of the projected vectors
# Candidates re-scored exactly: max(RESCORE_MIN, n / RESCORE_PER) up to RESCORE_MAX. At 1M rows of
# the style set, 1,000 found the exact top 10 (benchmarks/results/style_index.md).
RESCORE_MIN, RESCORE_PER, RESCORE_MAX = 256, 1000, 4096


def fit_projection(sample: np.ndarray, dim: int) -> np.ndarray:
    """(N, D) vectors -> (dim, D) orthonormal rows: the leading eigenvectors of sample.T @ sample,
    largest first (an uncentred PCA)."""
    from scipy.linalg import eigh

    x = np.asarray(sample, np.float32)  # float32 throughout: the (D, D) moment is 107 MB at D = 5,184
    d = x.shape[1]
    _, vectors = eigh(x.T @ x, subset_by_index=[d - dim, d - 1], driver="evr", overwrite_a=True)  # ascending
    return np.ascontiguousarray(vectors[:, ::-1].T, dtype=np.float32)


def rescored(n: int) -> int:
    return min(RESCORE_MAX, max(RESCORE_MIN, n // RESCORE_PER))


@dataclass(frozen=True)
class CompactSource(Source):
    """A `Source` (simsearch.catchup) whose index is compact once the table is large enough."""

    project_rows: int = PROJECT_ROWS
    project_dim: int = PROJECT_DIM

    def projects(self, store, n: int, current: VectorIndex | None = None) -> bool:
        """Whether an index of n rows projects; a projected one stays so down to half the threshold."""
        floor = self.project_rows // 2 if current is not None and current.project else self.project_rows
        return self.dim(store) > self.project_dim and n >= floor

    def create_index(self, store, n: int, ivf_threshold: int, rng: np.random.Generator, version: int | None) -> VectorIndex:
        """Projected from PROJECT_ROWS rows on (the projection fitted on FIT_ROWS of them), SQ8 codes in an IVF."""
        if not self.projects(store, n):
            return super().create_index(store, n, ivf_threshold, rng, version)
        fit = self.take(store, sample_rows(rng, n, FIT_ROWS), version)
        vi = VectorIndex.create(self.dim(store), n, ivf_threshold, codec=CODEC, projection=fit_projection(fit, self.project_dim))
        vi.trained_n = n
        return vi

    def retrain_reason(self, vi: VectorIndex, ivf_threshold: int, store) -> str | None:
        n = vi.ntotal
        if self.projects(store, n, vi) != bool(vi.project):
            return f"{n} rows call for {'a' if vi.project else 'no'} projection"
        if vi.project and vi.kind == "flat" and (n >= 2 * vi.trained_n or 4 * n <= vi.trained_n):
            return f"{n} rows, projection fitted on {vi.trained_n}"
        return super().retrain_reason(vi, ivf_threshold, store)

    def candidates(self, k: int, vi: VectorIndex) -> int:
        return max(k, rescored(vi.ntotal)) if vi.project else k

    def rescore(self, store, vi: VectorIndex, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                version, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The candidates of a projected index ranked by their exact inner product with the query,
        read from the table at `version`: (Q, k) scores and ids, -1 padding."""
        if not vi.project:
            return super().rescore(store, vi, queries, scores, ids, version, k)
        out_scores, out_ids = np.full((len(ids), k), -np.inf, np.float32), np.full((len(ids), k), -1, np.int64)
        for q, (query, row) in enumerate(zip(np.asarray(queries, np.float32), ids)):
            keys, vectors = store.vectors_of(row[row >= 0], self.column, version)
            if not len(keys):
                continue
            exact = vectors @ query
            top = np.argsort(-exact, kind="stable")[:k]
            out_scores[q, :len(top)], out_ids[q, :len(top)] = exact[top], keys[top]
        return out_scores, out_ids
