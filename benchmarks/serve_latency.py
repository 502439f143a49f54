"""Warm query latency of `simsearch serve` through HTTP, and requests/s with concurrent clients.

    python benchmarks/serve_latency.py [--sizes 1000 10000] [--queries 60] [--clients 4] [--per-client 15]
    python benchmarks/serve_latency.py render       # serve.md from serve.json only
    python benchmarks/serve_latency.py --sizes 40 --queries 2 --rerank-queries 1 --clients 2 --per-client 2 \
        --model DIR --work DIR --out-dir DIR --in-process     # the smoke test's run

For each size a database is built once under --work: the 12 examples/images photos embedded with the
embedded DINOv2-S/14, their rows replicated with small noise on the pooled vectors (dense tensors and
thumbnails copied) and written through the public store API. The server is the real
`simsearch serve` in its own process with the machine's default torch threads; every query is a real
upload (a photo from examples/ or examples/queries/) that runs decode + forward + FAISS search on the
server. Latency is measured by the client, from sending the request to the parsed JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import EXAMPLES, RESULTS, loadavg, machine_info, machine_line
from common import percentile as pct

from simsearch.backbones import DEFAULT_MODEL

NOISE = 0.02  # per-dimension noise on unit vectors of 384-768 dims: replicas stay near, never equal
QUERY_FILES = sorted(EXAMPLES.glob("*.jpg")) + sorted((EXAMPLES.parent / "queries").glob("*.jpg"))


def build_db(work: Path, n: int, model: str) -> Path:
    """A database of n rows made from the 12 photos' real rows (see the module docstring)."""
    import numpy as np

    from simsearch import Index
    from simsearch.store import make_rows

    base_db, db = work / "base", work / f"rows{n}"
    if db.exists() and Index(db).count() == n:
        return db
    base = Index(base_db, model=model)
    if base.count() == 0:
        base.add_folder(EXAMPLES)
    keys = base.store.vectors("content")[0]
    rows = base.store.rows(keys, ["path", "width", "height", "content", "style", "dense", "thumb"])
    target = Index(db, conf=base.conf)
    target.ensure_table()
    rng = np.random.default_rng(0)
    for start in range(0, n, 1000):
        chunk = range(start, min(n, start + 1000))
        src = [rows[i % len(rows)] for i in chunk]
        paths = [f"/synthetic/{i:06d}/{Path(r['path']).name}" for i, r in zip(chunk, src)]

        def noisy(column):
            x = np.stack([np.asarray(r[column], np.float32) for r in src])
            x = x + NOISE * rng.standard_normal(x.shape, dtype=np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        target.store.put(make_rows(paths, noisy("content"), noisy("style"), [r["dense"] for r in src],
                                   widths=[r["width"] for r in src], heights=[r["height"] for r in src],
                                   thumbs=[r["thumb"] for r in src]))
    target.store.compact()
    target.refresh_ann()
    print(f"built {db}: {target.count()} rows", flush=True)
    return db


class Server:
    """`simsearch serve` in a subprocess on a free loopback port; `in_process`: the app it serves under
    uvicorn in a thread of this process (the smoke test's run: no second Python start)."""

    def __init__(self, db: Path, in_process: bool = False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = self.thread = None
        if in_process:
            import uvicorn

            from simsearch.server import create_app

            self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(db), port=self.port, log_level="warning"))
            self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
            self.thread.start()
            return
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        self.proc = subprocess.Popen([sys.executable, "-c", "from simsearch.cli import main; main()", "serve",
                                      "--db", str(db), "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    def __enter__(self):
        import httpx

        t = time.perf_counter()
        while True:
            try:
                self.info = httpx.get(self.url + "/api/info", timeout=5).raise_for_status().json()
                break
            except httpx.TransportError:
                if self.thread is not None and not self.thread.is_alive():
                    raise RuntimeError("the in-process server stopped")
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stderr.read())
                time.sleep(0.2)
        self.startup_s = time.perf_counter() - t
        return self

    def __exit__(self, *exc):
        if self.thread is not None:
            self.uvicorn.should_exit = True
            self.thread.join(timeout=60)
        else:
            self.proc.terminate()
            self.proc.wait(timeout=60)


def timed_queries(url: str, files: list[Path], count: int, offset: int = 0, **form) -> list[dict]:
    """`count` uploads in a row on one connection: client seconds and the server's own stage times."""
    import httpx

    out = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for i in range(count):
            f = files[(offset + i) % len(files)]
            data = f.read_bytes()
            t = time.perf_counter()
            r = client.post("/api/search", files={"image": (f.name, data, "image/jpeg")},
                            data={"k": "10", **{k: str(v) for k, v in form.items()}})
            body = r.json()
            seconds = time.perf_counter() - t
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {body}")
            out.append({"s": seconds, **{f"server_{k}_ms": v for k, v in body["ms"].items()}})
    return out


def summary(samples: list[dict]) -> dict:
    s = [x["s"] for x in samples]
    res = {"n": len(s), "p50_s": pct(s, 50), "p95_s": pct(s, 95), "mean_s": sum(s) / len(s)}
    for key in samples[0]:
        if key.startswith("server_"):
            res[key.removeprefix("server_") + "_p50"] = pct([x[key] for x in samples], 50)
    return res


def measure(db: Path, queries: int, clients: int, per_client: int, rerank_queries: int, in_process: bool) -> dict:
    with Server(db, in_process) as server:
        timed_queries(server.url, QUERY_FILES, 3)  # first requests: connections, allocator, caches
        load0 = loadavg()
        sequential = summary(timed_queries(server.url, QUERY_FILES, queries))
        sequential["load"] = [load0, loadavg()]
        load0 = loadavg()
        reranked = summary(timed_queries(server.url, QUERY_FILES, rerank_queries, rerank="both", candidates=50))
        reranked["load"] = [load0, loadavg()]
        results: list[list[dict]] = [[] for _ in range(clients)]
        threads = [threading.Thread(target=lambda i=i: results[i].extend(
            timed_queries(server.url, QUERY_FILES, per_client, offset=i * 5))) for i in range(clients)]
        load0 = loadavg()
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        concurrent = summary([x for r in results for x in r])
        concurrent.update({"clients": clients, "requests": clients * per_client, "wall_s": wall,
                           "requests_per_s": clients * per_client / wall, "load": [load0, loadavg()]})
        return {"rows": server.info["rows"], "torch_threads": server.info["server"]["torch_threads"],
                "startup_s": server.startup_s, "sequential": sequential,
                "rerank_both": reranked, "concurrent": concurrent}


def render(out_dir: Path) -> None:
    res = json.loads((out_dir / "serve.json").read_text())
    m = res["machine"]
    lines = [
        "# simsearch serve: warm query latency through HTTP", "",
        f"Measured {res['date']} on {machine_line(m)} (the server: {res['server_torch_threads']} intra-op threads). The "
        "machine is shared with other jobs: the 1-min load average before and after each measurement is given (2.0 = both "
        "cores busy).",
        "", f"Re-run: `{res['command']}`.", "",
        "Each database holds the 12 examples/images photos' real rows (embedded DINOv2-S/14, 224 px) replicated with "
        "small noise on the pooled vectors, written through the store API; FAISS is exact (flat) at these sizes. "
        "Every query is a real JPEG upload (examples/images and examples/queries in turn, k=10) to `simsearch serve` "
        "in its own process: multipart parse, decode, model forward, FAISS search, JSON. Latency is client-side, "
        "request sent to JSON parsed, on loopback; `forward` and `search` are the server's own stage times (p50).", "",
        "| rows | queries | p50 s | p95 s | forward ms p50 | search ms p50 | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, r in res["sizes"].items():
        s = r["sequential"]
        lines.append(f"| {size} | {s['n']} sequential | **{s['p50_s']:.3f}** | {s['p95_s']:.3f} | {s['forward_ms_p50']:.0f} | "
                     f"{s['search_ms_p50']:.1f} | {s['load'][0]:.2f}→{s['load'][1]:.2f} |")
    for size, r in res["sizes"].items():
        s = r["rerank_both"]
        lines.append(f"| {size} | {s['n']} with `rerank=both`, 50 candidates | {s['p50_s']:.3f} | {s['p95_s']:.3f} | "
                     f"{s['forward_ms_p50']:.0f} | {s['search_ms_p50']:.1f} | {s['load'][0]:.2f}→{s['load'][1]:.2f} |")
    lines += ["", "Concurrent clients (each its own connection, uploads back to back; the server runs one forward at a time):", "",
              "| rows | clients | requests | requests/s | p50 s | p95 s | forward ms p50 | waiting for the model ms p50 | load avg |",
              "|---|---|---|---|---|---|---|---|---|"]
    for size, r in res["sizes"].items():
        c = r["concurrent"]
        lines.append(f"| {size} | {c['clients']} | {c['requests']} | **{c['requests_per_s']:.2f}** | {c['p50_s']:.3f} | "
                     f"{c['p95_s']:.3f} | {c['forward_ms_p50']:.0f} | {c['queue_ms_p50']:.0f} | {c['load'][0]:.2f}→{c['load'][1]:.2f} |")
    lines += ["", "Server start to first answer (model, FAISS, one warm-up forward): "
              + ", ".join(f"{size} rows {r['startup_s']:.1f} s" for size, r in res["sizes"].items()) + ".", ""]
    (out_dir / "serve.md").write_text("\n".join(lines))
    print(f"wrote {out_dir / 'serve.md'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="run", choices=["run", "render"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--rerank-queries", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=15)
    ap.add_argument("--work", type=Path, default=Path("/tmp/simsearch-serve-bench"))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--in-process", action="store_true", help="the server in a thread of this process (smoke test)")
    args = ap.parse_args(argv)
    if args.what == "render":
        return render(args.out_dir)
    sizes = {}
    for n in args.sizes:
        sizes[str(n)] = measure(build_db(args.work, n, args.model), args.queries, args.clients, args.per_client,
                                args.rerank_queries, args.in_process)
        print(json.dumps(sizes[str(n)]), flush=True)
    res = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "niceness": os.nice(0),
           "command": "python benchmarks/serve_latency.py " + " ".join(sys.argv[1:]),
           "server_torch_threads": next(iter(sizes.values()))["torch_threads"], "machine": machine_info(), "sizes": sizes}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "serve.json").write_text(json.dumps(res, indent=2) + "\n")
    render(args.out_dir)


if __name__ == "__main__":
    main()
