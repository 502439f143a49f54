"""Processes sharing one database: two indexers started at once on a new database, and several
processes rebuilding the same stale FAISS index; threads of one process sharing one FAISS index.
Real subprocesses, real LanceDB, real FAISS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import pytest

from conftest import cli_command, table_rows, tiny_cli_options, write_patterns
from simsearch import Index, ann
from simsearch.ann import VectorIndex
from simsearch.catchup import Source, index_path, load


@pytest.mark.slow
def test_two_indexers_start_together_on_a_new_database(tmp_path, tiny_model, photos):
    """Both create-or-open the table (one died with `Table 'images' already exists`) and both finish
    with every image exactly once."""
    write_patterns(photos / "patterns", 30)
    db = tmp_path / "db"
    env = dict(os.environ, COLUMNS="200")
    procs = [subprocess.Popen([*cli_command(), "index", str(photos), "--db", str(db), "--batch-size", "4",
                               "--commit-every", "8", *tiny_cli_options(tiny_model)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    rows = table_rows(db)
    files = sorted(str(p) for p in photos.rglob("*") if p.is_file())
    assert sorted(r["path"] for r in rows) == files  # each image exactly once
    assert Index(db).search(photos / "patterns" / "pat0007.png", k=1)[0].path == str(photos / "patterns" / "pat0007.png")


REBUILD = """
import sys
from simsearch import Index
idx = Index(sys.argv[1])
idx.refresh_ann()
print(idx.info()["ann"]["content"]["ntotal"])
"""


@pytest.mark.slow
def test_concurrent_rebuilds_never_pair_a_sidecar_with_another_index(tmp_path, new_index, photos):
    """Three processes find the index stale at once. Each build goes to a file of its own and the
    sidecar names the one it vouches for (with its digest); all three end with a valid index."""
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    for column in ("content", "style"):
        index_path(Index(db).store, column).with_suffix(".json").unlink()
    procs = [subprocess.Popen([sys.executable, "-c", REBUILD, str(db)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert [o.split()[-1] for o in outputs] == ["12"] * 3
    for column in ("content", "style"):
        path = index_path(Index(db).store, column)
        side = json.loads(path.with_suffix(".json").read_text())
        assert sorted(p.name for p in path.parent.glob(f"{column}.*.faiss")) == [f["file"] for f in side["files"]]
        assert not list(path.parent.glob("*.tmp"))
        loaded = load(path, Source(column))
        assert loaded is not None and loaded.vectors.ntotal == 12 and loaded.table_version == Index(db).store.version


def test_sidecar_vouches_only_for_its_own_file(tmp_path, new_index, photos):
    """An index file replaced under the sidecar (same name, same ntotal and d) is refused by its
    digest; `load` checked only ntotal and d before."""
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    write_patterns(tmp_path / "other", 12)
    other = new_index(tmp_path / "db2")
    other.add_folder(tmp_path / "other")
    path = index_path(Index(db).store, "content")
    mine = path.parent / json.loads(path.with_suffix(".json").read_text())["files"][0]["file"]
    theirs = index_path(other.store, "content")
    mine.write_bytes((theirs.parent / json.loads(theirs.with_suffix(".json").read_text())["files"][0]["file"]).read_bytes())
    assert load(path, Source("content")) is None
    assert Index(db).search(photos / "horse.jpg", k=1)[0].path == str(photos / "horse.jpg")


# -- threads of one process sharing one index (the server) ---------------------------------------
def unit_rows(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class PausedAfterRemove:
    """A FAISS index whose `remove_ids` stops until `resume` is set: the moment a catch-up has taken
    replaced rows out and not yet added them back. Everything else goes to the real index."""

    def __init__(self, index):
        self.inner, self.removed, self.resume = index, threading.Event(), threading.Event()

    def remove_ids(self, selector):
        n = self.inner.remove_ids(selector)
        self.removed.set()
        self.resume.wait(30)
        return n

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_search_never_sees_half_a_catch_up():
    """A search that arrives while a catch-up is between removing replaced rows and adding them back
    answers from one whole version (here: after it), never from the index without those rows. Before,
    it ran on the half-updated index and found other rows."""
    keys, moved = np.arange(100), unit_rows(10, seed=1)
    vi = VectorIndex.build(keys, unit_rows(100))
    vi.index = PausedAfterRemove(vi.index)
    applying = threading.Thread(target=vi.apply, args=(keys[:10], keys[:10], moved))
    applying.start()
    try:
        assert vi.index.removed.wait(30)
        with ThreadPoolExecutor(1) as pool:
            searching = pool.submit(vi.search, moved, 1)
            wait([searching], timeout=0.5)  # the old code answered here, from the half-updated index
            vi.index.resume.set()
            _, got = searching.result(timeout=30)
    finally:
        vi.index.resume.set()
        applying.join()
    assert got[:, 0].tolist() == keys[:10].tolist()


def test_concurrent_searches_keep_their_own_nprobe():
    """Threads searching one IVF index with different nprobe each get what a search alone with that
    nprobe gets (nprobe = every list: the exact answer), and the shared index is left as it was. The
    old search wrote nprobe and parallel_mode into the shared index on every call."""
    import faiss

    vecs = unit_rows(3000, seed=2)
    vi = VectorIndex.build(np.arange(3000), vecs, ivf_threshold=1000)
    ivf = faiss.extract_index_ivf(vi.index)
    shared = ivf.nprobe, ivf.parallel_mode
    queries = unit_rows(40, seed=3)
    exact = np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :10]
    alone = {p: vi.search(queries, 10, nprobe=p)[1] for p in (1, vi.nlist)}
    assert np.array_equal(alone[vi.nlist], exact) and not np.array_equal(alone[1], exact)

    def searches(nprobe: int) -> bool:
        return all(np.array_equal(vi.search(queries[i:i + 1], 10, nprobe=nprobe)[1][0], alone[nprobe][i])
                   for _ in range(10) for i in range(len(queries)))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(searches, [1, vi.nlist] * 2))
    assert (ivf.nprobe, ivf.parallel_mode) == shared


def test_faiss_thread_count_is_per_thread():
    """A single query runs FAISS on one OpenMP thread (`ann._omp_threads`); the setting belongs to the
    calling thread (OpenMP's nthreads-var is per task), so a thread that searches in parallel next to
    it keeps its own count, and so does the process afterwards."""
    import faiss

    vi = VectorIndex.build(np.arange(2000), unit_rows(2000, seed=4))
    queries = unit_rows(ann.PARALLEL_QUERIES, seed=5)
    stop = threading.Event()

    def single_queries():
        while not stop.is_set():
            vi.search(queries[:1], 5)

    def counts() -> set[int]:
        faiss.omp_set_num_threads(2)  # this thread's own setting, whatever OMP_NUM_THREADS says
        seen = set()
        for _ in range(200):
            vi.search(queries, 5)  # a batch: no limit
            seen.add(faiss.omp_get_max_threads())
        return seen

    before = faiss.omp_get_max_threads()
    with ThreadPoolExecutor(3) as pool:
        loops = [pool.submit(single_queries) for _ in range(2)]
        assert pool.submit(counts).result(timeout=120) == {2}
        stop.set()
        [f.result() for f in loops]
    assert faiss.omp_get_max_threads() == before
