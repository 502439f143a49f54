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
    got = [{name: value for name, value in hit.items() if name != "key"} for hit in r.json()["hits"]]
    assert got == expected
    assert len(got) == k and (where is None or all("chelsea" not in h["path"] for h in got))
    assert first is None or os.path.basename(got[0]["path"]) == first
    query = r.json()["query"]
    assert (query["mode"], query["k"], query["rerank"], query["key"]) == (mode, k, rerank or "none", None)
    assert len(query["id"]) >= 16


def test_search_by_key_finds_itself_first(client, keys):
    r = client.get("/api/search", params={"key": keys["coffee.jpg"], "k": 12, "rerank": "both"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["key"] == keys["coffee.jpg"] and hits[0]["scores"]["first_stage"] == pytest.approx(1, abs=1e-5)
    assert sorted(h["key"] for h in hits) == sorted(keys.values())  # every row once
    assert [h["rank"] for h in hits] == list(range(1, 13))
    assert r.json()["query"] == {"id": None, "key": keys["coffee.jpg"], "mode": "content", "k": 12, "rerank": "both",
                                 "candidates": 50, "where": None}


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
    ({"where": "path LIKE"}, 400, ["invalid --where filter"]),
    ({"where": "no_such_column = 1"}, 400, ["invalid --where filter"]),
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
