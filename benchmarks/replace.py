"""What a commit of replaced rows costs as the table grows: `ImageStore.put` of a batch of new rows
(one append) against a batch half of whose rows replace rows already there (one merge by key, so that
no reader sees a version without them), on stores of synthetic rows (make_rows: 384-d content, 32-d
style, `--dense-bytes` random bytes of dense tensor per row), with the table's peak RSS.

    python benchmarks/replace.py [--sizes 100000 1000000] [--batch 256] [--repeats 5] [--dense-bytes 1024]

Each size is built once under --work (in commits of 50,000 rows, then compacted) and reused.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

import numpy as np

import common
from common import log

DIM = {"content": 384, "style": 32}


def rows(start: int, n: int, dense_bytes: int, seed: int):
    from simsearch.store import make_rows

    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return make_rows([f"/synthetic/{i // 1000:04d}/{i:07d}.png" for i in range(start, start + n)],
                     unit(rng.normal(size=(n, DIM["content"]))), unit(rng.normal(size=(n, DIM["style"]))),
                     [rng.bytes(dense_bytes) for _ in range(n)])


def build(db: Path, n: int, dense_bytes: int):
    from simsearch.store import ImageStore

    store = ImageStore(db)
    if store.exists() and store.count() == n:
        return store
    shutil.rmtree(db, ignore_errors=True)
    store = ImageStore(db)
    store.create({"config": {"dense_dtype": "float16"}, "weights": "synthetic", "dense_shape": [1, 1]},
                 DIM["content"], DIM["style"])
    for a in range(0, n, 50_000):
        store.put(rows(a, min(50_000, n - a), dense_bytes, seed=a))
    store.compact(full=True)
    return store


def measure(store, n: int, args, next_row: list[int]) -> dict:
    """Median seconds of `repeats` puts of each kind, and the growth of peak RSS over them."""
    import pyarrow as pa

    out = {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for kind in ("append", "replace half"):
        seconds = []
        for r in range(args.repeats):
            new = rows(next_row[0], args.batch, args.dense_bytes, seed=10**6 + next_row[0])
            next_row[0] += args.batch
            if kind == "replace half":  # the first half of the batch takes the keys of rows already there
                old = rows(int(np.random.default_rng(r).integers(0, n - args.batch)), args.batch // 2, args.dense_bytes, seed=r)
                new = pa.concat_tables([old, new.slice(0, args.batch - args.batch // 2)])
            v = store.version
            t = time.perf_counter()
            store.put(new)
            seconds.append(time.perf_counter() - t)
            assert store.version == v + 1, "one commit per put"
        out[kind] = {"seconds_p50": float(np.median(seconds)), "load": common.loadavg()}
    out["peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    return out


def render(r: dict) -> str:
    lines = ["# Replacing rows: one commit per put", "",
             f"`{r['command']}` on {r['date']}: {common.machine_line(r['machine'])}. `ImageStore.put` of {r['batch']} rows "
             f"(p50 of {r['repeats']}); synthetic rows with {r['dense_bytes']:,} bytes of dense tensor each. "
             "'replace half': half the batch replaces rows already in the table (a LanceDB merge by key), "
             "the rest is new; 'append': all new. Ratio = replace / append in the same process.", "",
             "| rows | append s | replace half s | ratio | peak RSS growth MB | load |", "|---|---|---|---|---|---|"]
    for n, x in r["results"].items():
        a, m = x["append"]["seconds_p50"], x["replace half"]["seconds_p50"]
        lines.append(f"| {int(n):,} | {a:.3f} | {m:.3f} | {m / a:.1f} | {x['peak_rss_growth_mb']:.0f} | "
                     f"{x['replace half']['load']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[100_000, 1_000_000])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dense-bytes", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=Path("/tmp/simsearch-replace"))
    ap.add_argument("--quick", action="store_true", help="a run of seconds")
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS)
    args = common.parse_args(ap, argv, quick=dict(sizes=[2000], batch=32, repeats=2, dense_bytes=64))
    results, next_row = {}, [10**8]
    for n in args.sizes:
        store = build(args.work / f"rows{n}", n, args.dense_bytes)
        results[str(n)] = measure(store, store.count(), args, next_row)
        log.info("%d rows: %s", n, results[str(n)])
    r = {"command": common.command_line(), "date": common.now(), "machine": common.machine_info(), "batch": args.batch,
         "repeats": args.repeats, "dense_bytes": args.dense_bytes, "results": results}
    common.write_results("replace", r, render(r), args.out_dir)


if __name__ == "__main__":
    main()
