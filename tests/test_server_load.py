"""A real uvicorn server on loopback under concurrent clients, and while another process runs
`simsearch index` into its database. Real LanceDB, real FAISS; no timing thresholds, only outcomes."""

from __future__ import annotations

import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import QUERIES, cli_command, tiny_cli_options, write_patterns
from live_server import live_server
from simsearch import Index
from simsearch.server import create_app

pytestmark = pytest.mark.slow

CAT = (QUERIES / "cat_crop.jpg").read_bytes()


def search_upload(client: httpx.Client, data: bytes, name: str, **form) -> httpx.Response:
    return client.post("/api/search", files={"image": (name, data, "image/jpeg")}, data={k: str(v) for k, v in form.items()})


def test_bounded_load_has_no_errors(embedded_db):
    """60 requests from 4 concurrent clients: uploads in both modes, searches by key with reranking,
    thumbnails and match pictures. Every one succeeds and the uploads all rank chelsea.jpg first."""
    n, concurrency = 60, 4
    local = threading.local()

    with live_server(create_app(embedded_db[0])) as url:
        def request(i: int) -> tuple[int, str]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=url, timeout=120)
            c = local.client
            kind = i % 4
            if kind < 2:
                r = search_upload(c, CAT, "cat.jpg", mode=("content", "style")[kind], k=5)
                local.last = r.json() if r.status_code == 200 else None
                return r.status_code, os.path.basename(r.json()["hits"][0]["path"]) if r.status_code == 200 else r.text
            if kind == 2:
                key = local.last["hits"][1]["key"] if getattr(local, "last", None) else None
                r = c.get("/api/search", params={"key": key, "k": 4, "rerank": "aas"}) if key else c.get("/api/info")
                return r.status_code, "" if r.status_code == 200 else r.text
            if getattr(local, "last", None):
                hit = local.last["hits"][2]["key"]
                r = c.get(f"/api/match/{hit}", params={"query_id": local.last["query"]["id"]})
                ok = r.status_code == 200 and c.get(f"/api/thumb/{hit}").status_code == 200
                return (200 if ok else r.status_code), "" if ok else r.text
            r = c.get("/api/info")
            return r.status_code, "" if r.status_code == 200 else r.text

        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(request, range(n)))
    assert len(results) == n
    errors = [(i, s, t[:200]) for i, (s, t) in enumerate(results) if s != 200]
    assert errors == []
    assert {top for i, (_, top) in enumerate(results) if i % 4 < 2} == {"chelsea.jpg"}


def test_queries_keep_working_while_another_process_indexes(tmp_path, tiny_model, new_index, photos):
    """Three clients search and read /api/info while `simsearch index` commits 240 new images, 8 rows
    per commit, into the served database. No request fails; every row count seen is a whole number of
    commits (never a half-written state), each client sees it grow, every hit's thumbnail is there, and
    after the last commit the new images are found."""
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    new = write_patterns(tmp_path / "new", 240)
    query = new[-1].read_bytes()
    with live_server(create_app(Index(db))) as url:
        indexer = subprocess.Popen([*cli_command(), "index", str(tmp_path / "new"), "--db", str(db), "--commit-every", "8",
                                    "--batch-size", "4", *tiny_cli_options(tiny_model)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200"))
        failures: list[str] = []
        seen: list[list[int]] = [[] for _ in range(3)]

        def client(rows: list[int]):
            with httpx.Client(base_url=url, timeout=120) as c:
                while indexer.poll() is None:
                    info = c.get("/api/info")
                    if info.status_code != 200:
                        failures.append(info.text)
                        continue
                    rows.append(info.json()["rows"])
                    r = search_upload(c, query, "pat.png", k=5, mode="style")
                    if r.status_code != 200 or len(r.json()["hits"]) != 5:
                        failures.append(r.text)
                        continue
                    failures.extend(f"thumb {h['path']}" for h in r.json()["hits"]
                                    if c.get(f"/api/thumb/{h['key']}").status_code != 200)

        threads = [threading.Thread(target=client, args=(rows,)) for rows in seen]
        for t in threads:
            t.start()
        output = indexer.communicate(timeout=600)[0]
        for t in threads:
            t.join(timeout=120)
        assert indexer.returncode == 0, output
        with httpx.Client(base_url=url, timeout=120) as c:
            assert c.get("/api/info").json()["rows"] == 252
            hit = search_upload(c, query, "pat.png", k=1).json()["hits"][0]
    assert failures == []
    assert hit["path"] == str(new[-1]) and hit["score"] == pytest.approx(1, abs=1e-5)
    commits = {12 + 8 * i for i in range(31)}
    for rows in seen:
        assert rows == sorted(rows) and set(rows) <= commits, rows
    assert len({r for rows in seen for r in rows}) >= 3, seen  # counts between the first and the last were served
