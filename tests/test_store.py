"""The LanceDB store: rows by key (in order, or naming what is missing), reranking that never attaches a
score to the wrong hit, touched files costing catalog writes only, and format 1 databases."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from conftest import table_rows, write_patterns
from simsearch import Index
from simsearch.store import MissingRowsError, path_key


@pytest.fixture
def idx(tmp_path, new_index, photos):
    index = new_index(tmp_path / "db")
    index.add_folder(photos)
    return index


def test_rows_in_key_order_or_missing_named(idx, photos):
    paths = [str(photos / n) for n in ("rocket.jpg", "brick.jpg", "astronaut.jpg")]
    rows = idx.store.rows([path_key(p) for p in paths], ["path"])
    assert [r["path"] for r in rows] == paths
    gone = path_key(str(photos / "nothing-here.jpg"))
    with pytest.raises(MissingRowsError) as info:
        idx.store.rows([path_key(paths[0]), gone], ["path"])
    assert info.value.keys == [gone]
    assert set(idx.store.find([path_key(paths[0]), gone], ["path"])) == {path_key(paths[0])}


def test_blob_columns_are_stored_uncompressed(tmp_path):
    """Dense tensors and JPEG thumbnails are written as they are: zstd on float16 tokens cost reads,
    not space (store.UNCOMPRESSED). Checked in the data files' page encodings, on blobs of
    a real table's size (257 x 384 float16), where Lance's default does compress (the control)."""
    import glob

    import lance
    from lance.file import LanceFileReader

    from simsearch.store import ImageStore, make_rows

    rng = np.random.default_rng(0)
    blobs = [rng.standard_normal((257, 384)).astype(np.float16).tobytes() for _ in range(8)]
    names = [f"/x/{i}.jpg" for i in range(8)]
    store = ImageStore(tmp_path / "db")
    store.create({"config": {}, "weights": "synthetic", "dense_shape": [257, 384]}, 4, 4)
    store.put(make_rows(names, rng.random((8, 4)), rng.random((8, 4)), blobs, thumbs=blobs))

    def compressed(dataset: str, column: str) -> bool:
        pages = [p for f in glob.glob(f"{dataset}/data/*.lance")
                 for meta in [LanceFileReader(f).metadata()]
                 for p in meta.columns[[c.name for c in meta.schema].index(column)].pages]
        assert pages
        return any("Zstd" in str(p.encoding) or "Lz4" in str(p.encoding) for p in pages)

    assert not compressed(str(store.root / "images.lance"), "dense")
    assert not compressed(str(store.root / "images.lance"), "thumb")
    assert store.find([path_key(names[3])], ["dense"])[path_key(names[3])]["dense"] == blobs[3]
    lance.write_dataset(pa.table({"dense": pa.array(blobs, pa.binary())}), str(tmp_path / "control.lance"))
    assert compressed(str(tmp_path / "control.lance"), "dense")


def test_reads_by_key_cost_the_rows_they_return(tmp_path):
    """A read of 20 rows of a table of 4,000 with 5,184-float style vectors (83 MB of them), 3,000 of
    them not yet in the key index (as between two optimizes: store.compact), reads a small share of the
    column, counted in the bytes this process read (/proc/self/io: Lance reads with read calls; a
    filtered read of the style column read those 3,000 rows' 62 MB); the rows are those asked for,
    with their values."""
    from simsearch.store import ImageStore, make_rows

    rng = np.random.default_rng(0)
    n, d = 4000, 5184
    style = rng.standard_normal((n, d)).astype(np.float32)
    names = [f"/x/{i}.jpg" for i in range(n)]
    store = ImageStore(tmp_path / "db")
    store.create({"config": {}, "weights": "synthetic", "dense_shape": [1, 4]}, 4, d)
    for a in range(0, n, 1000):
        store.put(make_rows(names[a:a + 1000], rng.random((1000, 4)), style[a:a + 1000], [b""] * 1000))
        if a == 0:
            store.compact(full=True)  # the key index holds these; the later rows wait for the next optimize
    read = lambda: int(re.search(r"rchar: (\d+)", Path("/proc/self/io").read_text())[1])  # noqa: E731
    wanted = rng.choice(n, 20, replace=False)
    before = read()
    keys, vectors = store.vectors_of([path_key(names[i]) for i in wanted], "style")
    cost = read() - before
    assert sorted(keys.tolist()) == sorted(path_key(names[i]) for i in wanted)
    by_key = dict(zip(keys.tolist(), vectors))
    assert all(np.array_equal(by_key[path_key(names[i])], style[i]) for i in wanted)
    assert cost < style.nbytes / 20, f"{cost:,} bytes read for 20 rows of {style.nbytes:,}"
    for columns in (["path"], ["style"]):  # a narrow read in one pass, a wide one by ids
        found = store.find([path_key(names[i]) for i in wanted[:3]] + [12345], columns)
        assert set(found) == {path_key(names[i]) for i in wanted[:3]}


def test_rerank_after_rows_were_deleted(idx, photos):
    """Rows deleted between the first stage and the rerank, and the version the hits were read at
    cleaned up (keep_versions 0): their hits drop out, every other hit keeps its own score (scores
    were assigned by position onto a shorter list before), ranks stay 1..n."""
    query = idx.embed_image(photos / "coffee.jpg")
    hits = idx.search_vector(query.content[0], 12)
    alone = {h.key: idx.rerank(query.dense[0], [h], "aas")[0].score for h in hits}
    gone = [hits[1].path, hits[4].path]
    writer = Index(idx.root, keep_versions=timedelta(0))  # another handle, as another process would
    writer.store.delete_paths(gone)
    writer.store.compact(full=True)
    reranked = idx.rerank(query.dense[0], hits, "aas")
    assert {h.path for h in reranked} == {h.path for h in hits} - set(gone)
    assert [h.rank for h in reranked] == list(range(1, 11))
    for h in reranked:
        assert h.score == pytest.approx(alone[h.key], abs=1e-6)


def test_a_search_reads_the_rows_of_its_index_version(idx, photos):
    """A delete commits after the FAISS index was brought up (here: the index is kept from catching
    up, as when a writer holds the lock): the search still answers k hits, the rows of the version
    its index reflects, and reranks them from that version's dense tensors. Before, the deleted rows
    were dropped from the answer (fewer than k)."""
    query = idx.embed_image(photos / "coffee.jpg")
    before = idx.search_vector(query.content[0], 6)
    followed = idx.ann_indexes["content"]
    answered = followed.get()
    Index(idx.root).store.delete_paths([before[0].path, before[2].path])
    followed.current = replace(answered, table_version=idx.store.version)  # not caught up
    after = idx.search_vector(query.content[0], 6)
    assert [(h.path, h.rank) for h in after] == [(h.path, h.rank) for h in before]
    assert all(h.table_version == answered.table_version < idx.store.version for h in after)
    reranked = idx.search_embedded(query.content[0], query.dense[0], k=6, rerank="aas", candidates=6)
    assert sorted(h.path for h in reranked) == sorted(h.path for h in before)


def test_search_ranks_have_no_gaps_when_rows_vanish(idx, photos):
    """The version the FAISS index reflects was cleaned up after a delete (keep_versions 0) before
    the index caught up: the rows read at the latest version lack the deleted ones, which are skipped,
    and ranks are counted over the rows returned (they had gaps)."""
    query = idx.embed_image(photos / "coffee.jpg").content[0]
    before = idx.search_vector(query, 6)
    followed = idx.ann_indexes["content"]
    answered = followed.get()  # holds all 12 rows
    writer = Index(idx.root, keep_versions=timedelta(0))
    writer.store.delete_paths([before[0].path, before[2].path])
    writer.store.compact(full=True)  # the index's version is gone
    followed.current = replace(answered, table_version=idx.store.version)  # not caught up
    after = idx.search_vector(query, 6)
    assert [h.path for h in after] == [h.path for i, h in enumerate(before) if i not in (0, 2)]
    assert [h.rank for h in after] == [1, 2, 3, 4]


def data_files(db, table: str) -> set:
    return {p.name for p in (db / f"{table}.lance" / "data").glob("*")}


def test_touched_files_cost_catalog_writes_only(tmp_path, new_index, photos):
    """`touch` on every file (content unchanged): the payload table, dense tensors included, is not
    rewritten; only the small catalog rows are (it read and rewrote every column of every row)."""
    write_patterns(photos / "more", 40)
    db = tmp_path / "db"
    index = new_index(db)
    index.add_folder(photos)
    payload_version, payload_files = index.store.version, data_files(db, "images")
    for p in photos.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    report = new_index(db).add_folder(photos)
    assert (report.skipped, report.added, report.updated) == (52, 0, 0)
    assert Index(db).store.version == payload_version and data_files(db, "images") == payload_files
    rows = table_rows(db)
    assert all(r["mtime_ns"] == (photos / r["path"]).stat().st_mtime_ns for r in rows)
    again = new_index(db).add_folder(photos)  # the new mtimes were recorded: nothing is even read now
    assert again.skipped == 52


def test_format1_database_opens_and_migrates(tmp_path, new_index, photos):
    """A database from before the catalog (one table holding size and mtime too) answers queries as it
    is, and the first index run builds the catalog from it without embedding anything again."""
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    conn = lancedb.connect(str(db))
    images, files = conn.open_table("images").to_arrow(), conn.open_table("files").to_arrow()
    stats = {r["key"]: r for r in files.to_pylist()}
    meta = json.loads(images.schema.metadata[b"simsearch"])
    meta["format"] = 1
    old = images.append_column("size", pa.array([stats[k]["size"] for k in images.column("key").to_pylist()], pa.int64()))
    old = old.append_column("mtime_ns", pa.array([stats[k]["mtime_ns"] for k in images.column("key").to_pylist()], pa.int64()))
    old = old.replace_schema_metadata({b"simsearch": json.dumps(meta).encode()})
    conn.drop_table("files")
    conn.drop_table("images")
    conn.create_table("images", old)

    hits = Index(db).search(photos / "horse.jpg", k=2)
    assert hits[0].path == str(photos / "horse.jpg")
    assert "files" not in lancedb.connect(str(db)).table_names()  # reading did not write
    report = new_index(db).add_folder(photos)
    assert (report.skipped, report.added) == (12, 0)
    assert len(table_rows(db)) == 12
    write_patterns(photos / "new", 2)
    assert new_index(db).add_folder(photos).added == 2  # new rows carry the old columns too
    assert len(table_rows(db)) == 14 and np.all(Index(db).store.vectors("content")[1].any(1))
