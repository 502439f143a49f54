"""Region search: the images that contain a region of a query image.

A pooled vector of a whole image does not find the picture that holds the query's region at 1/16 of
its area, nor the one it was pasted into. The region index holds every image's patch keys (the
descriptors verification matches: rerank.scores.patch_set, the positional prior subtracted) pooled
to at most REGION_GRID x REGION_GRID cells, one FAISS vector per cell (pooling 2 x 2 to 8 x 8 cells
lost a third of the hits at 1/4 of the target's area on the copy-detection proxy). A query region is described
at several input sizes (QUERY_SIZES: at one of them its cells cover what a target's cells cover),
every cell retrieves its nearest cells, and an image scores the mean over the region's cells of
their best similarity in it (MaxSim, as ColBERT scores late interaction), the best size counting.
The top images then go to the verified reranker with the region as the query, which verifies a
region by aligning its grid over each candidate's at each of those sizes (rerank.verify.align_translation).

Ids: cell c of the row whose key is k has id (k with its low CELL_BITS bits replaced by c), so the
rows of a set of ids are found again by key range (store.rows_by_prefix), and a changed row's stale
ids follow from its key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .ann import TRAIN_PER_LIST, VectorIndex, nlist_for, want_kind
from .catchup import Source

CELL_BITS = 8
REGION_GRID = 16  # cells per side at most: 256 per image (1 << CELL_BITS); a 224 px ViT-S/14 grid as it is
QUERY_SIZES = (56, 84, 112, 168, 224)  # input sides a query region is described at
CELL_K = 64  # nearest cells each query cell retrieves
# Images a region query verifies (its cell search ranks the target in the top 50 / 100 / 200 for 78 /
# 85 / 95 % of the proxy's tuning regions of 1/16): 50, 75, 100 gave R@1 at 1/16 66.1 / 71.2 / 69.5 %,
# pasted 1/4 22.2 / 33.3 / 38.9 % on those regions (README "Region queries"), for ~0.2 s more than 50.
CANDIDATES = 100
READ_ROWS = 256  # rows read (and projected) at a time when the index is built: bounds the memory
TRAIN_CELLS = 256 * 1024  # cells the quantisers are trained on (the first rows')


def cell_ids(keys: np.ndarray, cells: int) -> np.ndarray:
    """(B,) row keys -> (B * cells,) ids, row-major: each key with its low bits replaced by the cell."""
    base = (np.asarray(keys, dtype=np.int64) >> CELL_BITS) << CELL_BITS
    return (base[:, None] | np.arange(cells, dtype=np.int64)).reshape(-1)


def prefix_of(ids: np.ndarray) -> np.ndarray:
    """The row part of ids (or keys): what cell ids of one row share."""
    return np.asarray(ids, dtype=np.int64) >> CELL_BITS


def pool_factor(grid: tuple[int, int]) -> int:
    """The pooling that brings a stored grid down to at most REGION_GRID cells a side."""
    return max(1, -(-max(grid) // REGION_GRID))


def maxsim(scores: np.ndarray, ids: np.ndarray) -> dict[int, float]:
    """Late-interaction scores of the images behind retrieved cells.

    scores, ids (Q, K): each query cell's nearest cells (id -1: none). -> {row prefix: mean over the
    Q query cells of the best similarity among that row's retrieved cells (0 where none was)}."""
    q = len(scores)
    valid = ids >= 0
    rows = prefix_of(ids)[valid]
    cell = np.broadcast_to(np.arange(q)[:, None], ids.shape)[valid]
    sims = np.maximum(np.asarray(scores, np.float64)[valid], 0.0)
    order = np.lexsort((-sims, cell, rows))  # by row, then query cell, best first
    rows, cell, sims = rows[order], cell[order], sims[order]
    first = np.ones(len(rows), bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cell[1:] != cell[:-1])  # each (row, query cell)'s best
    uniq, inverse = np.unique(rows[first], return_inverse=True)
    total = np.bincount(inverse, weights=sims[first]) / q
    return dict(zip(uniq.tolist(), total.tolist()))


# -- descriptors -------------------------------------------------------------------------------
class RegionDescriber:
    """Region cells of stored rows and of query regions, from one backbone and the table's prior."""

    def __init__(self, backbone, layer, prior):
        self.backbone, self.layer, self.prior = backbone, layer, prior

    def cells(self, dense: np.ndarray, sizes=None):
        """Stored sources (B, T, C) -> unit cell vectors (B, cells, C) float32 on the pooled grid."""
        import torch

        from .rerank.scores import patch_set

        with torch.inference_mode():
            ps = patch_set(self.backbone, self.layer, dense, np.ones((len(dense), 2)) if sizes is None else sizes, self.prior)
            return ps.pooled(pool_factor(ps.grid)).desc.numpy()

    def cells_of_views(self, views: list[np.ndarray], size) -> list[np.ndarray]:
        """A query's dense tensors at several input sizes (T_i, C) -> its cells at each, as stored
        grids are pooled (a whole image's query meets regions of others at their scale)."""
        import torch

        from .rerank.scores import _regrid, patch_set

        factor, out = pool_factor((round(self.prior.shape[0] ** 0.5),) * 2), []
        with torch.inference_mode():
            for dense in views:
                cells = dense.shape[0] - self.backbone.prefix_tokens
                ps = patch_set(self.backbone, self.layer, dense[None], [size], _regrid(self.prior, cells))
                out.append((ps.pooled(factor) if min(ps.grid) >= 2 * factor else ps).desc[0].numpy())
        return out

    def query_sides(self, first_side: int) -> list[int]:
        """Input sides a query region is described at (Embedder.dense_view), `first_side` first, then
        every QUERY_SIZES side: the cells meet stored grids at the region's scale, and verification
        gets the same tensors as its scale views."""
        return list(dict.fromkeys(self.backbone.view_size(s) for s in (first_side, *QUERY_SIZES)))


# -- the FAISS index ---------------------------------------------------------------------------
IVF_CELLS = 50_000  # below: exact over 8-bit codes (384 B a cell); above: an inverted file
PQ_CELLS = 256 * 20_000  # above ~20k images the lists hold product-quantised cells (PQ_BYTES a cell)
PQ_BYTES = 48
# An image has 256 cells, so the lists are fewer than the vector indexes' 4 x sqrt(n): building costs
# cells x lists (k-means, then assigning every cell), and with 4 x sqrt(n) a 10,000-image index
# (2.56M cells, 6,400 lists) did not finish in 15 minutes on 2 cores.
NLIST_PER_SQRT = 1.0
HNSW_LISTS = 1024  # from this many lists on, cells find their list through an HNSW graph of the centroids
PROBES = 32  # lists a query cell scans: its cost grows with sqrt(cells), not with the table


def region_nlist(n_vectors: int) -> int:
    return nlist_for(n_vectors, NLIST_PER_SQRT)


def train_cells(n_vectors: int) -> int:
    """Cells the quantisers of an index for about `n_vectors` cells are trained on: the vector
    indexes' sample per list, at most TRAIN_CELLS."""
    return min(TRAIN_CELLS, TRAIN_PER_LIST * region_nlist(n_vectors))


def empty_index(d: int, n_vectors: int, ivf_threshold: int = IVF_CELLS):
    """An untrained FAISS index for about `n_vectors` region cells -> (faiss index, kind, nlist)."""
    import faiss

    if want_kind(n_vectors, ivf_threshold) == "flat":
        return faiss.IndexIDMap2(faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)), "flat", 0
    nlist = region_nlist(n_vectors)
    codec = f"PQ{PQ_BYTES}" if n_vectors >= PQ_CELLS else "SQ8"
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_LISTS else f"IVF{nlist}"
    index = faiss.index_factory(d, f"{coarse},{codec}", faiss.METRIC_INNER_PRODUCT)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)  # stale cells removed by id without a scan
    return index, "ivf", nlist


@dataclass(frozen=True)
class RegionSource(Source):
    """The region index's source (simsearch.catchup): every row's cells, from its stored dense tensor.
    `describe` turns payload rows (dense, width, height) into cell vectors (B, cells, C)."""

    column: str = "dense"
    describe: Callable[[list[dict]], np.ndarray] | None = field(default=None, compare=False)
    d: int = 0

    @property
    def name(self) -> str:
        return "region"

    def dim(self, store) -> int:
        return self.d

    def _ids_vectors(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, self.d), np.float32)
        cells = self.describe(rows)  # (B, P, C)
        return cell_ids(np.array([r["key"] for r in rows]), cells.shape[1]), cells.reshape(-1, self.d)

    def read_keys(self, store, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._ids_vectors(list(store.find(keys, ["dense", "width", "height"]).values()))

    def stale_ids(self, keys: np.ndarray) -> np.ndarray:
        return cell_ids(keys, 1 << CELL_BITS)

    def build(self, store, ivf_threshold: int, version: int | None = None) -> VectorIndex:
        """Read (at `version`), describe and add the table READ_ROWS rows at a time; train on the
        first rows' cells (train_cells of them)."""
        n_vectors = store.count(version) * (1 << CELL_BITS)
        index, kind, nlist = empty_index(self.d, n_vectors, ivf_threshold)
        sample = train_cells(n_vectors)
        vi = VectorIndex(index=index, kind=kind, nlist=nlist)
        pending: list[tuple[np.ndarray, np.ndarray]] = []

        def train() -> None:
            sample = np.concatenate([v for _, v in pending])
            index.train(sample)
            if kind == "ivf":
                vi.train_error = float(vi.quantisation_error(sample).mean())
            for ids, vectors in pending:
                index.add_with_ids(vectors, ids)
            pending.clear()

        for batch in store.batches(["key", "dense", "width", "height"], READ_ROWS, version):
            ids, vectors = self._ids_vectors(batch.to_pylist())
            if index.is_trained:
                index.add_with_ids(vectors, ids)
                continue
            pending.append((ids, vectors))
            if sum(len(i) for i, _ in pending) >= sample:
                train()
        if pending:  # a table smaller than the training sample
            train()
        vi.trained_n = index.ntotal
        return vi
