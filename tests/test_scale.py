"""Costs that grow with the work done: FAISS indexes that follow the change log instead of being
rebuilt, retraining only by the stated rule, filtered searches that still return k, the store's
scalar indexes, appends without deletes, and old versions cleaned up. Real LanceDB and FAISS on
synthetic rows (no model needed): vectors clustered around random centres."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from conftest import TINY, table_rows
from simsearch import Index, ann, catchup
from simsearch.embedder import DescriptorConfig
from simsearch.store import ImageStore, make_rows, path_key, under_filter

D = 16


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vectors(n: int, seed: int, centres: int = 30, spread: float = 0.4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(1000 + centres).normal(size=(centres, D))
    return unit(c[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, D)))


def synthetic_rows(names: list[str], content: np.ndarray) -> pa.Table:
    return make_rows(names, content, np.concatenate([content, content], 1) / np.sqrt(2))


@pytest.fixture
def synth(tmp_path, tiny_model):
    """An Index over a store of synthetic rows. -> (Index, put(names, vectors), threshold)"""
    db = tmp_path / "db"
    store = ImageStore(db)
    conf = DescriptorConfig.for_model(str(tiny_model), **TINY)
    store.create({"config": conf.to_dict(), "weights": "synthetic", "dense_shape": [1, 1]}, D, 2 * D)

    def put(names, vecs):
        store.put(synthetic_rows(names, vecs))

    return Index(db, ivf_threshold=1000, nprobe=2), put


def names(prefix: str, n: int, start: int = 0) -> list[str]:
    return [f"/data/{prefix}/{i:05d}.png" for i in range(start, start + n)]


def top1(index: ann.VectorIndex, vecs: np.ndarray) -> np.ndarray:
    return index.search(vecs, 1)[1][:, 0]


def sidecar(idx: Index, column="content") -> dict:
    return json.loads(catchup.index_path(idx.store, column).with_suffix(".json").read_text())


def test_incremental_add_replace_delete_without_retraining(synth):
    idx, put = synth
    base = vectors(3000, seed=0)
    put(names("a", 3000), base)
    assert idx.refresh_ann() == {"content": True, "style": True}
    before = sidecar(idx)
    assert before["kind"] == "ivf" and before["trained_n"] == 3000 and before["nlist"] > idx.nprobe

    new = vectors(200, seed=1)
    put(names("b", 200), new)  # added
    moved = vectors(20, seed=2)
    put(names("a", 20), moved)  # replaced: same keys, other vectors
    idx.store.delete_paths(names("a", 50, start=100))  # deleted
    assert idx.refresh_ann() == {"content": False, "style": False}  # caught up, not rebuilt

    after = sidecar(idx)
    assert after["files"][0] == before["files"][0]  # the trained base file is untouched
    assert len(after["files"]) == 2 and after["files"][1]["rows"] == (200 + 20 + 50) + (200 + 20)  # keys changed + rows added back
    assert (after["trained_n"], after["ntotal"], after["table_version"]) == (3000, 3150, idx.store.version)
    vi = idx.vector_index("content")
    assert vi.ntotal == 3150
    assert np.array_equal(top1(vi, new), [path_key(p) for p in names("b", 200)])
    assert np.array_equal(top1(vi, moved), [path_key(p) for p in names("a", 20)])
    gone = {path_key(p) for p in names("a", 50, start=100)}
    assert not gone & set(vi.search(base[100:150], 10)[1].ravel().tolist())

    # another process: loads base + delta from disk and agrees
    other = Index(idx.root, ivf_threshold=1000, nprobe=2).vector_index("content")
    assert other.ntotal == 3150 and np.array_equal(top1(other, new), top1(vi, new))
    assert np.array_equal(other.search(base[:300], 10)[1], vi.search(base[:300], 10)[1])


def test_handle_follows_deltas_written_by_another_process(synth):
    idx, put = synth
    put(names("a", 2000), vectors(2000, seed=0))
    idx.refresh_ann()
    mine = idx.vector_index("content")
    writer = Index(idx.root, ivf_threshold=1000, nprobe=2)
    put(names("b", 30), vectors(30, seed=5))
    assert writer.refresh_ann() == {"content": False, "style": False}  # writes a delta
    again = idx.vector_index("content")
    assert again is mine and again.ntotal == 2030  # the same object caught up, nothing rebuilt or reloaded


def test_retrain_rule(synth):
    """Rows doubling since training, or new rows the quantizer fits badly, trigger a rebuild."""
    idx, put = synth
    put(names("a", 2000), vectors(2000, seed=0))
    idx.refresh_ann()
    put(names("b", 1500), vectors(1500, seed=1))  # 3500 < 2 x 2000: caught up
    assert idx.refresh_ann() == {"content": False, "style": False} and sidecar(idx)["trained_n"] == 2000
    put(names("c", 600), vectors(600, seed=2))  # 4100 >= 2 x 2000: retrained
    assert idx.refresh_ann()["content"] is True
    assert sidecar(idx)["trained_n"] == 4100 and len(sidecar(idx)["files"]) == 1

    # drift: 1,000 vectors from other clusters, far from every trained centroid
    far = vectors(1000, seed=3, centres=7, spread=0.05)
    put(names("d", 1000), far)
    assert idx.refresh_ann()["content"] is True
    vi = idx.vector_index("content")
    assert vi.trained_n == 5100
    assert np.array_equal(top1(vi, far[:50]), [path_key(p) for p in names("d", 50)])


def test_build_takes_other_lists_and_codes(tmp_path):
    """benchmarks/scale.py's IVF variants: the lists and codes asked for, kept through write/read/restore;
    probing every list of flat codes is the exact search, SQ8's one-byte codes only approximate it."""
    import faiss

    x, q = vectors(3000, seed=0), vectors(50, seed=9)
    _, exact = ann.VectorIndex.build(np.arange(3000), x).search(q, 10)
    for codec, code_bytes in (("Flat", 4 * D), ("SQ8", D)):
        vi = ann.VectorIndex.build(np.arange(3000), x, ivf_threshold=0, nlist=8, codec=codec)
        assert (vi.kind, vi.nlist, vi.codec, faiss.extract_index_ivf(vi.index).code_size) == ("ivf", 8, codec, code_bytes)
        _, got = vi.search(q, 10, nprobe=8)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
        assert recall == 1.0 if codec == "Flat" else 0.8 < recall < 1.0
        vi.write(tmp_path / codec)
        again = ann.VectorIndex.read(tmp_path / codec)
        again.restore(vi.meta())
        assert (again.nlist, again.codec) == (8, codec)


def test_an_ivf_holds_its_vectors_centred(tmp_path):
    """Rows sharing a mean direction, in 512 dims: FAISS's own IVF trained on the same sample puts a hub
    list near the mean (over 3x the largest centred list here); its training error is the centred sample's;
    the centred index's scores are the rows' inner products with the query, its ranking with every list probed the exact one, and both
    survive write/read/restore and vectors added after."""
    import faiss

    rng = np.random.default_rng(0)
    d, n, nlist = 512, 20_000, 256
    mean = rng.standard_normal(d)
    sources = mean / np.linalg.norm(mean) + 0.3 * rng.standard_normal((300, d)) / np.sqrt(d)
    x = sources[np.arange(n) % 300] + rng.standard_normal((n, d)) / np.sqrt(d)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    vi = ann.VectorIndex.build(np.arange(n), x, ivf_threshold=0, nlist=nlist)
    sample = x[np.sort(np.random.default_rng(0).choice(n, size=vi.train_size(n), replace=False))]  # build's sample
    raw = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    raw.train(sample)
    raw.add(x)
    sizes = lambda ivf: np.array([ivf.invlists.list_size(i) for i in range(nlist)])  # noqa: E731
    assert np.allclose(vi.center, sample.mean(0), atol=1e-6)
    centred, centroids = sample - sample.mean(0), faiss.extract_index_ivf(vi.index).quantizer.reconstruct_n(0, nlist)
    nearest = ((centred ** 2).sum(1)[:, None] - 2 * centred @ centroids.T + (centroids ** 2).sum(1)).min(1)
    assert vi.train_error == pytest.approx(nearest.mean(), rel=1e-3)  # what the drift rule compares new rows with
    assert 3 * sizes(faiss.extract_index_ivf(vi.index)).max() < sizes(raw).max()
    q = x[:40] + 0.01
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    scores, ids = vi.search(q, 10, nprobe=nlist)
    assert (ids == exact).mean() > 0.99  # ties in float32 aside
    assert np.allclose(scores, np.take_along_axis(q @ x.T, ids, axis=1), atol=1e-4)
    vi.write(tmp_path / "ivf")
    again = ann.VectorIndex.read(tmp_path / "ivf")
    again.restore(vi.meta())
    extra = x[:5] * -1  # far from the mean: they only rank first for queries like themselves
    again.apply(np.zeros(0), np.arange(n, n + 5), extra)
    s2, i2 = again.search(-q[:5], 1, nprobe=nlist)
    assert (i2[:, 0] == np.arange(n, n + 5)).all() and np.allclose(s2[:, 0], (-q[:5] * extra).sum(1), atol=1e-4)


def test_retrain_reason_by_error():
    vi = ann.VectorIndex.build(np.arange(3000), vectors(3000, seed=0), ivf_threshold=1000)
    assert catchup.retrain_reason(vi, 1000) is None
    vi.apply(np.arange(3000, 4000), np.arange(3000, 4000), vectors(1000, seed=4))  # same distribution
    assert catchup.retrain_reason(vi, 1000) is None
    vi.apply(np.arange(4000, 5000), np.arange(4000, 5000), vectors(1000, seed=3, centres=7, spread=0.05))
    assert catchup.retrain_reason(vi, 1000).startswith("drift")


def test_a_query_does_not_wait_for_a_busy_writer(synth):
    """While another process holds the write lock (an index run committing back to back), a query
    answers from the last consistent index instead of waiting for the lock; once the lock is free the
    next query catches up with what was committed."""
    import subprocess
    import sys

    idx, put = synth
    first = vectors(1500, seed=0)
    put(names("a", 1500), first)
    assert idx.vector_index("content").ntotal == 1500
    later = vectors(10, seed=9)
    put(names("b", 10), later)  # committed, not yet in the index
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"lock = FileLock({str(idx.root / '.simsearch.lock')!r}); lock.acquire(); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        stale = idx.ann_indexes["content"].get()
        assert stale.vectors.ntotal == 1500 and stale.table_version < idx.store.version
        assert idx.search_vector(first[0], 1)[0].path == "/data/a/00000.png"
    finally:
        holder.communicate("")
    assert idx.vector_index("content").ntotal == 1510
    assert idx.search_vector(later[0], 1)[0].path == "/data/b/00000.png"


def test_default_nprobe_follows_the_lists(synth):
    """Unless told otherwise an IVF index probes 1 in PROBE_FRACTION of its lists (at least 16)."""
    idx, put = synth
    put(names("a", 3000), vectors(3000, seed=0))
    vi = Index(idx.root, ivf_threshold=1000).vector_index("content")
    assert vi.kind == "ivf" and Index(idx.root).nprobe is None
    assert vi.probes() == max(16, -(-vi.nlist // ann.PROBE_FRACTION)) < vi.nlist
    assert vi.probes(3) == 3
    query = vectors(1, seed=7)
    exact = np.argsort(-(idx.store.vectors("content")[1] @ query[0]))[:10]
    hits = Index(idx.root, ivf_threshold=1000, nprobe=vi.nlist).search_vector(query[0], 10)  # every list: exact
    assert [h.key for h in hits] == idx.store.vectors("content")[0][exact].tolist()


def _rss_mib(field: str) -> float:
    return int(Path("/proc/self/status").read_text().split(f"{field}:", 1)[1].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is reset through /proc (Linux)")
def test_the_split_view_does_not_copy_the_lists():
    """The parallel view over an IVF index's lists costs its quantizer, not a copy of the lists: its
    making peaks at well under a tenth of the lists' bytes (a serialised copy, then a read one, cost
    twice them and more: 6.2 GB at load for a 1.5 GB index at 1M rows)."""
    import faiss

    x = unit(np.random.default_rng(8).normal(size=(60_000, 384)))  # 88 MiB of lists
    vi = ann.VectorIndex.build(np.arange(len(x)), x, ivf_threshold=1000, nlist=64)
    lists_mib = x.nbytes / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
    before = _rss_mib("VmRSS")
    vi._make_split_view()
    assert _rss_mib("VmHWM") - before < lists_mib / 10, (before, _rss_mib("VmHWM"), lists_mib)
    scores, ids = vi._split.search(x[:5], 3, params=faiss.SearchParametersIVF(nprobe=64))
    assert np.array_equal(ids[:, 0], np.arange(5))  # every list probed: each vector finds itself


def test_single_query_splits_a_large_scan_over_threads(monkeypatch):
    """A lone query that scans many IVF lists runs on a second IVF object over the same lists with
    parallel_mode 1, and finds what the batched search finds, also after the lists changed; the
    shared index keeps parallel_mode 0, and this thread's FAISS thread count (2 here, not the
    suite's OMP_NUM_THREADS=1) is what it was."""
    import faiss

    vi = ann.VectorIndex.build(np.arange(3000), vectors(3000, seed=0), ivf_threshold=1000)
    queries = vectors(ann.PARALLEL_QUERIES, seed=5)
    monkeypatch.setattr(ann, "SPLIT_SCAN", 0)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        for step in range(2):
            batched = vi.search(queries, 10)  # a batch: parallel over the queries
            single = [vi.search(q[None], 10) for q in queries]
            assert vi._split is not None and faiss.extract_index_ivf(vi._split).parallel_mode == 1
            assert faiss.extract_index_ivf(vi.index).parallel_mode == 0 and faiss.omp_get_max_threads() == 2
            assert np.array_equal(np.concatenate([k for _, k in single]), batched[1])
            np.testing.assert_allclose(np.concatenate([s for s, _ in single]), batched[0], rtol=1e-5)
            new, added = np.arange(5000, 5100) + 100 * step, vectors(100, seed=6 + step)
            vi.apply(np.arange(100) + 100 * step, new, added)  # the view sees the change
            assert vi.ntotal == 3000 and np.array_equal(vi.search(added[:1], 1)[1][0], new[:1])
    finally:
        faiss.omp_set_num_threads(threads)


def test_without_change_log_the_index_is_rebuilt(synth):
    """A database from before the log (or an index older than it) is rebuilt, never guessed at."""
    idx, put = synth
    put(names("a", 1500), vectors(1500, seed=0))
    idx.refresh_ann()
    conn = lancedb.connect(str(idx.root))
    conn.drop_table("changes")
    gone = [path_key(p) for p in names("a", 5)]
    conn.open_table("images").delete(f"key IN ({', '.join(map(str, gone))})")  # a write the log never saw
    ImageStore(idx.root).put(synthetic_rows(names("b", 10), vectors(10, seed=1)))  # a new log, from here on
    fresh = Index(idx.root, ivf_threshold=1000, nprobe=2)
    assert fresh.refresh_ann() == {"content": True, "style": True}
    assert fresh.vector_index("content").ntotal == 1505
    assert not set(gone) & set(fresh.vector_index("content").search(vectors(1500, seed=0)[:5], 5)[1].ravel().tolist())


def test_filtered_search_returns_k(synth, monkeypatch):
    """nprobe 1 of many lists: a filter whose rows lie in other lists found nothing (or fewer than k)
    before; now k hits on both paths: the exact filtered top k for a small set, the allowed rows' own
    scores and nearly the exact top k for a large set (widened probe)."""
    idx, put = synth
    vecs = vectors(4000, seed=0)
    put(names("a", 2000) + names("b", 2000), vecs)
    idx.nprobe = 1
    query = vecs[0]
    allowed, allowed_vecs = idx.store.vectors("content", "path LIKE '/data/b/%'")
    want = allowed[np.argsort(-(allowed_vecs @ query), kind="stable")[:10]]
    hits = idx.search_vector(query, 10, where="path LIKE '/data/b/%'")  # small set: scored exactly
    assert [h.key for h in hits] == list(want)
    monkeypatch.setattr(ann, "EXACT_FILTER_ROWS", 100)  # the same set through the widening IVF path
    hits = idx.search_vector(query, 10, where="path LIKE '/data/b/%'")
    exact = dict(zip(allowed.tolist(), (allowed_vecs @ query).tolist()))
    assert len(hits) == 10 and all(h.key in exact for h in hits)
    assert [h.score for h in hits] == pytest.approx([exact[h.key] for h in hits], abs=1e-5)
    # the probe starts at nprobe / selectivity (2 lists here): the same share of allowed rows as an
    # unfiltered search scans; starting from 1 list found 8 of the 10
    assert len({h.key for h in hits} & set(want.tolist())) >= 9
    assert len(idx.search_vector(query, 10, where="path = '/data/b/00003.png'")) == 1


def test_compaction_waits_for_enough_rows(synth, monkeypatch):
    """A small index run does not rewrite the table; once OPTIMIZE_ROWS rows are unindexed it does."""
    from simsearch import store as store_module

    idx, put = synth
    put(names("a", 300), vectors(300, seed=0))
    idx.store.compact(full=True)
    v = idx.store.version
    put(names("b", 20), vectors(20, seed=1))
    idx.store.compact()
    assert idx.store.version == v + 1  # the append only: nothing merged or reindexed
    monkeypatch.setattr(store_module, "OPTIMIZE_ROWS", 10)
    monkeypatch.setattr(store_module, "OPTIMIZE_FRACTION", 0.0)
    idx.store.compact()
    stats = lancedb.connect(str(idx.root)).open_table("images").index_stats("key_idx")
    assert stats.num_unindexed_rows == 0 and stats.num_indexed_rows == 320


def test_scalar_indexes_and_appends(synth):
    idx, put = synth
    put(names("a", 100), vectors(100, seed=0))
    store = idx.store
    indexed = {name: {c for i in lancedb.connect(str(idx.root)).open_table(name).list_indices() for c in i.columns}
               for name in ("images", "files", "changes")}
    assert indexed == {"images": {"key"}, "files": {"key", "path"}, "changes": {"seq"}}
    v = store.version
    put(names("b", 10), vectors(10, seed=1))  # new keys: one append, no delete commit
    assert store.version == v + 1
    put(names("b", 10), vectors(10, seed=2))  # replaced: one merge commit
    assert store.version == v + 2
    store.compact(full=True)
    for name in ("images", "files"):
        stats = lancedb.connect(str(idx.root)).open_table(name).index_stats("key_idx")
        assert stats.num_unindexed_rows == 0 and stats.num_indexed_rows == 110
    assert len(table_rows(idx.root)) == 110


def test_catalog_read_by_folder(synth):
    idx, put = synth
    tricky = ["/data/b", "/data/b/x.png", "/data/b/c/y.png", "/data/b2/z.png", "/data/b.png", "/data/b's/q.png",
              "/data/a/b/w.png"]
    put(tricky, vectors(len(tricky), seed=0))
    idx.store.compact(full=True)  # folds the new rows into the path index
    assert sorted(idx.store.files(under="/data/b")) == ["/data/b", "/data/b/c/y.png", "/data/b/x.png"]
    assert sorted(idx.store.files(under="/data/b's")) == ["/data/b's/q.png"]
    plan = idx.store.catalog.search().where(under_filter("/data/b")).select(["path"]).explain_plan(True)
    assert "path_idx" in plan


@pytest.mark.filterwarnings("ignore:optimize\\(cleanup_older_than=0\\):UserWarning")
def test_old_versions_are_cleaned_up(synth):
    idx, put = synth
    for i in range(4):
        put(names(f"x{i}", 50), vectors(50, seed=i))
    table = lancedb.connect(str(idx.root)).open_table("images")
    assert len(table.list_versions()) >= 5
    Index(idx.root, keep_versions=timedelta(hours=1)).store.compact(full=True)
    assert len(table.list_versions()) >= 5  # younger than the window: kept for time travel
    before = idx.store.disk_bytes()
    Index(idx.root, keep_versions=timedelta(0)).store.compact(full=True)
    assert len(table.list_versions()) == 1 and idx.store.disk_bytes() < before
    assert len(table_rows(idx.root)) == 200
    for i in range(3):  # an index run's compact: too few rows to optimize, old versions still go
        put(names(f"y{i}", 50), vectors(50, seed=10 + i))
    before = idx.store.disk_bytes()
    Index(idx.root, keep_versions=timedelta(0)).store.compact()
    assert len(table.list_versions()) == 1 and idx.store.disk_bytes() < before
    assert len(table_rows(idx.root)) == 350


def test_every_version_holds_every_replaced_row(synth):
    """A reader opens whatever version is latest when it looks: every version written while rows are
    replaced (payload and catalog) or touched (catalog) holds each of those rows, once. Before, a
    replacement was a delete and an append, and the version between them lacked the rows."""
    import lance

    idx, put = synth
    put(names("a", 100), vectors(100, seed=0))
    store = idx.store
    before = {name: lance.dataset(str(idx.root / f"{name}.lance")).version for name in ("images", "files")}
    put(names("a", 20) + names("b", 10), vectors(30, seed=1))  # 20 replaced, 10 new
    store.touch({p: (2, 2) for p in names("a", 30, start=50)})  # catalog rows rewritten

    for name, replaced in (("images", names("a", 20)), ("files", names("a", 20) + names("a", 30, start=50))):
        uri = str(idx.root / f"{name}.lance")
        latest = lance.dataset(uri).version
        assert latest > before[name]
        for version in range(before[name] + 1, latest + 1):
            paths = lance.dataset(uri, version=version).to_table(columns=["path"]).column("path").to_pylist()
            assert all(paths.count(p) == 1 for p in replaced), (name, version)
    assert len(table_rows(idx.root)) == 110
    new = store.rows([path_key(p) for p in names("a", 20)], ["content"])
    assert np.allclose(np.asarray([r["content"] for r in new]), vectors(30, seed=1)[:20])
