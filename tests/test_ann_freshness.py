"""FAISS indexes derived from the table: exact, never stale, rebuilt when damaged or mismatched."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import table_rows, write_patterns
from simsearch import Index
from simsearch.catchup import index_path
from simsearch.errors import SimsearchError
from simsearch.store import path_key


def sidecar(db, column):
    return json.loads((db / "ann" / f"{column}.json").read_text())


def brute_force(idx, vector, column="content"):
    keys, vecs = idx.store.vectors(column)
    scores = vecs @ vector
    order = np.argsort(-scores, kind="stable")
    return keys[order], scores[order]


def test_search_equals_brute_force(tmp_path, new_index, photos):
    idx = new_index(tmp_path / "db")
    idx.add_folder(photos)
    for mode in ("content", "style"):
        q = getattr(idx.embed_image(photos / "coffee.jpg"), mode)[0]
        hits = idx.search(photos / "coffee.jpg", k=12, mode=mode)
        keys, scores = brute_force(idx, q, mode)
        assert [h.key for h in hits] == list(keys)
        assert np.allclose([h.score for h in hits], scores, atol=1e-5)
        assert [h.rank for h in hits] == list(range(1, 13))
        assert hits[0].path == str(photos / "coffee.jpg") and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_sidecar_tracks_table_version(tmp_path, new_index, photos):
    db = tmp_path / "db"
    idx = new_index(db)
    idx.add_folder(photos)
    for column in ("content", "style"):
        side = sidecar(db, column)
        assert side["table_version"] == idx.store.version
        assert side["ntotal"] == 12 and side["kind"] == "flat"
    assert idx.info()["ann"]["content"]["state"] == "fresh"
    write_patterns(photos / "more", 3)
    idx.add_folder(photos)
    assert sidecar(db, "content")["table_version"] == idx.store.version
    assert sidecar(db, "content")["ntotal"] == 15
    assert idx.refresh_ann() == {"content": False, "style": False}  # already fresh: nothing rebuilt


def test_other_handle_writes_are_seen(tmp_path, new_index, photos):
    """A search on an old handle after another handle (or process) wrote must see the new rows."""
    db = tmp_path / "db"
    more = tmp_path / "more"
    write_patterns(more, 4)
    old = new_index(db)
    old.add_folder(photos)
    assert old.search(photos / "chelsea.jpg", k=1)[0].path == str(photos / "chelsea.jpg")

    writer = new_index(db)
    writer.add_folder(more)
    (photos / "horse.jpg").unlink()
    writer.add_folder(photos, prune=True)
    assert writer.count() == 15

    assert old.count() == 15
    target = more / "pat0002.png"
    hit = old.search(target, k=1)[0]
    assert hit.path == str(target) and hit.score == pytest.approx(1.0, abs=1e-5)
    assert all(h.path != str(photos / "horse.jpg") for h in old.search(target, k=15))
    assert sidecar(db, "content")["table_version"] == old.store.version


def test_stale_sidecar_is_rebuilt(tmp_path, new_index, photos):
    db = tmp_path / "db"
    idx = new_index(db)
    idx.add_folder(photos)
    path = index_path(idx.store, "content")
    side = sidecar(db, "content")
    side["table_version"] -= 1
    path.with_suffix(".json").write_text(json.dumps(side))
    fresh = Index(db)
    assert fresh.info()["ann"]["content"]["state"].startswith("stale")
    assert fresh.search(photos / "brick.jpg", k=1)[0].path == str(photos / "brick.jpg")
    assert sidecar(db, "content")["table_version"] == fresh.store.version
    assert fresh.info()["ann"]["content"]["state"] == "fresh"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing", "ntotal", "no-sidecar"])
def test_damaged_index_is_rebuilt(tmp_path, new_index, photos, damage):
    db = tmp_path / "db"
    idx = new_index(db)
    idx.add_folder(photos)
    faiss_file = db / "ann" / sidecar(db, "content")["files"][0]["file"]  # the file the sidecar vouches for
    side_file = db / "ann" / "content.json"
    if damage == "garbage":
        faiss_file.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":
        faiss_file.write_bytes(faiss_file.read_bytes()[:200])
    elif damage == "empty":
        faiss_file.write_bytes(b"")
    elif damage == "missing":
        faiss_file.unlink()
    elif damage == "ntotal":  # a sidecar from another run
        side_file.write_text(json.dumps(dict(sidecar(db, "content"), ntotal=11)))
    else:
        side_file.unlink()
    fresh = Index(db)
    hits = fresh.search(photos / "astronaut.jpg", k=3)
    assert hits[0].path == str(photos / "astronaut.jpg") and hits[0].score == pytest.approx(1.0, abs=1e-5)
    side = sidecar(db, "content")
    assert (side["table_version"], side["kind"], side["ntotal"]) == (fresh.store.version, "flat", 12)
    assert fresh.info()["ann"]["content"]["state"] == "fresh"


def test_swapped_index_files_are_rebuilt(tmp_path, new_index, photos):
    """content.faiss replaced by the style index (same rows, same version, other dimension)."""
    db = tmp_path / "db"
    idx = new_index(db)
    idx.add_folder(photos)
    shutil.copy(db / "ann" / "style.json", db / "ann" / "content.json")  # now vouches for the style file
    hit = Index(db).search(photos / "camera.jpg", k=1, mode="content")[0]
    assert hit.path == str(photos / "camera.jpg")


def test_index_left_from_a_recreated_table_is_not_used(tmp_path, new_index, tiny_model_b, photos):
    """The table is deleted and rebuilt with other weights; the old ann/ folder stays behind with the
    same version number and row count. Its vectors must not answer queries."""
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    shutil.rmtree(db / "images.lance")
    idx = new_index(db, model=str(tiny_model_b))
    idx.add_folder(photos)
    hit = idx.search(photos / "retina.jpg", k=1)[0]
    assert hit.path == str(photos / "retina.jpg") and hit.score == pytest.approx(1.0, abs=1e-5)


def test_where_filter(tmp_path, new_index, photos):
    write_patterns(photos / "patterns", 5)
    idx = new_index(tmp_path / "db")
    idx.add_folder(photos)
    hits = idx.search(photos / "chelsea.jpg", k=10, where="path LIKE '%/patterns/%'")
    assert len(hits) == 5  # fewer than k match
    assert all("/patterns/" in h.path for h in hits)
    assert idx.search(photos / "chelsea.jpg", k=3, where="width > 100000") == []
    hits = idx.search(photos / "chelsea.jpg", k=3, where="path LIKE '%chelsea%' OR path LIKE '%coffee%'")
    assert [h.path for h in hits] == [str(photos / "chelsea.jpg"), str(photos / "coffee.jpg")]
    with pytest.raises(SimsearchError, match="invalid filter where='path LIKE'"):
        idx.search(photos / "chelsea.jpg", k=3, where="path LIKE")
    with pytest.raises(SimsearchError, match="invalid filter where='no_such_column = 1'"):
        idx.search(photos / "chelsea.jpg", k=3, where="no_such_column = 1")


def test_search_argument_errors(tmp_path, new_index, photos):
    from simsearch import EmptyIndexError, ImageError

    idx = new_index(tmp_path / "db")
    with pytest.raises(EmptyIndexError):
        idx.search(photos / "chelsea.jpg", k=1)
    idx.add_folder(photos)
    with pytest.raises(SimsearchError, match="larger than the 12 images"):
        idx.search(photos / "chelsea.jpg", k=13)
    with pytest.raises(SimsearchError, match="at least 1"):
        idx.search(photos / "chelsea.jpg", k=0)
    with pytest.raises(SimsearchError, match="unknown mode"):
        idx.search(photos / "chelsea.jpg", k=1, mode="colour")
    with pytest.raises(ImageError):
        idx.search(photos / "missing.jpg", k=1)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        idx.search(tmp_path / "text.jpg", k=1)


def test_pil_query_equals_path_query(tmp_path, new_index):
    """Searching with a PIL image must prepare it like the indexer does (alpha on white, EXIF, 16-bit,
    and the box pre-shrink of a file over twice the model's input side: 640 px against 56 here)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    write_patterns(folder, 6)
    a = np.asarray(Image.open(folder / "pat0000.png").convert("RGBA").resize((640, 480), Image.Resampling.NEAREST)).copy()
    a[:, : a.shape[1] // 2, 3] = 0  # left half transparent
    a[::7, ::5, :3] = 255 - a[::7, ::5, :3]  # fine detail, which resizing with and without the pre-shrink treats apart
    Image.fromarray(a, "RGBA").save(folder / "alpha.png")
    idx = new_index(tmp_path / "db")
    idx.add_folder(folder)
    by_path = idx.search(folder / "alpha.png", k=1)[0]
    query = Image.open(folder / "alpha.png")
    by_pil = idx.search(query, k=1)[0]
    assert by_path.path == by_pil.path == str(folder / "alpha.png")
    assert by_pil.score == pytest.approx(by_path.score, abs=1e-6) == pytest.approx(1.0, abs=1e-6)
    assert query.size == (640, 480) and query.mode == "RGBA"  # the caller's image is left as it was


# -- IVF ----------------------------------------------------------------------------------------
def test_ivf_exact_top1(tmp_path, new_index):
    """A real inverted file through the whole stack: several lists, fewer probed (with 30 rows the
    list count was 1, an exhaustive scan)."""
    folder = tmp_path / "many"
    paths = write_patterns(folder, 200, size=(32, 24))
    db = tmp_path / "db"
    idx = new_index(db, ivf_threshold=100, nprobe=2)
    idx.add_folder(folder, batch_size=32)
    nlist = sidecar(db, "content")["nlist"]
    assert sidecar(db, "content")["kind"] == "ivf" and nlist > idx.vector_index("content").probes(idx.nprobe) == 2
    assert idx.info()["ann"]["content"]["ntotal"] == 200
    for p in paths[::10]:
        hit = idx.search(p, k=1)[0]  # a vector's own list is the nearest to it: found with any nprobe
        assert hit.path == str(p) and hit.score == pytest.approx(1.0, abs=1e-5)
    hits = idx.search(paths[3], k=5, where="path LIKE '%pat000%'")  # pat0000..pat0009
    assert hits[0].path == str(paths[3]) and all("pat000" in h.path for h in hits)
    # a fresh handle loads the saved IVF index (no rebuild) and agrees
    again = Index(db, ivf_threshold=100, nprobe=2)
    assert again.refresh_ann() == {"content": False, "style": False}
    assert again.search(paths[7], k=1)[0].path == str(paths[7])


def test_ivf_vector_index_many_lists():
    """The IVF index itself, with more lists than nprobe: every vector finds itself, and recall@10
    against the exact index stays high."""
    from simsearch.ann import VectorIndex

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    vecs = centres[rng.integers(0, 40, 6000)] + 0.3 * rng.normal(size=(6000, 32))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    keys = rng.choice(2**62, size=6000, replace=False).astype(np.int64)
    ivf = VectorIndex.build(keys, vecs, ivf_threshold=1000)
    flat = VectorIndex.build(keys, vecs)
    assert ivf.kind == "ivf" and ivf.nlist > ivf.probes() and flat.kind == "flat" and ivf.ntotal == 6000
    _, got = ivf.search(vecs[:500], 10)
    _, want = flat.search(vecs[:500], 10)
    assert np.array_equal(got[:, 0], keys[:500])  # each vector is its own nearest neighbour
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall > 0.9
    allowed = keys[:100]
    _, sel = ivf.search(vecs[:5], 10, allowed=allowed)
    assert set(sel[sel >= 0].ravel()) <= set(allowed) and np.array_equal(sel[:, 0], keys[:5])


def test_ivf_with_fewer_rows_than_lists(tmp_path, new_index, photos):
    """ivf_threshold below 16 rows: 4*sqrt(n) lists would exceed n training points."""
    idx = new_index(tmp_path / "db", ivf_threshold=10)
    idx.add_folder(photos)  # 12 rows
    hit = idx.search(photos / "rocket.jpg", k=1)[0]
    assert hit.path == str(photos / "rocket.jpg")


def test_keys_are_path_keys(tmp_path, new_index, photos):
    idx = new_index(tmp_path / "db")
    idx.add_folder(photos)
    keys, _ = idx.store.vectors("content")
    assert sorted(keys) == sorted(path_key(r["path"]) for r in table_rows(tmp_path / "db"))


def test_a_saved_index_is_hashed_only_when_its_files_changed(tmp_path, new_index, photos, monkeypatch):
    """Opening a database whose index files are as they were written reads no file twice to hash it
    (each start hashed the whole base file); a file rewritten since (new mtime) is hashed, and one
    whose bytes differ from the digest is refused and rebuilt."""
    from simsearch import catchup

    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    hashed = []
    digest = catchup._digest
    monkeypatch.setattr(catchup, "_digest", lambda file: hashed.append(file.name) or digest(file))
    assert Index(db).refresh_ann() == {"content": False, "style": False} and hashed == []
    base = db / "ann" / sidecar(db, "content")["files"][0]["file"]
    base.write_bytes(base.read_bytes())  # the same bytes, a new mtime
    assert Index(db).refresh_ann() == {"content": False, "style": False} and hashed == [base.name]
    data = bytearray(base.read_bytes())
    data[-1] ^= 1
    base.write_bytes(bytes(data))
    assert Index(db).refresh_ann() == {"content": True, "style": False}


def test_info_walks_the_database_only_after_it_changed(tmp_path, new_index, photos, monkeypatch):
    """`info` (and GET /api/info) summed every file's size on each call: now the sum is kept while no
    directory changed, and is the files' total whenever it is given."""
    from simsearch import store as store_module

    db = tmp_path / "db"
    idx = new_index(db)
    idx.add_folder(photos)
    walks = []
    walk = store_module._walk_bytes
    monkeypatch.setattr(store_module, "_walk_bytes", lambda root: walks.append(root) or walk(root))
    total = lambda: sum(p.stat().st_size for p in db.rglob("*") if p.is_file())  # noqa: E731
    assert [idx.info()["disk_bytes"] for _ in range(3)] == [total()] * 3 and len(walks) == 1
    write_patterns(photos / "more", 3)
    idx.add_folder(photos)
    assert idx.info()["disk_bytes"] == total() and len(walks) == 2


def test_info_survives_files_and_directories_removed_while_it_sums(tmp_path, new_index, photos):
    """A writer in another process removes old versions and swaps indexes in while `info` sums the
    database's bytes: GET /api/info failed with FileNotFoundError under the serve stress test in CI.
    Here a thread makes and removes directories of files two levels down while `disk_bytes` runs."""
    import shutil
    import threading

    db = tmp_path / "db"
    idx = new_index(db)
    idx.add_folder(photos)
    stop, errors = threading.Event(), []

    def churn():
        i = 0
        while not stop.is_set():
            d = db / f"churn{i % 3}" / "sub" / "deeper"
            d.mkdir(parents=True, exist_ok=True)
            for j in range(5):
                (d / f"{j}.bin").write_bytes(b"x" * 100)
            shutil.rmtree(db / f"churn{i % 3}", ignore_errors=True)
            i += 1

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(3000):
            try:
                idx.store.disk_bytes()
            except OSError as e:
                errors.append(repr(e))
    finally:
        stop.set()
        writer.join()
    assert errors == []
    assert idx.store.disk_bytes() == sum(p.stat().st_size for p in db.rglob("*") if p.is_file())
