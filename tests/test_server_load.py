"""A real uvicorn server on loopback under concurrent clients, and while another process runs
`simsearch index` into its database. Real LanceDB, real FAISS; no timing thresholds, only outcomes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import QUERIES, cli_command, table_rows, tiny_cli_options, write_patterns
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
    """Three clients search and read /api/info while `simsearch index` commits 240 new images, 4 rows
    per commit, into the served database; a fourth only reads /api/info. No request fails; every row
    count seen is a whole number of commits (never a half-written state) and never goes down, counts
    between the first and the last are served, every hit's thumbnail is there, and after the last
    commit the new images are found. (The tiny model indexes all 240 in about a second: a searching
    client's loop, with its five thumbnails, can miss the whole run, so the growth is watched by the
    client that only reads the count.)"""
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    new = write_patterns(tmp_path / "new", 240)
    query = new[-1].read_bytes()
    with live_server(create_app(Index(db))) as url:
        indexer = subprocess.Popen([*cli_command(), "index", str(tmp_path / "new"), "--db", str(db), "--commit-every", "4",
                                    "--batch-size", "4", *tiny_cli_options(tiny_model)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200"))
        failures: list[str] = []
        watched, *searched = seen = [[] for _ in range(4)]  # row counts read by the watcher and by each searcher

        def client(rows: list[int], searches: bool):
            with httpx.Client(base_url=url, timeout=120) as c:
                while indexer.poll() is None:
                    info = c.get("/api/info")
                    if info.status_code != 200:
                        failures.append(info.text)
                        continue
                    rows.append(info.json()["rows"])
                    if not searches:
                        continue
                    r = search_upload(c, query, "pat.png", k=5, mode="style")
                    if r.status_code != 200 or len(r.json()["hits"]) != 5:
                        failures.append(r.text)
                        continue
                    failures.extend(f"thumb {h['path']}" for h in r.json()["hits"]
                                    if c.get(f"/api/thumb/{h['key']}").status_code != 200)

        threads = [threading.Thread(target=client, args=(watched,), kwargs={"searches": False}),
                   *(threading.Thread(target=client, args=(rows,), kwargs={"searches": True}) for rows in searched)]
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
    commits = {12 + 4 * i for i in range(61)}
    for rows in seen:
        assert rows == sorted(rows) and set(rows) <= commits, rows
    assert len(set(watched)) >= 3, seen  # counts between the first and the last were served


SERVE = """
import sys, threading, time
import faiss, uvicorn, socket
import transformers
from simsearch import Index
from simsearch.server import create_app

transformers.utils.logging.disable_progress_bar()  # the model's loading bar is not a server log line
app = create_app(Index(sys.argv[1], ivf_threshold=int(sys.argv[2])))

@app.get("/test/faiss-threads")
def faiss_threads():  # a sync route: answered on the same worker threads as the searches
    return {"threads": faiss.omp_get_max_threads()}

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
thread.start()
while not server.started:
    time.sleep(0.05)
print(sock.getsockname()[1], flush=True)
sys.stdin.read()
server.should_exit = True
thread.join(30)
"""

INDEXER = """
import shutil, sys
from pathlib import Path
from simsearch import Index

db, folder, staging, rounds = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
for r in range(rounds):
    for p in sorted((staging / f"round{r}" / "new").iterdir()):
        shutil.copy(p, folder / p.name)
    for p in sorted((staging / f"round{r}" / "changed").iterdir()):
        shutil.copy(p, folder / p.name)  # same name, other content: replaced
    for name in (staging / f"round{r}" / "deleted").read_text().split():
        (folder / name).unlink()
    report = Index(db, ivf_threshold=int(sys.argv[5])).add_folder(folder, prune=True, batch_size=4, write_rows=4)
    print(r, report.added, report.updated, report.pruned, flush=True)
"""


def test_serve_stress_beside_an_indexer_that_adds_replaces_and_prunes(tmp_path, new_index):
    """`serve` (a separate process, OMP_NUM_THREADS=2) on 3,030 rows with IVF indexes, 4 clients
    querying by upload and by key, content and style, with and without reranking, while another
    process adds, replaces and prunes files in 5 rounds of commits of 4 rows. Every response is 200
    with k hits ranked 1..k whose paths are rows the table has held, the server logs nothing, and the
    FAISS thread count of its worker threads is what it was, and the clients saw the table change.
    Bounded: each client stops when the indexer is done, after 30 to 300 requests."""
    import numpy as np

    from simsearch.store import make_rows, path_key

    k, threshold, rounds, clients, fewest, most = 5, 1000, 5, 4, 30, 300
    folder, staging, db = tmp_path / "photos", tmp_path / "staging", tmp_path / "db"
    write_patterns(folder, 30)
    ever = {str(p) for p in folder.iterdir()}
    names = sorted(p.name for p in folder.iterdir())
    for r in range(rounds):  # what the indexer does each round, prepared here
        added = write_patterns(staging / f"round{r}" / "new", 8, start=100 + 10 * r)
        ever |= {str(folder / p.name) for p in added}
        changed = names[r * 4:r * 4 + 4]
        (staging / f"round{r}" / "changed").mkdir()
        for j, name in enumerate(changed):
            write_patterns(staging / f"round{r}" / "tmp", 1, start=500 + 4 * r + j)[0].rename(staging / f"round{r}" / "changed" / name)
        deleted = names[-3 * (r + 1):len(names) - 3 * r]
        (staging / f"round{r}" / "deleted").write_text(" ".join(deleted))
        names = sorted({*names, *(p.name for p in added)} - set(deleted))
    index = new_index(db, ivf_threshold=threshold)
    index.add_folder(folder)
    real = index.store.rows(index.store.vectors("content")[0], ["width", "height", "content", "style", "dense", "thumb"])
    rng = np.random.default_rng(0)
    synthetic = [f"/synthetic/{i:05d}.png" for i in range(3000)]
    for start in range(0, len(synthetic), 1000):  # copies of the real rows, their vectors moved a little
        src = [real[i % len(real)] for i in range(start, start + 1000)]
        noisy = {c: np.stack([r[c] for r in src]) + 0.05 * rng.standard_normal((1000, len(src[0][c]))) for c in ("content", "style")}
        index.store.put(make_rows(synthetic[start:start + 1000], *(x / np.linalg.norm(x, axis=1, keepdims=True) for x in noisy.values()),
                                  [r["dense"] for r in src], widths=[r["width"] for r in src], heights=[r["height"] for r in src],
                                  thumbs=[r["thumb"] for r in src]))
    index.refresh_ann()
    assert index.count() == 3030 and index.vector_index("style").kind == "ivf"
    ever |= set(synthetic)
    query = (folder / "pat0003.png").read_bytes()

    env = dict(os.environ, OMP_NUM_THREADS="2")
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(db), str(threshold)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        with httpx.Client(base_url=url, timeout=120) as c:
            threads_before = {c.get("/test/faiss-threads").json()["threads"] for _ in range(20)}
        indexer = subprocess.Popen([sys.executable, "-c", INDEXER, str(db), str(folder), str(staging), str(rounds), str(threshold)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        plans = [dict(mode=m, rerank=rr) for m in ("content", "style") for rr in ("none", "aas", "matches")]

        versions: set[int] = set()

        def client(seed: int) -> list[str]:
            problems, done = [], 0
            pick = np.random.default_rng(seed)
            with httpx.Client(base_url=url, timeout=120) as c:
                while done < most and (done < fewest or indexer.poll() is None):
                    if done % 3 == 0:  # often enough to see the indexer's commits on a fast machine
                        r = c.get("/api/info")
                        if r.status_code == 200:
                            versions.add(r.json()["table_version"])
                        else:
                            problems.append(f"info {r.status_code} {r.text[:200]}")
                    plan = plans[done % len(plans)]
                    form = dict(k=k, candidates=2 * k, **plan)
                    if (done + seed) % 2:
                        r = search_upload(c, query, "q.png", **form)
                    else:
                        r = c.get("/api/search", params={"key": path_key(synthetic[int(pick.integers(3000))]), **form})
                    done += 1
                    if r.status_code != 200:
                        problems.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    hits = r.json()["hits"]
                    if [h["rank"] for h in hits] != list(range(1, k + 1)) or not {h["path"] for h in hits} <= ever:
                        problems.append(f"hits {[(h['rank'], h['path']) for h in hits]}")
            return problems + [f"done {done}"]

        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(client, range(clients)))
        indexed = indexer.communicate(timeout=600)[0]
        assert indexer.returncode == 0, indexed
        with httpx.Client(base_url=url, timeout=120) as c:
            threads_after = {c.get("/test/faiss-threads").json()["threads"] for _ in range(20)}
            info = c.get("/api/info").json()
    finally:
        _, log = server.communicate("", timeout=60)
    counts = [int(p.split()[-1]) for problems in results for p in problems if p.startswith("done")]
    assert [p for problems in results for p in problems if not p.startswith("done")] == []
    assert all(fewest <= n <= most for n in counts), counts
    assert log.strip() == "" and server.returncode == 0, log[-3000:]
    assert threads_before == threads_after == {2}
    assert len(versions) > 2, versions  # the queries ran beside the indexer's commits
    assert info["rows"] == 3000 + len(names) == len(table_rows(db))
    print(f"stress: {sum(counts)} requests from {clients} clients beside {rounds} indexer rounds, 0 errors")
