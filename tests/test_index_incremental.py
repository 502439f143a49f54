"""Incremental indexing: skip unchanged, re-embed changed, add new, prune gone; one row per file."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, table_rows, write_patterns
from simsearch import ImageError
from simsearch.store import path_key


def by_path(db):
    return {r["path"]: r for r in table_rows(db)}


def test_first_and_second_run(tmp_path, new_index, photos):
    idx = new_index(tmp_path / "db")
    r1 = idx.add_folder(photos, batch_size=5)
    assert (r1.added, r1.updated, r1.skipped, r1.pruned, r1.failed) == (12, 0, 0, 0, [])
    assert r1.embedded == 12 and r1.seconds > 0 and r1.images_per_s > 0
    rows = by_path(tmp_path / "db")
    assert set(rows) == {str(p) for p in photos.glob("*.jpg")}
    for path, r in rows.items():
        st = os.stat(path)
        assert (r["size"], r["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        assert r["key"] == path_key(path)
    version = idx.store.version

    r2 = idx.add_folder(photos)
    assert (r2.added, r2.updated, r2.skipped, r2.failed) == (0, 0, 12, [])
    assert by_path(tmp_path / "db") == rows
    assert idx.store.version == version  # nothing committed at all


def test_touch_modify_add_delete_prune(tmp_path, new_index, photos):
    db = tmp_path / "db"
    idx = new_index(db)
    idx.add_folder(photos)
    before = by_path(db)

    # touched, identical content -> skipped, same id
    touched = photos / "coins.jpg"
    os.utime(touched, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    # modified content -> updated, new id, same key
    modified = photos / "rocket.jpg"
    Image.open(modified).rotate(90).save(modified, format="JPEG")
    # new file -> added
    new = photos / "sub" / "copy of horse.jpg"
    new.parent.mkdir()
    shutil.copy(EXAMPLES / "horse.jpg", new)
    # deleted file, no prune -> kept
    (photos / "gravel.jpg").unlink()

    r = idx.add_folder(photos)
    assert (r.added, r.updated, r.skipped, r.pruned) == (1, 1, 10, 0)  # 12 files on disk now
    after = by_path(db)
    assert len(after) == 13
    assert after[str(touched)]["id"] == before[str(touched)]["id"]
    assert after[str(modified)]["id"] != before[str(modified)]["id"]
    assert after[str(modified)]["key"] == before[str(modified)]["key"]
    assert after[str(new)]["id"] == before[str(photos / "horse.jpg")]["id"]  # same bytes, same content id
    assert str(photos / "gravel.jpg") in after
    hit = idx.search(modified, k=1)[0]
    assert hit.path == str(modified) and hit.score == pytest.approx(1.0, abs=1e-5)

    # prune -> the deleted file's row goes, nothing else
    r = idx.add_folder(photos, prune=True)
    assert (r.added, r.updated, r.pruned) == (0, 0, 1)
    after = by_path(db)
    assert set(after) == {str(p) for p in photos.rglob("*.jpg")}
    assert idx.count() == 12
    assert all(h.path != str(photos / "gravel.jpg") for h in idx.search(photos / "grass.jpg", k=12))


def test_touched_file_mtime_is_recorded(tmp_path, new_index, photos):
    """After a touched-but-identical file is checked once, its row carries the new mtime, so the next
    run takes the fast path instead of re-reading and re-hashing the file forever."""
    db = tmp_path / "db"
    idx = new_index(db)
    idx.add_folder(photos)
    touched = photos / "coins.jpg"
    os.utime(touched, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    assert idx.add_folder(photos).skipped == 12
    assert by_path(db)[str(touched)]["mtime_ns"] == os.stat(touched).st_mtime_ns


def test_prune_only_under_the_folder(tmp_path, new_index, photos):
    other = tmp_path / "other"
    write_patterns(other, 3)
    idx = new_index(tmp_path / "db")
    idx.add_folder(photos)
    idx.add_folder(other)
    assert idx.count() == 15
    (photos / "brick.jpg").unlink()
    shutil.rmtree(other)
    r = idx.add_folder(photos, prune=True)
    assert r.pruned == 1
    assert idx.count() == 14  # rows of `other` are not under `photos`: kept
    # a sibling folder whose name extends the pruned one is not "under" it
    sibling = tmp_path / "photos2"
    write_patterns(sibling, 2)
    idx.add_folder(sibling)
    r = idx.add_folder(photos, prune=True)
    assert r.pruned == 0 and idx.count() == 16


def test_same_folder_spelled_differently_is_one_set_of_rows(tmp_path, new_index, photos, monkeypatch):
    """`photos`, `./photos/`, `photos/sub/..` and an absolute path name the same files: rows are keyed
    by a normalised path, so no file is indexed twice."""
    (photos / "sub").mkdir()
    idx = new_index(tmp_path / "db")
    monkeypatch.chdir(tmp_path)
    idx.add_folder("photos")
    for spelling in ["./photos/", "photos/sub/..", str(photos), "photos//"]:
        r = idx.add_folder(spelling)
        assert r.added == 0 and r.skipped == 12, spelling
    assert idx.count() == 12
    assert all(".." not in r["path"] for r in table_rows(tmp_path / "db"))


def test_single_file_and_missing_folder(tmp_path, new_index, photos):
    idx = new_index(tmp_path / "db")
    r = idx.add_folder(photos / "chelsea.jpg")
    assert r.added == 1 and idx.count() == 1
    with pytest.raises(ImageError, match="no such file"):
        idx.add_folder(tmp_path / "nope")
    assert idx.count() == 1


def test_empty_folder_creates_empty_database(tmp_path, new_index):
    (tmp_path / "empty").mkdir()
    idx = new_index(tmp_path / "db")
    r = idx.add_folder(tmp_path / "empty")
    assert (r.added, r.skipped, r.failed) == (0, 0, [])
    assert idx.count() == 0
    info = idx.info()
    assert info["rows"] == 0 and info["disk_bytes_per_image"] == 0


def test_rows_carry_descriptors_and_thumbnail(tmp_path, new_index, photos):
    import io

    import lancedb

    idx = new_index(tmp_path / "db")
    idx.add_folder(photos)
    t = lancedb.connect(str(tmp_path / "db")).open_table("images").to_arrow()
    content = np.stack(t.column("content").to_numpy(zero_copy_only=False))
    style = np.stack(t.column("style").to_numpy(zero_copy_only=False))
    assert content.shape == (12, 32) and style.shape == (12, 64)
    assert np.allclose(np.linalg.norm(content, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(style, axis=1), 1, atol=1e-5)
    thumb = Image.open(io.BytesIO(t.column("thumb")[0].as_py()))
    assert thumb.format == "JPEG" and max(thumb.size) <= 128
    # the dense tensor: (1 + 4*4) tokens x 32 channels in float16
    keys = t.column("key").to_pylist()[:3]
    dense = idx.dense(keys)
    assert dense.shape == (3, 17, 32) and dense.dtype == np.float32
    info = idx.info()
    assert info["dense"] == {"shape": [17, 32], "dtype": "float16", "bytes_per_image": 17 * 32 * 2}
    assert len(t.column("dense")[0].as_py()) == 17 * 32 * 2
    # the stored dense tensor is the hidden state entering block 2 of the image, as embedded now
    emb = idx.embed_image(photos / "chelsea.jpg")
    k = path_key(str(photos / "chelsea.jpg"))
    assert np.allclose(idx.dense([k])[0], emb.dense[0], atol=2e-2, rtol=1e-2)


def test_int8_dense(tmp_path, new_index, photos):
    idx = new_index(tmp_path / "db", dense_dtype="int8")
    idx.add_folder(photos)
    info = idx.info()
    assert info["dense"]["bytes_per_image"] == 17 * 32 + 17 * 2
    k = path_key(str(photos / "horse.jpg"))
    ref = idx.embed_image(photos / "horse.jpg").dense[0]
    got = idx.dense([k])[0]
    assert (np.abs(got - ref).max(1) / np.abs(ref).max(1)).max() < 0.01
