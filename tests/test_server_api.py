"""`simsearch serve`'s JSON API against the real app: real LanceDB, real FAISS, the embedded model.

Most requests go through FastAPI's TestClient; the path-traversal attempts go through a real uvicorn
socket with http.client, because an HTTP client library folds `..` segments before sending them.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import lancedb
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import QUERIES, broken_files, cli_command, one_line_error, png_header
from live_server import live_server
from simsearch import Index
from simsearch.server import bind_warning, create_app

pytestmark = pytest.mark.slow

CAT = (QUERIES / "cat_crop.jpg").read_bytes()
LIMIT_MB = 1  # small, so the oversized uploads stay small too


@pytest.fixture(scope="module")
def app(embedded_db):
    return create_app(embedded_db[0], max_upload_mb=LIMIT_MB)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def keys(embedded_db) -> dict[str, str]:
    """file name -> key (as the API spells it) of every indexed photo."""
    rows = lancedb.connect(str(embedded_db[0])).open_table("images").to_arrow().select(["path", "key"]).to_pylist()
    return {os.path.basename(r["path"]): str(r["key"]) for r in rows}


def upload(client, data: bytes = CAT, name: str = "cat_crop.jpg", **form):
    return client.post("/api/search", files={"image": (name, data, "image/jpeg")}, data={k: str(v) for k, v in form.items()})


def json_error(response, status: int, *words) -> str:
    """An error as every client must see it: the status, a JSON body {"error": message}, no traceback."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    assert "Traceback" not in response.text
    for w in words:
        assert w in body["error"], (w, body["error"])
    return body["error"]


def test_info(client, embedded_db, embedded_model):
    info = client.get("/api/info").json()
    assert info["rows"] == 12
    assert info["config"]["model"] == embedded_model
    assert info["db"] == str(embedded_db[0])
    assert {c: s["state"] for c, s in info["ann"].items()} == {"content": "fresh", "style": "fresh"}
    assert info["server"]["max_upload_bytes"] == LIMIT_MB << 20
    assert info["server"]["rerankers"] == ["none", "verified", "aas", "matches", "both"]


@pytest.fixture(scope="module")
def query_files(tmp_path_factory, embedded_db) -> dict[str, Path]:
    """The cat crop, and a photo stored sideways with EXIF orientation 6 (both must be turned alike)."""
    rotated = tmp_path_factory.mktemp("exif") / "astronaut_exif6.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(embedded_db[1] / "astronaut.jpg").transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif.tobytes())
    return {"cat": QUERIES / "cat_crop.jpg", "exif6": rotated}


@pytest.mark.parametrize("query, mode, rerank, k, where, first", [
    ("cat", "content", None, 5, None, "chelsea.jpg"),  # the query is a crop of it
    ("cat", "style", "both", 4, None, "chelsea.jpg"),
    ("cat", "content", "aas", 3, "path NOT LIKE '%chelsea%'", None),
    ("cat", "content", "verified", 3, None, "chelsea.jpg"),
    ("exif6", "content", None, 3, None, "astronaut.jpg"),
])
def test_upload_gives_the_cli_results(client, cli, embedded_db, query_files, query, mode, rerank, k, where, first):
    """Same query, same database: `simsearch query --json` and the API agree on paths, ranks and scores."""
    path = query_files[query]
    args = ["query", path, "--db", embedded_db[0], "--json", "--mode", mode, "-k", k]
    args += ["--rerank", rerank] if rerank else []
    args += ["--where", where] if where else []
    code, out, err = cli(*args)
    assert code == 0, err
    expected = [json.loads(line) for line in out.splitlines()]
    form = dict(mode=mode, k=k, rerank=rerank or "none", **({"where": where} if where else {}))
    r = upload(client, path.read_bytes(), path.name, **form)
    assert r.status_code == 200, r.text
    got = [{name: value for name, value in hit.items() if name not in ("key", "width", "height")} for hit in r.json()["hits"]]
    assert got == expected
    assert len(got) == k and (where is None or all("chelsea" not in h["path"] for h in got))
    assert first is None or os.path.basename(got[0]["path"]) == first
    query = r.json()["query"]
    assert (query["mode"], query["k"], query["rerank"], query["key"]) == (mode, k, rerank or "none", None)
    assert len(query["id"]) >= 16


def test_search_by_key_finds_itself_first(client, keys, embedded_db):
    r = client.get("/api/search", params={"key": keys["coffee.jpg"], "k": 12, "rerank": "both"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["key"] == keys["coffee.jpg"] and hits[0]["scores"]["first_stage"] == pytest.approx(1, abs=1e-5)
    assert sorted(h["key"] for h in hits) == sorted(keys.values())  # every row once
    assert [h["rank"] for h in hits] == list(range(1, 13))
    w, h = Image.open(embedded_db[1] / "coffee.jpg").size
    assert r.json()["query"] == {"id": None, "key": keys["coffee.jpg"], "mode": "content", "k": 12, "rerank": "both",
                                 "candidates": 50, "where": None, "width": w, "height": h, "frame": [w, h], "box": None}


def png(response) -> Image.Image:
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(response.content))
    assert img.format == "PNG"
    return img.convert("RGB")


def coloured_share(img: Image.Image) -> float:
    px = np.asarray(img, dtype=np.int16)
    return float(((px.max(-1) - px.min(-1)) > 60).mean())


def test_match_pictures(client, keys):
    """Upload once, then draw its correspondences with two hits from the remembered dense tensor; also
    between two indexed images by key."""
    result = upload(client, k=3).json()
    qid = result["query"]["id"]
    for hit in result["hits"][:2]:
        img = png(client.get(f"/api/match/{hit['key']}", params={"query_id": qid}))
        assert img.height == 256 and img.width > 1.5 * img.height  # query and hit side by side
        assert coloured_share(img) > 0.05
    img = png(client.get(f"/api/match/{keys['chelsea.jpg']}", params={"query_key": keys["astronaut.jpg"], "n": 4}))
    assert img.height == 256
    json_error(client.get(f"/api/match/{keys['chelsea.jpg']}"), 400, "exactly one of")
    json_error(client.get(f"/api/match/{keys['chelsea.jpg']}", params={"query_id": qid, "query_key": keys["coins.jpg"]}),
               400, "exactly one of")
    json_error(client.get(f"/api/match/{keys['chelsea.jpg']}", params={"query_id": "no-such-query"}), 404, "search again")
    json_error(client.get("/api/match/12345", params={"query_id": qid}), 404, "no indexed image has key 12345")
    json_error(client.get(f"/api/match/{keys['coins.jpg']}", params={"query_key": 12345}), 404, "12345")


def test_query_memory_is_bounded(app):
    """With room for one query, a second upload pushes out the first: its match view says to search again."""
    client = TestClient(create_app(app.state.service.index, query_cache=1), raise_server_exceptions=False)
    first, second = (upload(client, k=1).json() for _ in range(2))
    key = first["hits"][0]["key"]
    json_error(client.get(f"/api/match/{key}", params={"query_id": first["query"]["id"]}), 404, "expired")
    png(client.get(f"/api/match/{key}", params={"query_id": second["query"]["id"]}))


def test_thumbnail_is_the_stored_jpeg(client, embedded_db, keys):
    table = lancedb.connect(str(embedded_db[0])).open_table("images")
    row = table.search().where(f"key = {keys['horse.jpg']}").select(["thumb", "id"]).to_list()[0]
    r = client.get(f"/api/thumb/{keys['horse.jpg']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == row["thumb"]
    assert r.headers["etag"] == f'"{row["id"]}"' and r.headers["x-content-type-options"] == "nosniff"
    again = client.get(f"/api/thumb/{keys['horse.jpg']}", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def chunks(data: bytes, size: int = 64 << 10):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_oversized_uploads_are_413(client):
    big = os.urandom((LIMIT_MB << 20) + 1)
    json_error(upload(client, big), 413, "exceeds")  # refused by Content-Length before parsing
    # Chunked, no Content-Length: refused while the body streams in.
    boundary = "simsearchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + big * 2 + f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/api/search", content=chunks(body), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    json_error(r, 413, "exceeds")
    # A file just over the limit inside a body the envelope allowance lets through: the file check refuses it.
    json_error(upload(client, big[: (LIMIT_MB << 20) + 10]), 413, "upload limit")


@pytest.fixture(scope="module")
def bad_files():
    return broken_files(Image.open(QUERIES / "cat_crop.jpg").convert("RGB"))


@pytest.mark.parametrize("name", ["truncated.jpg", "truncated.png", "empty.jpg", "text.jpg", "bomb.png", "corrupt.tif"])
def test_bad_uploads_are_422_naming_file_and_reason(client, bad_files, name):
    data, reason = bad_files[name]
    json_error(upload(client, data, name=f"dir/{name}"), 422, name, reason)


def test_bomb_header_within_the_byte_limit_is_refused(client):
    """A few hundred bytes claiming 40000 x 40000 pixels: refused, the server keeps serving."""
    bomb = png_header(40_000, 40_000)
    assert len(bomb) < 1000
    message = json_error(upload(client, bomb, name="bomb.png"), 422, "bomb.png")
    assert "bomb" in message or "pixel" in message
    assert upload(client, k=1).status_code == 200


@pytest.mark.parametrize("request_args, status, words", [
    (("GET", "/api/thumb/12345"), 404, ["no indexed image has key 12345"]),
    (("GET", "/api/thumb/99999999999999999999999"), 404, ["no indexed image"]),
    (("GET", "/api/thumb/abc"), 404, []),
    (("GET", "/api/thumb/-5"), 404, []),
    (("GET", "/api/search?key=12345"), 404, ["12345"]),
    (("GET", "/api/search?key=x"), 422, ["key"]),
    (("GET", "/api/nothing-here"), 404, []),
    (("POST", "/api/info"), 405, []),
    (("POST", "/api/search"), 422, ["image", "required"]),
])
def test_request_errors_are_json(client, request_args, status, words):
    json_error(client.request(*request_args), status, *words)


@pytest.mark.parametrize("params, status, words", [
    ({"where": "path LIKE"}, 400, ["invalid filter where='path LIKE':"]),
    ({"where": "no_such_column = 1"}, 400, ["invalid filter where='no_such_column = 1':"]),
    ({"mode": "colour"}, 422, ["mode"]),
    ({"rerank": "magic"}, 422, ["rerank"]),
    ({"k": 0}, 422, ["k"]),
    ({"k": 13}, 400, ["k=13 is larger than the 12 images"]),
    ({"candidates": 0}, 422, ["candidates"]),
])
def test_bad_search_options(client, keys, params, status, words):
    json_error(client.get("/api/search", params={"key": keys["coins.jpg"], **params}), status, *words)
    json_error(upload(client, **params), status, *words)


def test_where_filter_with_no_match_is_empty(client, keys):
    r = client.get("/api/search", params={"key": keys["coins.jpg"], "where": "path LIKE '%nothing%'"})
    assert r.status_code == 200 and r.json()["hits"] == []


TRAVERSALS = ["/api/thumb/../../etc/passwd", "/static/../../pyproject.toml", "/static/../../../etc/passwd",
              "/static/..%2F..%2Fpyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml", "/api/thumb/..%2F..%2Fetc%2Fpasswd",
              "/static/../server/app.py", "/static/%2e%2e/app.py", "/static//etc/passwd", "/../pyproject.toml"]


def test_no_path_traversal(app):
    """Raw request paths over a real socket (no client folds the dots): 404, and never a file's text."""
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        for path in TRAVERSALS:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read().decode(errors="replace")
            conn.close()
            assert r.status == 404, (path, r.status, body[:200])
            assert "[project]" not in body and "root:" not in body and "import" not in body, path
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/static/app.js")  # the static files themselves are served
        r = conn.getresponse()
        assert r.status == 200 and b"textContent" in r.read()


def test_page_and_headers(client):
    r = client.get("/")
    assert r.status_code == 200 and "/static/app.js" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/docs").status_code == 200
    assert "/api/search" in client.get("/openapi.json").json()["paths"]


def test_no_cors_unless_asked(app, client):
    preflight = {"Origin": "http://elsewhere.test", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.get("/api/info", headers={"Origin": "http://elsewhere.test"}).headers
    assert "access-control-allow-origin" not in client.options("/api/search", headers=preflight).headers
    allowed = TestClient(create_app(app.state.service.index, cors=["http://elsewhere.test"]))
    r = allowed.get("/api/info", headers={"Origin": "http://elsewhere.test"})
    assert r.headers["access-control-allow-origin"] == "http://elsewhere.test"
    r = allowed.get("/api/info", headers={"Origin": "http://other.test"})
    assert "access-control-allow-origin" not in r.headers


def test_internal_error_is_a_json_500_and_logged(tmp_path, new_index, photos, caplog):
    """The table's version history vanishes under a running server (a damaged database, not a missing
    one): the client gets a message, the log the traceback."""
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    key = next(iter(lancedb.connect(str(db)).open_table("images").to_arrow().column("key").to_pylist()))
    client = TestClient(create_app(Index(db)), raise_server_exceptions=False)
    assert client.get(f"/api/thumb/{key}").status_code == 200
    shutil.rmtree(db / "images.lance" / "_versions")
    with caplog.at_level(logging.ERROR, logger="simsearch.server"):
        message = json_error(client.get(f"/api/thumb/{key}"), 500, "internal error", "server log")
    assert "Traceback" not in message
    assert any(record.exc_info for record in caplog.records)


def test_bind_warning():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert bind_warning(host, 8000) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        warning = bind_warning(host, 8000)
        assert warning.startswith("WARNING") and f"{host}:8000" in warning and "no authentication" in warning


def test_serve_command(tmp_path, new_index, photos, cli):
    """`simsearch serve` in a subprocess: it loads the database, says where to go, and answers."""
    code, out, err = cli("serve", "--db", tmp_path / "missing")
    one_line_error(code, out, err, "missing", "no simsearch database")
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*cli_command(), "serve", "--db", str(db), "--port", str(port), "--max-upload-mb", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, COLUMNS="200"))
    try:
        info = None
        for _ in range(600):
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.2)
        assert info is not None and info.status_code == 200
        assert info.json()["rows"] == 12 and info.json()["server"]["max_upload_bytes"] == 2 << 20
        assert "access-control-allow-origin" not in info.headers
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert f"12 images, model {Index(db).conf.model}: open http://127.0.0.1:{port}" in " ".join(err.split())
    assert "WARNING" not in err and "Traceback" not in err


def test_empty_database_answers_409(tmp_path, new_index):
    db = tmp_path / "db"
    new_index(db).ensure_table()
    client = TestClient(create_app(Index(db)))
    assert client.get("/api/info").json()["rows"] == 0
    json_error(upload(client), 409, "holds no images")


def test_candidates_above_the_cap_are_refused(client, keys, embedded_db):
    """More first-stage hits to rerank than MAX_CANDIDATES: 422 from both searches, before any work;
    the library refuses them too, with a message that names no option of the CLI."""
    from simsearch import Index
    from simsearch.errors import SimsearchError
    from simsearch.index import MAX_CANDIDATES

    key = keys["chelsea.jpg"]
    ok = client.get("/api/search", params={"key": key, "k": 3, "rerank": "aas", "candidates": MAX_CANDIDATES})
    assert ok.status_code == 200 and len(ok.json()["hits"]) == 3
    over = client.get("/api/search", params={"key": key, "k": 3, "rerank": "aas", "candidates": MAX_CANDIDATES + 1})
    assert over.status_code == 422 and "candidates" in over.json()["error"]
    upload = client.post("/api/search", files={"image": ("q.jpg", (QUERIES / "cat_crop.jpg").read_bytes(), "image/jpeg")},
                         data={"rerank": "aas", "candidates": str(MAX_CANDIDATES + 1)})
    assert upload.status_code == 422 and "candidates" in upload.json()["error"]
    with pytest.raises(SimsearchError, match=f"1 to {MAX_CANDIDATES}") as e:
        Index(embedded_db[0]).search(QUERIES / "cat_crop.jpg", k=3, rerank="aas", candidates=MAX_CANDIDATES + 1)
    assert "--" not in str(e.value)


# -- the verified reranker's correspondences ---------------------------------------------------
def test_verified_hits_carry_their_correspondences(client, keys, embedded_db):
    """rerank=verified: each hit's inlier pairs, query points inside the query's frame and hit points
    inside the hit's pixels (the frame the page scales them from)."""
    r = upload(client, k=3, rerank="verified")
    assert r.status_code == 200, r.text
    query, hits = r.json()["query"], r.json()["hits"]
    assert os.path.basename(hits[0]["path"]) == "chelsea.jpg" and hits[0]["matches"]
    assert (query["width"], query["height"]) == Image.open(QUERIES / "cat_crop.jpg").size
    fw, fh = query["frame"]
    for hit in hits:
        assert (hit["width"], hit["height"]) == Image.open(hit["path"]).size
        assert len(hit["matches"]) <= hit["scores"]["inliers"]
        for m in hit.get("matches", []):
            assert 0 <= m["query"][0] <= fw and 0 <= m["query"][1] <= fh, m
            assert 0 <= m["hit"][0] <= hit["width"] and 0 <= m["hit"][1] <= hit["height"], m
    by_key = client.get("/api/search", params={"key": keys["chelsea.jpg"], "k": 2, "rerank": "verified"}).json()
    assert by_key["query"]["frame"] == list(Image.open(embedded_db[1] / "chelsea.jpg").size)
    assert by_key["hits"][0]["key"] == keys["chelsea.jpg"] and by_key["hits"][0]["matches"]


# -- region boxes ------------------------------------------------------------------------------
@pytest.mark.parametrize("box, words", [
    ("1,2,3", ["four integers"]),
    ("a,b,c,d", ["four integers"]),
    ("1.5,2,30,40", ["four integers"]),
    ("30,2,10,40", ["x0 < x1"]),
    ("0,40,10,40", ["y0 < y1"]),
    ("-1,0,10,10", ["outside"]),
    ("0,0,100000,10", ["outside"]),
])
def test_bad_boxes_are_422_naming_the_reason(client, keys, embedded_db, box, words):
    w, h = Image.open(embedded_db[1] / "coins.jpg").size
    message = json_error(client.get("/api/search", params={"key": keys["coins.jpg"], "box": box}), 422, "box", *words)
    assert "\n" not in message
    if "outside" in words:
        assert f"{w}x{h}" in message
    qw, qh = Image.open(QUERIES / "cat_crop.jpg").size
    message = json_error(upload(client, box=box), 422, "box", *words)
    assert "outside" not in words or (f"{qw}x{qh}" in message and "cat_crop.jpg" in message)


# -- the collection ----------------------------------------------------------------------------
def catalog_in_write_order(db: Path) -> list[dict]:
    """The catalog as LanceDB reads it whole, in its stored order, with the payload's sizes."""
    conn = lancedb.connect(str(db))
    files = conn.open_table("files").to_arrow().select(["key", "path", "size", "mtime_ns"]).to_pylist()
    sizes = {r["key"]: r for r in conn.open_table("images").to_arrow().select(["key", "width", "height"]).to_pylist()}
    return [{"key": str(f["key"]), "path": f["path"], "width": sizes[f["key"]]["width"], "height": sizes[f["key"]]["height"],
             "bytes": f["size"], "mtime": f["mtime_ns"] / 1e9} for f in files]


@pytest.mark.parametrize("order", ["newest", "oldest"])
def test_image_pages_cover_the_collection(client, embedded_db, order):
    expected = catalog_in_write_order(embedded_db[0])
    expected = expected[::-1] if order == "newest" else expected
    pages = [client.get("/api/images", params={"offset": o, "limit": 5, "order": order}).json() for o in (0, 5, 10, 15)]
    assert [len(p["images"]) for p in pages] == [5, 5, 2, 0] and {p["total"] for p in pages} == {12}
    assert [item for p in pages for item in p["images"]] == expected
    assert all(os.path.exists(item["path"]) and os.path.getsize(item["path"]) == item["bytes"] for item in expected)


def synthetic_rows(store, n: int, start: int = 0) -> "pa.Table":
    """`n` payload + catalog rows of the store's shapes under /synthetic/d<i % 3>/ (no files behind them)."""
    import pyarrow as pa

    schema = store.schema
    tokens, dim = store.meta["dense_shape"]
    cols = {f.name: f.type for f in schema}
    ids = range(start, start + n)
    paths = [f"/synthetic/d{i % 3}/img{i:06d}.jpg" for i in ids]
    from simsearch.store import path_key

    return pa.table({
        "key": pa.array([path_key(p) for p in paths], pa.int64()), "id": [f"{i:032x}" for i in ids], "path": paths,
        "width": pa.array([100 + i % 7 for i in ids], pa.int32()), "height": pa.array([80] * n, pa.int32()),
        "content": pa.array([[0.0] * cols["content"].list_size] * n, cols["content"]),
        "style": pa.array([[0.0] * cols["style"].list_size] * n, cols["style"]),
        "dense": pa.array([bytes(2 * tokens * dim)] * n, pa.binary()), "thumb": pa.array([b"jpeg"] * n, pa.binary()),
        "size": pa.array(list(ids), pa.int64()), "mtime_ns": pa.array([10**18 + i for i in ids], pa.int64()),
    })


def test_image_pages_read_only_their_rows(tmp_path, new_index, photos):
    """On a catalog of ~3,000 rows written in 13 parts, with deletions, every page request reads the page's
    rows and no more (Lance's own scan statistics), and pages still line up with a whole read."""
    db = tmp_path / "db"
    index = new_index(db)
    index.add_folder(photos)
    for start in range(0, 3000, 250):
        index.store.put(synthetic_rows(index.store, 250, start))
    index.store.delete_paths([f"/synthetic/d{i % 3}/img{i:06d}.jpg" for i in range(100, 3000, 97)])
    index.store.compact(full=True)  # as an index run does once enough rows are new: the key and path indexes cover them
    whole = catalog_in_write_order(db)[::-1]
    client = TestClient(create_app(index, query_cache=1), raise_server_exceptions=False)
    scans = []
    index.store.on_scan = scans.append
    limit = 10
    folder = [r for r in whole if r["path"].startswith("/synthetic/d1/")]
    for params, expected in [({"offset": 0}, whole), ({"offset": 1500}, whole), ({"offset": len(whole) - 4}, whole),
                             ({"offset": 500, "under": "/synthetic/d1"}, folder), ({"offset": 0, "under": str(photos)}, whole[-12:])]:
        scans.clear()
        page = client.get("/api/images", params={"limit": limit, **params}).json()
        assert page["images"] == expected[params["offset"]:params["offset"] + limit]
        assert page["total"] == len(expected)
        data_reads = [s for s in scans if s.bytes_read > 0]
        assert sum(s.all_counts.get("rows_scanned", 0) for s in data_reads) <= 2 * limit, [s.all_counts for s in scans]
        if "under" in params:  # the folder's row ids come from the path index, no row data read
            assert len(scans) == len(data_reads) + 1
    assert len(whole) > 100 * 2 * limit


def test_folders_follow_the_stored_paths(tmp_path, new_index, photos):
    """Subfolders with image counts, a chain of single folders skipped, counted against the files on disk."""
    for i, p in enumerate(sorted(photos.glob("*.jpg"))):
        target = photos / ("a" if i % 3 == 0 else "b/deep/er") / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        p.rename(target)
    index = new_index(tmp_path / "db")
    index.add_folder(photos)
    client = TestClient(create_app(index, query_cache=1), raise_server_exceptions=False)
    on_disk = {name: len(list((photos / name).rglob("*.jpg"))) for name in ("a", "b")}
    root = client.get("/api/folders").json()
    assert root["folder"] == str(photos) and root["images"] == 12 and root["here"] == 0
    assert root["folders"] == [{"path": str(photos / n), "name": n, "images": on_disk[n]} for n in ("a", "b")]
    deep = client.get("/api/folders", params={"under": str(photos / "b") + "/"}).json()
    assert deep == {"folder": str(photos / "b/deep/er"), "images": on_disk["b"], "here": on_disk["b"],
                    "folders": [], "more_folders": 0}
    page = client.get("/api/images", params={"under": str(photos / "a"), "limit": 100}).json()
    assert sorted(os.path.basename(i["path"]) for i in page["images"]) == sorted(p.name for p in (photos / "a").glob("*.jpg"))
    nothing = client.get("/api/images", params={"under": "/no/such/folder"}).json()
    assert nothing["images"] == [] and nothing["total"] == 0
    assert client.get("/api/folders", params={"under": "/no/such/folder"}).json()["images"] == 0


@pytest.mark.parametrize("params, words", [
    ({"limit": 0}, ["limit"]), ({"limit": 501}, ["limit"]), ({"offset": -1}, ["offset"]),
    ({"order": "random"}, ["order"]), ({"limit": "x"}, ["limit"]), ({"under": "x" * 4001}, ["under"]),
])
def test_bad_image_page_requests(client, params, words):
    json_error(client.get("/api/images", params=params), 422, *words)
