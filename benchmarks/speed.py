"""Speed benchmarks for simsearch: indexing throughput vs bare forward, query latency, CLI cold
start, and memory while indexing. Results go to <out-dir>/speed.json (each command updates its own
section) and speed.md (rendered from the whole JSON); --out-dir defaults to benchmarks/results.

    python benchmarks/speed.py throughput [-n 512] [--batch-size 16] [--repeats 2]
    python benchmarks/speed.py stages     [--images 128]    # CPU ms per image of each stage
    python benchmarks/speed.py latency    [--sizes 1000 10000] [--queries 50]
    python benchmarks/speed.py cold       [--runs 5]        # the 1k db made by `latency`, else examples/images
    python benchmarks/speed.py memory     [-n 10000] [--side 160]
    python benchmarks/speed.py all                          # the five above, in this order
    python benchmarks/speed.py render                       # speed.md from speed.json only
    python benchmarks/speed.py --quick --model DIR --out-dir DIR all   # seconds: checks that it runs

Generated images and databases live under --work (default /tmp/simsearch-speed); image folders
are deterministic (benchmarks/synth.py) and reused between runs. Every timing records the 1-min
load average before and after it, because the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import (RESULTS, command_line, loadavg, log, machine_info, machine_line, measure, now, percentile,
                    setup_logging, update_sections)
from synth import make_folder

DEFAULT_WORK = Path(os.environ.get("SIMSEARCH_SPEED_WORK", "/tmp/simsearch-speed"))
COMMANDS = ("throughput", "stages", "latency", "cold", "memory")
# --quick: every command in seconds, on a handful of images (checks that the script runs; no numbers to keep)
QUICK = {
    "throughput": dict(n=8, batch_size=4, bare_batches=1, repeats=1),
    "stages": dict(n=8, images=8, batch_size=4, write_rows=8, threads=1),
    "latency": dict(sizes=[40, 80], base=8, queries=3, k=3, rounds=1),
    "cold": dict(runs=1, breakdown_runs=1, size=40, queries=3),
    "memory": dict(n=24, side=64, batch_size=8, marks=[8, 16, 24]),
}


# -- helpers ---------------------------------------------------------------------------------------
def update_results(args, section: str, data: dict) -> None:
    data = {"date": now(), "niceness": os.nice(0),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ},
            **data}
    update_sections("speed", {section: data, "machine": machine_info()}, render, args.out_dir)


def synth(work: Path, name: str, n: int, **kw) -> Path:
    folder = work / name
    t = time.perf_counter()
    make_folder(folder, n, **kw)
    log.info("images: %d under %s (%.1f s)", n, folder, time.perf_counter() - t)
    return folder


# -- 1. throughput ---------------------------------------------------------------------------------
def bare_forward(emb, batch_size: int, batches: int, warmup: int = 0) -> dict:
    """img/s of the model on pre-made tensors: the raw transformers Dinov2Model forward, and
    simsearch's Embedder.embed (same blocks + pooling + dense copy to numpy, what the indexer calls)."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, emb.conf.image_size, emb.conf.image_size)
    net = emb.backbone.model
    out = {}
    for name, fn in (("hf_forward", lambda: net(pixel_values=x)), ("embed", lambda: emb.embed(x))):
        with torch.inference_mode():
            for _ in range(warmup):
                fn()
            with measure() as m:
                for _ in range(batches):
                    fn()
        n = batch_size * batches
        out[name] = {"img_s": n / m.seconds, "seconds": m.seconds, "images": n, "cpu_ms_per_img": 1000 * m.cpu_seconds / n,
                     "load_before": m.load_before, "load_after": m.load_after}
    return out


def numpy_to_tensor(img, size: int):
    """An alternative to Embedder.preprocess, compared with it in `stages` (the library is not changed):
    the same normalisation done in numpy, so the reader threads would run no torch ops (each torch op
    there forks an OpenMP team that competes with the model's)."""
    import numpy as np
    import torch
    from PIL import Image

    from simsearch.backbones.vit import IMAGENET_MEAN, IMAGENET_STD

    mean255 = np.asarray(IMAGENET_MEAN, np.float32) * 255
    inv = 1 / (np.asarray(IMAGENET_STD, np.float32) * 255)
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) - mean255) * inv
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def cmd_throughput(args) -> dict:
    import torch

    from simsearch import Index

    work = Path(args.work)
    folder = synth(work, f"real{args.n}", args.n, seed=args.seed, min_side=400, max_side=800)
    runs = []
    shutil.rmtree(work / "tp-probe.db", ignore_errors=True)
    idx0 = Index(work / "tp-probe.db", model=args.model, device="cpu", image_size=args.image_size)
    emb = idx0.embedder  # loaded once, shared by the bare measurements and every indexing run
    # Warm-up: a 16-image run pays the one-time costs (lazy imports of lancedb and the indexer, the
    # Rust runtime, the first forward); the cold start is measured separately by `cold`.
    idx0.add_folder(synth(work, "warmup16", 16, seed=args.seed + 7), batch_size=args.batch_size)
    log.info(f"torch threads {torch.get_num_threads()}, load {loadavg():.2f}")
    for r in range(args.repeats):
        before = bare_forward(emb, args.batch_size, args.bare_batches, warmup=2 if r == 0 else 1)
        log.info(f"run {r}: bare before  hf {before['hf_forward']['img_s']:.2f}  embed {before['embed']['img_s']:.2f} img/s")
        db = work / f"tp-{r}.db"
        shutil.rmtree(db, ignore_errors=True)
        idx = Index(db, embedder=emb)  # the same loaded model
        ticks: list[tuple[float, int]] = []
        done = 0

        def advance(k: int):
            nonlocal done
            done += k
            ticks.append((time.perf_counter(), done))

        t0 = time.perf_counter()
        with measure() as m:
            report = idx.add_folder(folder, batch_size=args.batch_size, on_advance=advance)
        wall, cpu, la, la_after = m.seconds, m.cpu_seconds, m.load_before, m.load_after
        # steady state: from the first batch out of the model to the last (no pipeline fill, no
        # final commit / compaction / FAISS build)
        (t_a, n_a), (t_b, n_b) = ticks[0], ticks[-1]
        steady = (n_b - n_a) / (t_b - t_a)
        after = bare_forward(emb, args.batch_size, args.bare_batches, warmup=1)
        bare = {k: (before[k]["img_s"] + after[k]["img_s"]) / 2 for k in before}
        bare_cpu = {k: (before[k]["cpu_ms_per_img"] + after[k]["cpu_ms_per_img"]) / 2 for k in before}
        run = {
            "images": report.embedded, "failed": len(report.failed), "seconds": wall,
            "e2e_img_s": report.embedded / wall, "steady_img_s": steady,
            "e2e_cpu_ms_per_img": 1000 * cpu / report.embedded,
            "embed_seconds_inside": report.embedded_seconds,
            "model_share_of_wall": report.embedded_seconds / wall,
            "tail_seconds": wall - (t_b - t0),  # last batch embedded -> add_folder returns
            "head_seconds": t_a - t0,  # add_folder called -> first batch embedded
            "load_before": la, "load_after": la_after,
            "bare_before": before, "bare_after": after, "bare_mean_img_s": bare,
            "ratio_e2e_vs_embed": report.embedded / wall / bare["embed"],
            "ratio_e2e_vs_hf": report.embedded / wall / bare["hf_forward"],
            "ratio_steady_vs_embed": steady / bare["embed"],
            "ratio_steady_vs_hf": steady / bare["hf_forward"],
            # CPU time per image (all threads of this process): robust to other jobs on the machine
            "bare_mean_cpu_ms_per_img": bare_cpu,
            "cpu_ratio_vs_hf": bare_cpu["hf_forward"] / (1000 * cpu / report.embedded),
            "cpu_ratio_vs_embed": bare_cpu["embed"] / (1000 * cpu / report.embedded),
        }
        runs.append(run)
        log.info(f"run {r}: e2e {run['e2e_img_s']:.2f} img/s (steady {steady:.2f}), bare after hf "
                 f"{after['hf_forward']['img_s']:.2f} embed {after['embed']['img_s']:.2f}; ratio e2e/embed "
                 f"{run['ratio_e2e_vs_embed']:.3f} e2e/hf {run['ratio_e2e_vs_hf']:.3f}  (load {la:.2f}->{la_after:.2f})")
        if not args.keep:
            shutil.rmtree(db, ignore_errors=True)
    best = max(runs, key=lambda r: r["ratio_e2e_vs_hf"])
    result = {
        "command": command_line(),
        "folder": f"{args.n} JPEGs, random crops of examples/images/*.jpg resized to a 400-800 px long side, "
                  f"quality 85-95, seed {args.seed} (benchmarks/synth.py)",
        "model": emb.conf.model, "image_size": args.image_size, "batch_size": args.batch_size,
        "bare_images_per_measurement": args.batch_size * args.bare_batches,
        "runs": runs,
        "median": {k: statistics.median(r[k] for r in runs) for k in
                   ("e2e_img_s", "steady_img_s", "ratio_e2e_vs_embed", "ratio_e2e_vs_hf",
                    "ratio_steady_vs_embed", "ratio_steady_vs_hf")},
        "median_bare_img_s": {k: statistics.median(r["bare_mean_img_s"][k] for r in runs) for k in ("hf_forward", "embed")},
        "best_run_ratio_e2e_vs_hf": best["ratio_e2e_vs_hf"],
        "target": 0.90,
    }
    shutil.rmtree(work / "tp-probe.db", ignore_errors=True)
    policy = os.environ.get("OMP_WAIT_POLICY")
    update_results(args, "throughput" + (f"_omp-{policy.lower()}" if policy else ""), result)
    return result


PREPROCESS = "preprocess (Embedder.preprocess: resize + torch normalise)"
ALT_PREPROCESS = "  alt: resize + numpy normalise (numpy_to_tensor, not in the library)"


def cmd_stages(args) -> dict:
    """CPU time per image of every indexing stage, run one after another in one thread (torch at
    1 thread), so other jobs on the machine barely change the numbers. If decode etc. overlap the
    model perfectly on the 2 cores, the best end-to-end / bare ratio is model / (model + the rest)."""
    import hashlib

    import pyarrow as pa
    import torch

    from simsearch import Index
    from simsearch.images import open_image, thumbnail_jpeg
    from simsearch.store import make_rows

    work = Path(args.work)
    folder = synth(work, f"real{args.n}", args.n, seed=args.seed, min_side=400, max_side=800)
    paths = sorted(folder.rglob("*.jpg"))[: args.images]
    db = work / "stages.db"
    shutil.rmtree(db, ignore_errors=True)
    idx = Index(db, model=args.model, device="cpu", image_size=args.image_size)
    emb = idx.embedder
    store = idx.ensure_table()
    size = emb.conf.image_size
    threads = torch.get_num_threads()  # restored at the end: `all` runs the next command in this process
    torch.set_num_threads(1)
    cpu: dict[str, float] = {}

    def timed(name, fn, *a):
        c = time.process_time()
        out = fn(*a)
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - c
        return out

    la = loadavg()
    pixels, thumbs = [], []
    for p in paths:
        data = timed("read file", Path(p).read_bytes)
        timed("blake2b hash", lambda d: hashlib.blake2b(d, digest_size=16).hexdigest(), data)
        loaded = timed("decode (open_image, JPEG draft)", open_image, data, size, str(p))
        pixels.append(timed(PREPROCESS, emb.preprocess, loaded.image))
        timed(ALT_PREPROCESS, numpy_to_tensor, loaded.image, size)
        thumbs.append(timed("thumbnail JPEG", thumbnail_jpeg, loaded.image))
    bs = args.batch_size
    batches = [torch.stack(pixels[i:i + bs]) for i in range(0, len(pixels) - bs + 1, bs)]
    n_model = bs * len(batches)
    emb.embed(batches[0])  # warm-up
    outs = []
    for b in batches:
        outs.append(timed("model: Embedder.embed, 1 thread", emb.embed, b))
    torch.set_num_threads(args.threads)
    emb.embed(batches[0])
    c, t = time.process_time(), time.perf_counter()
    for b in batches:
        emb.embed(b)
    model2_cpu, model2_wall = time.process_time() - c, time.perf_counter() - t
    tables = []
    for i, e in enumerate(outs):
        chunk = paths[i * bs:(i + 1) * bs]

        def build():
            return make_rows([str(p) for p in chunk], e.content, e.style, idx.encode_dense(e.dense),
                             thumbs=thumbs[i * bs:(i + 1) * bs])
        tables.append(timed("rows: Index.encode_dense + make_rows", build))
    per_commit = max(1, args.write_rows // bs)
    for i in range(0, len(tables), per_commit):
        timed(f"LanceDB ImageStore.put ({args.write_rows}-row commits, all lance threads)", store.put,
              pa.concat_tables(tables[i:i + per_commit]))
    timed("compact + FAISS build (once per run)", lambda: (store.compact(), idx.refresh_ann()))
    la_after = loadavg()
    torch.set_num_threads(threads)
    n = len(paths)
    per_img = {k: 1000 * v / (n_model if k.startswith(("model", "rows", "Lance", "compact")) else n) for k, v in cpu.items()}
    model_ms = per_img["model: Embedder.embed, 1 thread"]
    rest = {k: v for k, v in per_img.items() if not k.startswith("model") and k != ALT_PREPROCESS}
    rest_ms = sum(rest.values())
    alt_ms = rest_ms - per_img[PREPROCESS] + per_img[ALT_PREPROCESS]
    result = {
        "command": command_line(),
        "images": n, "model_images": n_model, "load_before": la, "load_after": la_after,
        "cpu_ms_per_img": per_img,
        "model_cpu_ms_per_img_1_thread": model_ms,
        "model_at_threads": {"threads": args.threads, "cpu_ms_per_img": 1000 * model2_cpu / n_model,
                             "wall_ms_per_img": 1000 * model2_wall / n_model},
        "non_model_cpu_ms_per_img": rest_ms,
        "predicted_best_ratio": model_ms / (model_ms + rest_ms),
        "predicted_best_ratio_with_numpy_normalise": model_ms / (model_ms + alt_ms),
    }
    for k, v in per_img.items():
        log.info(f"  {v:8.2f} ms CPU/img  {k}")
    log.info(f"model {model_ms:.1f} ms/img (1 thread), rest {rest_ms:.1f} -> best ratio {result['predicted_best_ratio']:.3f} "
             f"({result['predicted_best_ratio_with_numpy_normalise']:.3f} with numpy normalise); load {la:.2f}->{la_after:.2f}")
    shutil.rmtree(db, ignore_errors=True)
    update_results(args, "stages", result)
    return result


# -- 2. latency ------------------------------------------------------------------------------------
def build_base(work: Path, n_base: int, seed: int, image_size: int, model: str | None) -> Path:
    """A real index of `n_base` augmented images: the source of every synthetic row."""
    from simsearch import Index
    from simsearch.errors import ConfigMismatchError

    db = work / f"base{n_base}.db"
    try:  # kept from an earlier run when it holds this configuration
        if Index(db, model=model, image_size=image_size).count() == n_base:
            return db
    except ConfigMismatchError:
        pass
    shutil.rmtree(db, ignore_errors=True)
    folder = synth(work, f"real{n_base}", n_base, seed=seed, min_side=400, max_side=800)
    t = time.perf_counter()
    rep = Index(db, model=model, device="cpu", image_size=image_size).add_folder(folder, batch_size=16)
    log.info(f"base index: {rep.embedded} images embedded in {time.perf_counter() - t:.1f} s")
    return db


def build_synthetic_db(base_db: Path, out: Path, n: int, noise: float, seed: int, chunk: int = 256) -> Path:
    """`n` rows made from the base rows: row i copies base row i % n_base (dense tensor, thumbnail,
    width/height) with a new path/key/id, and its content/style vectors perturbed by Gaussian noise
    of std `noise` per component, then re-normalised. Written through ImageStore.put in chunks of
    `chunk` rows (the indexer's commit size), then compacted like the indexer does."""
    import numpy as np
    import pyarrow as pa

    from simsearch.store import ImageStore, make_rows

    base = ImageStore(base_db)
    meta = base.meta
    if (made := ImageStore(out)).exists() and made.count() == n and made.meta == meta:
        return out
    shutil.rmtree(out, ignore_errors=True)
    keys, content = base.vectors("content")
    src = pa.Table.from_pylist(base.rows(keys, ["style", "width", "height", "dense", "thumb"]))
    style = np.asarray(src.column("style").to_pylist(), np.float32)
    m = len(keys)
    store = ImageStore(out)
    store.create(meta, content.shape[1], style.shape[1])
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        srow = idx % m
        c = content[srow] + (rng.normal(0, noise, (len(idx), content.shape[1])) if noise else 0)
        s = style[srow] + (rng.normal(0, noise, (len(idx), style.shape[1])) if noise else 0)
        c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        s = (s / np.linalg.norm(s, axis=1, keepdims=True)).astype(np.float32)
        paths = [f"/synthetic/{i // 1000:03d}/row_{i:06d}.jpg" for i in idx]
        take = pa.array(srow)
        rows = make_rows(paths, c, s, src.column("dense").take(take).to_pylist(), sizes=[100_000] * len(idx),
                         widths=src.column("width").take(take).to_pylist(), heights=src.column("height").take(take).to_pylist(),
                         thumbs=src.column("thumb").take(take).to_pylist())
        store.put(rows)
    store.compact()
    log.info(f"synthetic db: {n} rows -> {out} ({time.perf_counter() - t:.1f} s)")
    return out


def time_calls(fn, items) -> dict:
    la = loadavg()
    times = []
    for it in items:
        t = time.perf_counter()
        fn(it)
        times.append((time.perf_counter() - t) * 1000)
    return {"n": len(times), "p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95), "mean_ms": statistics.fmean(times),
            "min_ms": min(times), "max_ms": max(times), "load_before": la, "load_after": loadavg()}


def cmd_latency(args) -> dict:
    import numpy as np

    from simsearch import Index

    work = Path(args.work)
    base = build_base(work, args.base, args.seed, args.image_size, args.model)
    qfolder = synth(work, f"queries{args.queries}", args.queries, seed=args.seed + 1000, min_side=400, max_side=800)
    queries = sorted(qfolder.rglob("*.jpg"))
    import faiss

    sizes, opened = {}, {}
    for n in args.sizes:
        db = build_synthetic_db(base, work / f"syn{n}.db", n, args.noise, args.seed)
        idx = Index(db, device="cpu")
        model = idx.conf.model
        t = time.perf_counter()
        rebuilt = idx.refresh_ann()
        ann_s = time.perf_counter() - t
        t = time.perf_counter()
        idx.search(queries[0], k=args.k)  # warm-up: model load, first forward, lance caches
        first_s = time.perf_counter() - t
        for q in queries[:3]:
            idx.search(q, k=args.k)
        vecs = {mode: [getattr(idx.embed_image(q), mode)[0] for q in queries] for mode in ("content", "style")}
        for mode in ("content", "style"):
            idx.search_vector(vecs[mode][0], args.k, mode)  # warm the style index too
        opened[n] = (idx, vecs)
        sizes[str(n)] = {"rows": idx.count(), "ann_kind": idx.vector_index("content").kind,
                         "ann_refresh_seconds": ann_s, "ann_rebuilt": rebuilt, "first_search_seconds": first_s,
                         "disk_gib": round(idx.store.disk_bytes() / 2**30, 2), "rounds": []}
    # Rounds alternate the sizes, so that a burst of other jobs on the machine does not hit only one.
    for r in range(args.rounds):
        for n in args.sizes:
            idx, vecs = opened[n]
            res = {
                "search_file_content": time_calls(lambda q: idx.search(q, k=args.k), queries),
                "search_vector_content": time_calls(lambda v: idx.search_vector(v, args.k, "content"), vecs["content"]),
                "search_vector_style": time_calls(lambda v: idx.search_vector(v, args.k, "style"), vecs["style"]),
            }
            # where search_vector's time goes: the FAISS search vs fetching path/id rows from LanceDB
            index = idx.vector_index("content")
            q = np.stack(vecs["content"])
            res["faiss_only_content"] = time_calls(lambda v: index.search(v[None], args.k), q)
            keys = [index.search(v[None], args.k)[1][0] for v in q]
            res["lance_rows_only"] = time_calls(lambda ks: idx.store.rows(ks, ["path", "id"]), keys)
            # experiment: FAISS's OpenMP (its own libgomp, beside torch's) at 1 thread
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            res["faiss_only_content_1thread"] = time_calls(lambda v: index.search(v[None], args.k), q)
            res["search_vector_content_faiss_1thread"] = time_calls(lambda v: idx.search_vector(v, args.k, "content"), q)
            faiss.omp_set_num_threads(threads)
            # and search(file)'s: decode + preprocess + forward (batch 1)
            res["embed_file_only"] = time_calls(lambda p: idx.embed_image(p), queries)
            sizes[str(n)]["rounds"].append(res)
            log.info(f"round {r} {n} rows: search(file) p50 {res['search_file_content']['p50_ms']:.1f} ms p95 "
                     f"{res['search_file_content']['p95_ms']:.1f}; search_vector p50 {res['search_vector_content']['p50_ms']:.2f} "
                     f"p95 {res['search_vector_content']['p95_ms']:.2f} ms (faiss p50 {res['faiss_only_content']['p50_ms']:.2f}, "
                     f"1 thread {res['faiss_only_content_1thread']['p50_ms']:.2f}; lance rows p50 "
                     f"{res['lance_rows_only']['p50_ms']:.2f}); load {res['search_file_content']['load_before']:.2f}")
    for n in args.sizes:
        rounds = sizes[str(n)]["rounds"]
        sizes[str(n)]["median_over_rounds"] = {
            key: {stat: statistics.median(rd[key][stat] for rd in rounds) for stat in ("p50_ms", "p95_ms")}
            for key in rounds[0]}
    del opened
    result = {
        "command": command_line(),
        "how_rows_were_made": (
            f"A real index of {args.base} augmented images (benchmarks/synth.py, seed {args.seed}) embedded by "
            f"{model} at {args.image_size} px is the source. Each synthetic table holds N rows; row i copies "
            f"source row i mod {args.base} (dense tensor, thumbnail, width, height) under a new fake path "
            f"/synthetic/.../row_i.jpg (new key and id), with its content and style vectors perturbed by "
            f"N(0, {args.noise}^2) per component and re-normalised. Rows are written with ImageStore.put in "
            f"256-row commits with the real schema and metadata, then compacted; queries go through the real Index."),
        "queries": f"{args.queries} other augmented images (seed {args.seed + 1000}), k={args.k}, mode content "
                   f"(search_vector also style); warm: model loaded, FAISS built, 4 searches done before timing",
        "k": args.k, "sizes": sizes,
    }
    update_results(args, "latency", result)
    return result


# -- cold start ------------------------------------------------------------------------------------
BREAKDOWN = r"""
import json, sys, time
T = {}
t0 = time.perf_counter()
def mark(name):
    global t0
    t = time.perf_counter(); T[name] = t - t0; t0 = t
import typer, rich; mark("import typer+rich")
import simsearch.cli; mark("import simsearch.cli")
import numpy; mark("import numpy")
import torch; mark("import torch")
import lance, pyarrow; mark("import lance+pyarrow (the store's reads)")
import faiss; mark("import faiss")
from simsearch.index import Index; mark("import simsearch.index (+PIL, rest)")
idx = Index(sys.argv[1], device="cpu"); mark("Index(db) open (schema, config check)")
n = idx.count(); mark("count rows")
idx.embedder; mark("load the query graph (backbones.compiled; the model itself if none is cached)")
e = idx.embed_image(sys.argv[2]); mark("embed query (decode + first forward, batch 1)")
e = idx.embed_image(sys.argv[2]); mark("embed query again (warm forward)")
vi = idx.vector_index("content"); mark("load FAISS index (+table version check)")
hits = idx.search_vector(e.content[0], 10, "content"); mark("search_vector (FAISS + lance rows)")
print(json.dumps({"steps": T, "loaded": sorted(m for m in ("transformers", "lancedb", "timm") if m in sys.modules)}))
"""


def run_wall(cmd: list[str], runs: int, env=None) -> dict:
    walls = []
    la = loadavg()
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        walls.append(time.perf_counter() - t)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls), "runs": walls,
            "load_before": la, "load_after": loadavg()}


def importtime_top(cmd: list[str], top: int = 12) -> dict:
    """Self/cumulative import times (ms) of the top-level packages, from python -X importtime."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *cmd], capture_output=True, text=True)
    cum: dict[str, float] = {}
    self_by_pkg: dict[str, float] = {}
    total = 0.0
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if not m:
            continue
        self_us, cum_us, indent, name = int(m.group(1)), int(m.group(2)), len(m.group(3)), m.group(4)
        pkg = ".".join(name.split(".")[:2])
        self_by_pkg[pkg] = self_by_pkg.get(pkg, 0.0) + self_us / 1000
        if indent == 1:  # a module imported at top level (not from inside another import)
            root = name.split(".")[0]
            cum[root] = cum.get(root, 0.0) + cum_us / 1000
            total += cum_us / 1000
    ranked = dict(sorted(cum.items(), key=lambda kv: -kv[1])[:top])
    top_self = dict(sorted(self_by_pkg.items(), key=lambda kv: -kv[1])[:top])
    return {"total_import_ms": round(total, 1), "top_level_cumulative_ms": {k: round(v, 1) for k, v in ranked.items()},
            "self_ms_by_subpackage": {k: round(v, 1) for k, v in top_self.items()}}


def cold_db(args, env) -> tuple[Path, Path, str]:
    """The synthetic table `latency` made, else a database of examples/images (the cold start reads a
    few rows whatever the size: the graph, FAISS file and schema dominate). -> (db, query, what)"""
    work = Path(args.work)
    db = work / f"syn{args.size}.db"
    if db.exists():
        return db, sorted((work / f"queries{args.queries}").rglob("*.jpg"))[0], f"{args.size}-row synthetic table (see latency)"
    repo = Path(__file__).resolve().parent.parent
    db = work / "examples.db"
    if not db.exists():
        exe = shutil.which("simsearch") or str(Path(sys.executable).parent / "simsearch")
        subprocess.run([exe, "index", str(repo / "examples" / "images"), "--db", str(db)], check=True, capture_output=True, env=env)
    return db, repo / "examples" / "queries" / "cat_crop.jpg", "examples/images (12 rows), indexed by `simsearch index`"


def paired_ratio(cmd_a: list[str], cmd_b: list[str], runs: int, env) -> dict:
    """Whole-process wall times of A and B run in turn, and the median of the per-pair ratios A/B
    (pairing keeps the ratio honest when the machine's speed drifts)."""
    a, b = run_wall(cmd_a, 1, env), run_wall(cmd_b, 1, env)  # warm the page cache
    walls_a, walls_b = [], []
    for _ in range(runs):
        walls_a += run_wall(cmd_a, 1, env)["runs"]
        walls_b += run_wall(cmd_b, 1, env)["runs"]
    ratios = [x / y for x, y in zip(walls_a, walls_b)]
    return {"a_median_s": statistics.median(walls_a), "b_median_s": statistics.median(walls_b),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "a_runs": walls_a, "b_runs": walls_b, "load": loadavg()}


def cmd_cold(args) -> dict:
    env = {**os.environ}
    env.pop("SIMSEARCH_DB", None)
    db, query, what = cold_db(args, env)
    exe = shutil.which("simsearch") or str(Path(sys.executable).parent / "simsearch")
    query_cmd = [exe, "query", str(query), "--db", str(db), "-k", "10"]
    subprocess.run(query_cmd, capture_output=True, env=env)  # page cache; a missing query graph is not written by queries
    result = {
        "command": command_line(),
        "note": "fresh process each run (page cache warm: files were read before); wall time of the whole subprocess",
        "db": what,
        "python_startup": run_wall([sys.executable, "-c", "pass"], args.runs, env),
        "help": run_wall([exe, "--help"], args.runs, env),
        "query": run_wall(query_cmd, args.runs, env),
        "query_vs_torch": paired_ratio(query_cmd, [sys.executable, "-c", "import torch"], args.runs, env),
        "importtime_help": importtime_top(["-c", "import sys; sys.argv=['simsearch','--help']; "
                                                "from simsearch.cli import main; main()"]),
        "importtime_query_modules": importtime_top(["-c", f"import sys; sys.argv={query_cmd!r}; "
                                                          "from simsearch.cli import main; main()"]),
    }
    steps, loaded = [], set()
    for _ in range(args.breakdown_runs):
        proc = subprocess.run([sys.executable, "-c", BREAKDOWN, str(db), str(query)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        steps.append(out["steps"])
        loaded |= set(out["loaded"])
    result["breakdown_median_s"] = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    result["breakdown_runs"] = args.breakdown_runs
    result["breakdown_loaded"] = sorted(loaded)
    log.info(json.dumps({k: result[k] for k in ("help", "query", "query_vs_torch")}, indent=1))
    for k, v in result["breakdown_median_s"].items():
        log.info(f"  {v * 1000:8.1f} ms  {k}")
    update_results(args, "cold_start", result)
    return result


# -- 3. memory -------------------------------------------------------------------------------------
WORKER = r"""
import sys, time
from simsearch import Index
folder, db, bs, model = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] or None
idx = Index(db, model=model, device="cpu")
idx.embedder
print("READY", time.perf_counter(), flush=True)
def adv(k, n=[0]):
    n[0] += k
    print("P", n[0], time.perf_counter(), flush=True)
rep = idx.add_folder(folder, batch_size=bs, on_advance=adv)
print("DONE", rep.embedded, len(rep.failed), rep.seconds, rep.embedded_seconds, flush=True)
"""


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB of a live process."""
    text = Path(f"/proc/{pid}/status").read_text()
    get = lambda key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def cmd_memory(args) -> dict:
    import numpy as np

    work = Path(args.work)
    folder = synth(work, f"small{args.n}_{args.side}", args.n, seed=args.seed, min_side=args.side,
                   max_side=args.side, square=True)
    db = work / f"mem{args.n}.db"
    shutil.rmtree(db, ignore_errors=True)
    la0 = loadavg()
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(db), str(args.batch_size), args.model or ""],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    state = {"n": 0, "phase": "load", "ready": None, "done": None}

    def reader():
        for line in proc.stdout:
            parts = line.split()
            if parts[0] == "P":
                state["n"] = int(parts[1])
                state["phase"] = "index"
            elif parts[0] == "READY":
                state["phase"] = "start"
            elif parts[0] == "DONE":
                state["done"] = parts[1:]

    threading.Thread(target=reader, daemon=True).start()
    samples = []  # (t, images done, rss MiB, hwm MiB, phase)
    t0 = time.perf_counter()
    last_print = 0.0
    while proc.poll() is None:
        try:
            rss, hwm = rss_mb(proc.pid)
        except (FileNotFoundError, ProcessLookupError, AttributeError):
            break
        t = time.perf_counter() - t0
        n = state["n"]
        phase = "tail" if (state["phase"] == "index" and n >= args.n) else state["phase"]
        samples.append((t, n, rss, hwm, phase))
        if t - last_print > 30:
            log.info(f"  t={t:6.0f}s images={n:6d} rss={rss:7.0f} MiB hwm={hwm:7.0f} MiB load={loadavg():.2f}")
            last_print = t
        if args.limit_s and t > args.limit_s:
            proc.kill()
            log.info(f"stopped after {args.limit_s} s at {n} images")
            break
        time.sleep(0.5)
    proc.wait()
    err = proc.stderr.read()
    wall = time.perf_counter() - t0
    la1 = loadavg()
    if state["done"] is None and not args.limit_s:
        raise SystemExit(f"worker failed:\n{err[-3000:]}")
    at = {}
    for mark in args.marks:
        hit = next((s for s in samples if s[1] >= mark), None)
        if hit:
            at[str(mark)] = {"t_s": round(hit[0], 1), "images": hit[1], "rss_mib": round(hit[2], 1), "hwm_mib": round(hit[3], 1)}
    idx_samples = [s for s in samples if s[4] == "index" and s[1] >= 1000]
    slope = None
    if len(idx_samples) > 10:
        n_arr = np.array([s[1] for s in idx_samples], float)
        r_arr = np.array([s[2] for s in idx_samples], float)
        slope = float(np.polyfit(n_arr / 1000, r_arr, 1)[0])
    # indexing rate per 1k-image segment: does writing into a growing table slow down?
    seg_rate = {}
    for lo in range(0, args.n, 1000):
        a = next((s for s in samples if s[1] >= lo and s[1] > 0), None)
        b = next((s for s in samples if s[1] >= lo + 1000), None)
        if a and b and b[0] > a[0]:
            seg_rate[f"{lo}-{lo + 1000}"] = round((b[1] - a[1]) / (b[0] - a[0]), 2)
    tail = [s for s in samples if s[4] == "tail"]
    result = {
        "command": command_line(),
        "folder": f"{args.n} JPEGs {args.side}x{args.side}, random crops of examples/images (seed {args.seed})",
        "images_done": samples[-1][1] if samples else 0, "wall_s": round(wall, 1),
        "worker_report": state["done"] and {"embedded": int(state["done"][0]), "failed": int(state["done"][1]),
                                             "seconds": float(state["done"][2]), "embed_seconds": float(state["done"][3])},
        "load_before": la0, "load_after": la1, "sample_interval_s": 0.5, "samples": len(samples),
        "rss_after_model_load_mib": round(next((s[2] for s in samples if s[4] != "load"), 0), 1),
        "rss_at": at,
        "rss_slope_mib_per_1k_images": None if slope is None else round(slope, 2),
        "peak_rss_while_indexing_mib": round(max((s[2] for s in samples if s[4] == "index"), default=0), 1),
        "peak_rss_tail_mib": round(max((s[2] for s in tail), default=0), 1),
        "peak_hwm_mib": round(max((s[3] for s in samples), default=0), 1),
        "tail_seconds": round(tail[-1][0] - tail[0][0], 1) if tail else None,
        "rate_img_s_per_1k_segment": seg_rate,
        "trace": [(round(s[0], 1), s[1], round(s[2], 1)) for s in samples[:: max(1, len(samples) // 400)]],
    }
    log.info(json.dumps({k: v for k, v in result.items() if k != "trace"}, indent=1))
    if not args.keep:
        shutil.rmtree(db, ignore_errors=True)
    update_results(args, "memory", result)
    return result


# -- markdown ----------------------------------------------------------------------------------
def render(R: dict) -> str:
    L = ["# simsearch speed benchmarks", "",
         f"Machine: {machine_line(R['machine'])}; {R['machine']['torch_interop_threads']} torch inter-op threads. The "
         "machine is shared with other jobs: the 1-min load average is given next to every timing (2.0 = both cores busy).",
         "",
         "Re-run: `python benchmarks/speed.py all` (or one of `throughput`, `latency`, `cold`, `memory`; `--help`).", ""]
    for section in sorted(k for k in R if k.startswith("throughput")):
        tp = R[section]
        env = ", ".join(f"{k}={v}" for k, v in tp.get("env", {}).items())
        L += [f"## Indexing throughput{' — ' + env if env else ''} ({tp['date']})", "",
              f"{tp['folder']}; model {tp['model']} at {tp['image_size']} px, batch {tp['batch_size']}, CPU. "
              f"Bare = the same loaded model on pre-made tensors in the same process, {tp['bare_images_per_measurement']} "
              "images measured right before and right after each indexing run (mean of the two): `hf` is the raw "
              "transformers Dinov2Model forward, `embed` is Embedder.embed (the blocks + pooling + dense copy, exactly "
              "what the indexer calls per batch). End-to-end = embedded images / wall time of `Index.add_folder` "
              "(listing, read, hash, decode, preprocess, thumbnail, forward, LanceDB commits, compaction, FAISS build); "
              "steady = first to last batch out of the model. CPU ms/img = process CPU time (all threads) per image, "
              "less sensitive to other jobs than wall time; its ratio is bare CPU/img over end-to-end CPU/img.", "",
              "| run | e2e img/s | steady img/s | bare hf img/s (before/after) | bare embed img/s (before/after) | "
              "e2e / bare hf | e2e / bare embed | steady / bare hf | CPU ms/img e2e / bare hf | CPU ratio | load avg |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(tp["runs"]):
            b, a = r["bare_before"], r["bare_after"]
            cpu = (f"{r['e2e_cpu_ms_per_img']:.0f} / {r['bare_mean_cpu_ms_per_img']['hf_forward']:.0f} | "
                   f"{r['cpu_ratio_vs_hf']:.3f}") if "cpu_ratio_vs_hf" in r else "– | –"
            L.append(f"| {i} | {r['e2e_img_s']:.2f} | {r['steady_img_s']:.2f} | {r['bare_mean_img_s']['hf_forward']:.2f} "
                     f"({b['hf_forward']['img_s']:.2f}/{a['hf_forward']['img_s']:.2f}) | {r['bare_mean_img_s']['embed']:.2f} "
                     f"({b['embed']['img_s']:.2f}/{a['embed']['img_s']:.2f}) | **{r['ratio_e2e_vs_hf']:.3f}** | "
                     f"{r['ratio_e2e_vs_embed']:.3f} | {r['ratio_steady_vs_hf']:.3f} | {cpu} | "
                     f"{r['load_before']:.2f}→{r['load_after']:.2f} |")
        md = tp["median"]
        L += ["", f"Median over runs: e2e {md['e2e_img_s']:.2f} img/s, bare hf {tp['median_bare_img_s']['hf_forward']:.2f}, "
                  f"ratio e2e/bare hf **{md['ratio_e2e_vs_hf']:.3f}** (e2e/bare embed {md['ratio_e2e_vs_embed']:.3f}); "
                  f"target ≥ {tp['target']:.2f}.", ""]
        if tp.get("summary"):
            L += [tp["summary"], ""]
    if st := R.get("stages"):
        L += [f"## Where an indexed image's CPU time goes ({st['date']})", "",
              f"Each stage run alone, one after another in one thread (torch at 1 thread), on {st['images']} images of "
              "the throughput folder; CPU time of the process, so other jobs on the machine barely change it. "
              f"Load {st['load_before']:.2f}→{st['load_after']:.2f}.", "",
              "| stage | CPU ms / image |", "|---|---|"]
        for k, v in st["cpu_ms_per_img"].items():
            L.append(f"| {k} | {v:.2f} |")
        m2 = st["model_at_threads"]
        L += ["", f"Everything but the model: {st['non_model_cpu_ms_per_img']:.1f} ms CPU per image against "
                  f"{st['model_cpu_ms_per_img_1_thread']:.1f} ms for the model (1 thread; at {m2['threads']} threads "
                  f"{m2['cpu_ms_per_img']:.1f} ms CPU, {m2['wall_ms_per_img']:.1f} ms wall per image). Both cores are "
                  "busy with the model, so the rest cannot hide behind it: the best reachable end-to-end / bare ratio is "
                  f"model / (model + rest) = **{st['predicted_best_ratio']:.3f}** "
                  f"({st['predicted_best_ratio_with_numpy_normalise']:.3f} with the numpy normalisation).", ""]
    if lat := R.get("latency"):
        L += [f"## Query latency, warm, in-process ({lat['date']})", "", lat["how_rows_were_made"], "",
              f"Queries: {lat['queries']}.", "",
              "| rows | FAISS | round | call | p50 ms | p95 ms | mean ms | load avg |", "|---|---|---|---|---|---|---|---|"]
        names = [("search_file_content", "Index.search(file) content"),
                 ("embed_file_only", "  of which: embed_image(file)"),
                 ("search_vector_content", "Index.search_vector content"),
                 ("search_vector_style", "Index.search_vector style"),
                 ("faiss_only_content", "  of which: FAISS search"),
                 ("lance_rows_only", "  of which: LanceDB rows(path, id)"),
                 ("faiss_only_content_1thread", "experiment: FAISS search, faiss.omp_set_num_threads(1)"),
                 ("search_vector_content_faiss_1thread", "experiment: Index.search_vector, FAISS at 1 thread")]
        for n, res in lat["sizes"].items():
            for r, rd in enumerate(res.get("rounds", [res])):
                for key, label in names:
                    if key not in rd:
                        continue
                    s = rd[key]
                    L.append(f"| {int(n):,} | {res['ann_kind']} | {r} | {label} | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} | "
                             f"{s['mean_ms']:.2f} | {s['load_before']:.2f}→{s['load_after']:.2f} |")
        L += ["", "FAISS (re)build on first open: " + ", ".join(
            f"{int(n):,} rows {res['ann_refresh_seconds']:.2f} s" for n, res in lat["sizes"].items()) +
            "; table on disk: " + ", ".join(f"{int(n):,} rows {res['disk_gib']} GiB" for n, res in lat["sizes"].items()), ""]
    if cs := R.get("cold_start"):
        L += [f"## CLI cold start ({cs['date']})", "", f"{cs['note']}; db: {cs['db']}.", "",
              "| command | median s | min s | max s | load avg |", "|---|---|---|---|---|"]
        for key, label in (("python_startup", "`python -c pass`"), ("help", "`simsearch --help`"),
                           ("query", "`simsearch query IMAGE --db DB -k 10`")):
            s = cs[key]
            L.append(f"| {label} | {s['median_s']:.2f} | {s['min_s']:.2f} | {s['max_s']:.2f} | "
                     f"{s['load_before']:.2f}→{s['load_after']:.2f} |")
        if r := cs.get("query_vs_torch"):
            L += ["", f"Query vs `python -c 'import torch'`, run in turn ({len(r['a_runs'])} pairs): query {r['a_median_s']:.2f} s, "
                  f"torch {r['b_median_s']:.2f} s, ratio **{r['ratio_median']:.2f}x** (min {r['ratio_min']:.2f}, max "
                  f"{r['ratio_max']:.2f}; target <= 1.7x); load {r['load']:.2f}."]
        L += ["", f"Breakdown of a query's cold start (steps timed in a fresh process, median of {cs['breakdown_runs']}):", "",
              "| step | ms |", "|---|---|"]
        for k, v in cs["breakdown_median_s"].items():
            L.append(f"| {k} | {v * 1000:.0f} |")
        if "breakdown_loaded" in cs:
            L += ["", "Of transformers, lancedb and timm, the query process loaded: " + (", ".join(cs["breakdown_loaded"]) or "none") + "."]
        it = cs["importtime_help"]
        L += ["", f"`python -X importtime` of `simsearch --help`: {it['total_import_ms']:.0f} ms of imports; top level: " +
              ", ".join(f"{k} {v:.0f}" for k, v in it["top_level_cumulative_ms"].items()) + " (ms, cumulative).", ""]
        it = cs["importtime_query_modules"]
        L += [f"`python -X importtime` of the query itself: "
              f"{it['total_import_ms']:.0f} ms; " +
              ", ".join(f"{k} {v:.0f}" for k, v in it["top_level_cumulative_ms"].items()) + " (ms, cumulative)."]
        if "self_ms_by_subpackage" in it:
            L += ["Largest by self time (ms, summed per sub-package): " +
                  ", ".join(f"{k} {v:.0f}" for k, v in it["self_ms_by_subpackage"].items()) + "."]
        L += [""]
        if cs.get("summary"):
            L += [cs["summary"], ""]
    if mem := R.get("memory"):
        L += [f"## Memory while indexing ({mem['date']})", "",
              f"{mem['folder']}; real indexer (`Index.add_folder`, batch 16) in a subprocess, RSS sampled from "
              f"/proc every {mem['sample_interval_s']} s. Wall {mem['wall_s']} s, load {mem['load_before']:.2f}→{mem['load_after']:.2f}.", "",
              "| images done | RSS MiB | t s |", "|---|---|---|",
              f"| 0 (model loaded) | {mem['rss_after_model_load_mib']} | |"]
        for mark, s in mem["rss_at"].items():
            L.append(f"| {int(mark):,} | {s['rss_mib']} | {s['t_s']} |")
        L += ["", f"Slope of RSS vs images (≥1k): {mem['rss_slope_mib_per_1k_images']} MiB per 1k images. "
                  f"Peak RSS while indexing {mem['peak_rss_while_indexing_mib']} MiB; during the final compaction + "
                  f"FAISS build {mem['peak_rss_tail_mib']} MiB ({mem['tail_seconds']} s); VmHWM {mem['peak_hwm_mib']} MiB.", "",
              "Indexing rate per 1k-image segment (img/s): " +
              ", ".join(f"{k}: {v}" for k, v in mem["rate_img_s_per_1k_segment"].items()), ""]
        if mem.get("summary"):
            L += [mem["summary"], ""]
    return "\n".join(L)


# -- main --------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(DEFAULT_WORK), help="where images and databases go (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where speed.json and speed.md go (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="every command on a handful of images, in seconds")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("throughput", help="indexing img/s vs bare forward img/s, same process")
    p.add_argument("-n", type=int, default=512, help="images in the folder (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--bare-batches", type=int, default=8, help="batches per bare measurement (default %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="bare/index/bare cycles (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the databases")

    p = sub.add_parser("stages", help="CPU ms per image of each indexing stage, one thread (load-robust)")
    p.add_argument("-n", type=int, default=512, help="folder to take images from (default real512)")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the second model measurement")
    p.add_argument("--write-rows", type=int, default=256)

    p = sub.add_parser("latency", help="warm in-process query latency on synthetic 1k / 10k tables")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--base", type=int, default=512, help="really embedded source images (default %(default)s)")
    p.add_argument("--noise", type=float, default=0.02, help="per-component std added to copied vectors")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3, help="measurement rounds, sizes alternating (default %(default)s)")

    p = sub.add_parser("cold", help="CLI cold start: --help and query as subprocesses, with a breakdown")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--breakdown-runs", type=int, default=3)
    p.add_argument("--size", type=int, default=1000, help="which synthetic db to query (default %(default)s)")
    p.add_argument("--queries", type=int, default=50)

    p = sub.add_parser("memory", help="RSS while indexing many small images in a subprocess")
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("--side", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--marks", type=int, nargs="+", default=[1000, 2000, 3000, 5000, 10000])
    p.add_argument("--limit-s", type=float, default=0, help="kill the indexer after this many seconds (0: never)")
    p.add_argument("--keep", action="store_true")

    sub.add_parser("all", help="throughput, stages, latency, cold, memory with defaults")
    sub.add_parser("render", help="rewrite speed.md from speed.json")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.quick and args.cmd in QUICK:  # the command's quick defaults; options given explicitly still win
        sub.choices[args.cmd].set_defaults(**QUICK[args.cmd])
        args = ap.parse_args(argv)
    setup_logging()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    log.info("load average %.2f (%d CPUs)", loadavg(), os.cpu_count())
    if args.cmd == "render":
        results = json.loads((args.out_dir / "speed.json").read_text())
        (args.out_dir / "speed.md").write_text(render(results))
    elif args.cmd == "all":
        for name in COMMANDS:
            main([*argv[:argv.index("all")], name])
    else:
        {"throughput": cmd_throughput, "stages": cmd_stages, "latency": cmd_latency, "cold": cmd_cold,
         "memory": cmd_memory}[args.cmd](args)


if __name__ == "__main__":
    main()
