"""The compact style index (simsearch.compact): an uncentred PCA and 8-bit IVF codes once the table is
large, exact re-scoring of the candidates from the table, built in chunks, refitted by rule, caught
up by deltas. Real LanceDB and FAISS on synthetic rows whose style vectors have a low-rank structure
(as real style vectors do), checked against a brute-force search in numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY
from simsearch import Index, catchup, compact
from simsearch.compact import CompactSource, fit_projection
from simsearch.embedder import DescriptorConfig
from simsearch.store import ImageStore, make_rows

D, SD, RANK = 16, 96, 24  # content dims, style dims, rank of the style vectors' structure
PROJECT_ROWS, PROJECT_DIM, IVF_AT = 300, 32, 1000


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def style_vectors(n: int, seed: int) -> np.ndarray:
    basis = np.random.default_rng(7).normal(size=(RANK, SD))
    rng = np.random.default_rng(seed)
    return unit(rng.normal(size=(n, RANK)) @ basis + 0.3 * rng.normal(size=(n, SD)))


def names(prefix: str, n: int, start: int = 0) -> list[str]:
    return [f"/data/{prefix}/{i:05d}.png" for i in range(start, start + n)]


@pytest.fixture
def table(tmp_path, tiny_model, monkeypatch):
    """An Index whose style index is compact from PROJECT_ROWS rows, read in chunks of 64 rows.
    -> (Index, put(names, style vectors))"""
    monkeypatch.setattr(catchup, "READ_ROWS", 64)
    monkeypatch.setattr(compact, "FIT_ROWS", 256)
    db = tmp_path / "db"
    store = ImageStore(db)
    conf = DescriptorConfig.for_model(str(tiny_model), **TINY)
    store.create({"config": conf.to_dict(), "weights": "synthetic", "dense_shape": [1, 1]}, D, SD)
    idx = Index(db, ivf_threshold=IVF_AT)
    source = CompactSource("style", project_rows=PROJECT_ROWS, project_dim=PROJECT_DIM)
    idx.ann_indexes["style"] = catchup.FollowedIndex(idx.store, source, IVF_AT)

    def put(paths, style):
        store.put(make_rows(paths, unit(style[:, :D]), style))

    return idx, put


def sidecar(idx: Index) -> dict:
    return json.loads(catchup.index_path(idx.store, "style").with_suffix(".json").read_text())


def brute_force(idx: Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    keys, vectors = idx.store.vectors("style")
    scores = queries @ vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), keys[top]


def test_projection_is_the_leading_right_singular_vectors():
    x = style_vectors(500, seed=0)
    p = fit_projection(x, 8)
    _, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    assert p.shape == (8, SD) and np.allclose(p @ p.T, np.eye(8), atol=1e-5)
    assert np.allclose(np.abs(np.sum(p * vt[:8], axis=1)), 1.0, atol=1e-4)  # same directions, largest first (signs free)
    # uncentred: vectors sharing a large common part project it onto the first direction (a PCA of
    # the covariance removes the mean first and would miss it)
    shared = unit(np.ones((1, SD)))[0]
    offset = fit_projection(0.2 * x + shared, 4)
    assert abs(offset[0] @ shared) > 0.99


def test_projected_ivf_finds_the_exact_top_k_with_exact_scores(table):
    idx, put = table
    put(names("a", 1200), style_vectors(1200, seed=0))
    idx.refresh_ann()
    side = sidecar(idx)
    assert (side["kind"], side["codec"], side["project"]) == ("ivf", "SQ8", PROJECT_DIM)
    queries = style_vectors(40, seed=1)
    # every list probed: what is left to lose is the projection's and the codes' (re-scoring's job)
    scores, ids, _ = idx.ann_indexes["style"].search(queries, 10, nprobe=side["nlist"])
    want_scores, want_ids = brute_force(idx, queries, 10)
    assert (ids == want_ids).all()
    assert np.allclose(scores, want_scores, atol=1e-5)  # exact inner products, not 8-bit estimates
    base = catchup.index_path(idx.store, "style").parent / side["files"][0]["file"]
    assert base.stat().st_size < 1200 * SD * 4 / 2  # far below the raw column (96 floats a row)
    hits = idx.search_vector(queries[0], 5, mode="style")  # the user's path: rows of the table
    assert [h.key for h in hits] == want_ids[0, :5].tolist() and hits[0].path.startswith("/data/a/")


def test_build_reads_the_column_in_chunks_never_whole(table, monkeypatch):
    idx, put = table
    put(names("a", 1100), style_vectors(1100, seed=0))
    reads = []
    real_take, real_batches = ImageStore.take, ImageStore.batches

    def take(self, offsets, columns, version=None):
        reads.append(len(offsets))
        return real_take(self, offsets, columns, version)

    def batches(self, columns, rows, version=None):
        for b in real_batches(self, columns, rows, version):
            reads.append(b.num_rows)
            yield b

    def whole_column(*a, **kw):
        raise AssertionError("the whole column was read")

    monkeypatch.setattr(ImageStore, "take", take)
    monkeypatch.setattr(ImageStore, "batches", batches)
    monkeypatch.setattr(ImageStore, "vectors", whole_column)
    assert idx.ann_indexes["style"].catch_up()
    assert sidecar(idx)["ntotal"] == 1100 and reads and max(reads) <= 64


def test_projection_switches_on_and_refits_by_rule(table):
    idx, put = table
    style = style_vectors(1500, seed=0)
    steps = [(250, 0, "flat", 0), (350, PROJECT_DIM, "flat", 350), (600, PROJECT_DIM, "flat", 350),
             (700, PROJECT_DIM, "flat", 700), (1100, PROJECT_DIM, "ivf", 1100)]
    done = 0
    for rows, project, kind, trained in steps:
        put(names("a", rows - done, start=done), style[done:rows])
        done = rows
        idx.refresh_ann()
        side = sidecar(idx)
        assert (side["ntotal"], side["project"], side["kind"], side["trained_n"]) == (rows, project, kind, trained)
    idx.store.delete_paths(names("a", 1000))  # 100 rows left: below half the projection's threshold
    idx.refresh_ann()
    assert (sidecar(idx)["project"], sidecar(idx)["kind"]) == (0, "flat")
    queries = style_vectors(5, seed=3)
    assert (idx.ann_indexes["style"].search(queries, 10)[1] == brute_force(idx, queries, 10)[1]).all()


def test_catch_up_by_delta_keeps_the_search_exact(table):
    idx, put = table
    style = style_vectors(1200, seed=0)
    put(names("a", 1200), style)
    idx.refresh_ann()
    base = sidecar(idx)["files"][0]
    new, moved = style_vectors(3, seed=1), style_vectors(2, seed=2)
    put(names("b", 3), new)
    put(names("a", 2), moved)  # replaced: same keys, other vectors
    idx.store.delete_paths(names("a", 4, start=10))
    assert idx.refresh_ann()["style"] is False  # caught up, not rebuilt
    side = sidecar(idx)
    assert side["files"][0] == base and len(side["files"]) == 2 and side["ntotal"] == 1200 + 3 - 4
    queries = np.concatenate([new, moved, style[10:14], style_vectors(10, seed=4)])  # deleted rows' own vectors too
    ids = idx.ann_indexes["style"].search(queries, 10, nprobe=side["nlist"])[1]
    assert (ids == brute_force(idx, queries, 10)[1]).all()
    assert [h.path for h in idx.search_vector(new[0], 1, mode="style")] == names("b", 1)


def test_deltas_fold_by_bytes_not_rows(table):
    """A delta holds vectors as the table does (96 floats a row), the compact base far fewer bytes a
    row: the chain folds once its bytes pass MERGE_FRACTION of the base's, long before its rows do."""
    idx, put = table
    put(names("a", 1200), style_vectors(1200, seed=0))
    idx.refresh_ann()
    base = sidecar(idx)["files"][0]
    per_row = SD * 4 + 16  # vector, key and change-log entry
    rows = int(catchup.MERGE_FRACTION * base["size"] / per_row) + 1
    assert rows < catchup.MERGE_FRACTION * 1200  # a rule by rows would keep the delta
    put(names("b", rows), style_vectors(rows, seed=5))
    assert idx.refresh_ann()["style"] is False  # not retrained
    side = sidecar(idx)
    assert len(side["files"]) == 1 and side["files"][0]["file"] != base["file"] and side["ntotal"] == 1200 + rows
