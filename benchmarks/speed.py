"""Speed benchmarks for simsearch: indexing throughput vs bare forward, query latency, CLI cold
start, and memory while indexing. Results go to benchmarks/results/speed.json (each command
updates its own section) and speed.md (rendered from the whole JSON).

    python benchmarks/speed.py throughput [-n 512] [--batch-size 16] [--repeats 2]
    python benchmarks/speed.py stages     [--images 128]    # CPU ms per image of each stage
    python benchmarks/speed.py latency    [--sizes 1000 10000] [--queries 50]
    python benchmarks/speed.py cold       [--runs 5]        # needs the 1k db made by `latency`
    python benchmarks/speed.py memory     [-n 10000] [--side 160]
    python benchmarks/speed.py all                          # the four above, in this order
    python benchmarks/speed.py render                       # speed.md from speed.json only

Generated images and databases live under --work (default /tmp/simsearch-speed); image folders
are deterministic (benchmarks/synth.py) and reused between runs. Every timing records the 1-min
load average before and after it, because the machine may be shared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
DEFAULT_WORK = Path(os.environ.get("SIMSEARCH_SPEED_WORK", "/tmp/simsearch-speed"))


# -- helpers ---------------------------------------------------------------------------------------
def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def pct(values, q: float) -> float:
    """Percentile with linear interpolation (numpy's default), values in any order."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def machine_info() -> dict:
    import torch

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return {
        "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu,
        "mem_gib": round(mem_kb / 2**20, 1), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
    }


def update_results(section: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "speed.json"
    allres = json.loads(path.read_text()) if path.exists() else {}
    data = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "niceness": os.nice(0),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ},
            **data}
    allres[section] = data
    allres["machine"] = machine_info()
    path.write_text(json.dumps(allres, indent=2) + "\n")
    render()
    print(f"[{section}] written to {path} and speed.md", flush=True)


def synth(work: Path, name: str, n: int, **kw) -> Path:
    from synth import make_folder

    folder = work / name
    t = time.perf_counter()
    make_folder(folder, n, **kw)
    print(f"images: {n} under {folder} ({time.perf_counter() - t:.1f} s)", flush=True)
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
            la = loadavg()
            c, t = time.process_time(), time.perf_counter()
            for _ in range(batches):
                fn()
            sec, cpu = time.perf_counter() - t, time.process_time() - c
        out[name] = {"img_s": batch_size * batches / sec, "seconds": sec, "images": batch_size * batches,
                     "cpu_ms_per_img": 1000 * cpu / (batch_size * batches),
                     "load_before": la, "load_after": loadavg()}
    return out


def numpy_to_tensor(img, size: int):
    """The proposed images.to_tensor: the same normalisation done in numpy, so the reader threads
    run no torch ops (each torch op there forks an OpenMP team that competes with the model's)."""
    import numpy as np
    import torch
    from PIL import Image

    from simsearch.images import IMAGENET_MEAN, IMAGENET_STD

    mean255 = np.asarray(IMAGENET_MEAN, np.float32) * 255
    inv = 1 / (np.asarray(IMAGENET_STD, np.float32) * 255)
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) - mean255) * inv
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


VARIANTS = {"none": "the library as it is",
            "numpy-normalize": "EXPERIMENT: simsearch.embedder.to_tensor replaced by numpy_to_tensor (proposed fix)"}


def cmd_throughput(args) -> dict:
    import torch

    from simsearch import Index

    if args.variant == "numpy-normalize":
        import simsearch.embedder

        simsearch.embedder.to_tensor = numpy_to_tensor

    work = Path(args.work)
    folder = synth(work, f"real{args.n}", args.n, seed=args.seed, min_side=400, max_side=800)
    runs = []
    shutil.rmtree(work / "tp-probe.db", ignore_errors=True)
    idx0 = Index(work / "tp-probe.db", device="cpu", image_size=args.image_size)
    emb = idx0.embedder  # loaded once, shared by the bare measurements and every indexing run
    # Warm-up: a 16-image run pays the one-time costs (lazy imports of lancedb and the indexer, the
    # Rust runtime, the first forward); the cold start is measured separately by `cold`.
    idx0._embedder = emb
    idx0.add_folder(synth(work, "warmup16", 16, seed=args.seed + 7), batch_size=args.batch_size)
    print(f"torch threads {torch.get_num_threads()}, load {loadavg():.2f}", flush=True)
    for r in range(args.repeats):
        before = bare_forward(emb, args.batch_size, args.bare_batches, warmup=2 if r == 0 else 1)
        print(f"run {r}: bare before  hf {before['hf_forward']['img_s']:.2f}  embed {before['embed']['img_s']:.2f} img/s",
              flush=True)
        db = work / f"tp-{r}.db"
        shutil.rmtree(db, ignore_errors=True)
        idx = Index(db, device="cpu", image_size=args.image_size)
        idx._embedder = emb  # same weights, same process; a fresh db has nothing to check against
        ticks: list[tuple[float, int]] = []
        done = 0

        def advance(k: int):
            nonlocal done
            done += k
            ticks.append((time.perf_counter(), done))

        la = loadavg()
        c0, t0 = time.process_time(), time.perf_counter()
        report = idx.add_folder(folder, batch_size=args.batch_size, on_advance=advance)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        la_after = loadavg()
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
        print(f"run {r}: e2e {run['e2e_img_s']:.2f} img/s (steady {steady:.2f}), bare after hf "
              f"{after['hf_forward']['img_s']:.2f} embed {after['embed']['img_s']:.2f}; ratio e2e/embed "
              f"{run['ratio_e2e_vs_embed']:.3f} e2e/hf {run['ratio_e2e_vs_hf']:.3f}  (load {la:.2f}->{la_after:.2f})",
              flush=True)
        if not args.keep:
            shutil.rmtree(db, ignore_errors=True)
    best = max(runs, key=lambda r: r["ratio_e2e_vs_hf"])
    result = {
        "command": " ".join(["python benchmarks/speed.py", *sys.argv[1:]]),
        "folder": f"{args.n} JPEGs, random crops of examples/images/*.jpg resized to a 400-800 px long side, "
                  f"quality 85-95, seed {args.seed} (benchmarks/synth.py)",
        "variant": args.variant, "variant_description": VARIANTS[args.variant],
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
    section = "throughput" + ("" if args.variant == "none" else f"_{args.variant}")
    if policy := os.environ.get("OMP_WAIT_POLICY"):
        section += f"_omp-{policy.lower()}"
    update_results(section, result)
    return result


def cmd_stages(args) -> dict:
    """CPU time per image of every indexing stage, run one after another in one thread (torch at
    1 thread), so other jobs on the machine barely change the numbers. If decode etc. overlap the
    model perfectly on the 2 cores, the best end-to-end / bare ratio is model / (model + the rest)."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import torch

    from simsearch import Index
    from simsearch.descriptors.codec import encode_dense
    from simsearch.images import open_image, thumbnail_jpeg, to_tensor
    from simsearch.store import path_key

    work = Path(args.work)
    folder = synth(work, f"real{args.n}", args.n, seed=args.seed, min_side=400, max_side=800)
    paths = sorted(folder.rglob("*.jpg"))[: args.images]
    db = work / "stages.db"
    shutil.rmtree(db, ignore_errors=True)
    idx = Index(db, device="cpu", image_size=args.image_size)
    emb = idx.embedder
    store = idx.ensure_table()
    size = emb.conf.image_size
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
        pixels.append(timed("preprocess (to_tensor: resize + torch normalise)", to_tensor, loaded.image, size))
        timed("  alt: resize + numpy normalise (proposed)", numpy_to_tensor, loaded.image, size)
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
            return pa.table({
                "key": pa.array([path_key(str(p)) for p in chunk], pa.int64()), "id": ["0" * 32] * len(chunk),
                "path": [str(p) for p in chunk], "size": pa.array([1] * len(chunk), pa.int64()),
                "mtime_ns": pa.array([1] * len(chunk), pa.int64()), "width": pa.array([1] * len(chunk), pa.int32()),
                "height": pa.array([1] * len(chunk), pa.int32()),
                "content": pa.FixedSizeListArray.from_arrays(pa.array(e.content.reshape(-1)), e.content.shape[1]),
                "style": pa.FixedSizeListArray.from_arrays(pa.array(e.style.reshape(-1)), e.style.shape[1]),
                "dense": pa.array([encode_dense(d, emb.conf.dense_dtype) for d in e.dense], pa.binary()),
                "thumb": pa.array(thumbs[i * bs:(i + 1) * bs], pa.binary()),
            }, schema=store.table.schema)
        tables.append(timed("rows: encode_dense fp16 + Arrow table", build))
    per_commit = max(1, args.write_rows // bs)
    for i in range(0, len(tables), per_commit):
        timed("LanceDB merge_insert (256-row commits, all lance threads)", store.upsert, pa.concat_tables(tables[i:i + per_commit]))
    timed("compact + FAISS build (once per run)", lambda: (store.compact(), idx.refresh_ann()))
    la_after = loadavg()
    n = len(paths)
    per_img = {k: 1000 * v / (n_model if k.startswith("model") or k.startswith("rows") or k.startswith("Lance")
                              or k.startswith("compact") else n) for k, v in cpu.items()}
    model_ms = per_img["model: Embedder.embed, 1 thread"]
    rest = {k: v for k, v in per_img.items() if not k.startswith("model") and not k.startswith("  alt")}
    rest_ms = sum(rest.values())
    alt_ms = rest_ms - per_img["preprocess (to_tensor: resize + torch normalise)"] + per_img["  alt: resize + numpy normalise (proposed)"]
    result = {
        "command": " ".join(["python benchmarks/speed.py", *sys.argv[1:]]),
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
        print(f"  {v:8.2f} ms CPU/img  {k}")
    print(f"model {model_ms:.1f} ms/img (1 thread), rest {rest_ms:.1f} -> best ratio {result['predicted_best_ratio']:.3f} "
          f"({result['predicted_best_ratio_with_numpy_normalise']:.3f} with numpy normalise); load {la:.2f}->{la_after:.2f}")
    shutil.rmtree(db, ignore_errors=True)
    update_results("stages", result)
    return result


# -- 2. latency ------------------------------------------------------------------------------------
def build_base(work: Path, n_base: int, seed: int, image_size: int) -> Path:
    """A real index of `n_base` augmented images: the source of every synthetic row."""
    from simsearch import Index

    db = work / f"base{n_base}.db"
    if db.exists() and Index(db).count() == n_base:
        return db
    shutil.rmtree(db, ignore_errors=True)
    folder = synth(work, f"real{n_base}", n_base, seed=seed, min_side=400, max_side=800)
    t = time.perf_counter()
    rep = Index(db, device="cpu", image_size=image_size).add_folder(folder, batch_size=16)
    print(f"base index: {rep.embedded} images embedded in {time.perf_counter() - t:.1f} s", flush=True)
    return db


def build_synthetic_db(base_db: Path, out: Path, n: int, noise: float, seed: int, chunk: int = 256) -> Path:
    """`n` rows made from the base rows: row i copies base row i % n_base (dense tensor, thumbnail,
    width/height) with a new path/key/id, and its content/style vectors perturbed by Gaussian noise
    of std `noise` per component, then re-normalised. Written through ImageStore.upsert in chunks of
    `chunk` rows (the indexer's commit size), then compacted like the indexer does."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    from simsearch.store import ImageStore, path_key

    if out.exists():
        s = ImageStore(out)
        if s.exists() and s.count() == n:
            return out
        shutil.rmtree(out)
    base = ImageStore(base_db)
    meta = base.meta
    cols = ["width", "height", "content", "style", "dense", "thumb"]
    src = base._select(cols)
    m = src.num_rows
    content = src.column("content").combine_chunks().values.to_numpy().reshape(m, -1)
    style = src.column("style").combine_chunks().values.to_numpy().reshape(m, -1)
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
        rows = pa.table({
            "key": pa.array([path_key(p) for p in paths], pa.int64()),
            "id": [hashlib.blake2b(p.encode(), digest_size=16).hexdigest() for p in paths],
            "path": paths,
            "size": pa.array([100_000] * len(idx), pa.int64()),
            "mtime_ns": pa.array([0] * len(idx), pa.int64()),
            "width": src.column("width").take(take).combine_chunks(),
            "height": src.column("height").take(take).combine_chunks(),
            "content": pa.FixedSizeListArray.from_arrays(pa.array(c.reshape(-1)), c.shape[1]),
            "style": pa.FixedSizeListArray.from_arrays(pa.array(s.reshape(-1)), s.shape[1]),
            "dense": src.column("dense").take(take).combine_chunks(),
            "thumb": src.column("thumb").take(take).combine_chunks(),
        }, schema=store.table.schema)
        store.upsert(rows)
    store.compact()
    print(f"synthetic db: {n} rows -> {out} ({time.perf_counter() - t:.1f} s)", flush=True)
    return out


def time_calls(fn, items) -> dict:
    la = loadavg()
    times = []
    for it in items:
        t = time.perf_counter()
        fn(it)
        times.append((time.perf_counter() - t) * 1000)
    return {"n": len(times), "p50_ms": pct(times, 50), "p95_ms": pct(times, 95), "mean_ms": statistics.fmean(times),
            "min_ms": min(times), "max_ms": max(times), "load_before": la, "load_after": loadavg()}


def cmd_latency(args) -> dict:
    import numpy as np

    from simsearch import Index

    work = Path(args.work)
    base = build_base(work, args.base, args.seed, args.image_size)
    qfolder = synth(work, f"queries{args.queries}", args.queries, seed=args.seed + 1000, min_side=400, max_side=800)
    queries = sorted(qfolder.rglob("*.jpg"))
    import faiss

    sizes, opened = {}, {}
    for n in args.sizes:
        db = build_synthetic_db(base, work / f"syn{n}.db", n, args.noise, args.seed)
        idx = Index(db, device="cpu")
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
        sizes[str(n)] = {"rows": idx.count(), "ann_kind": idx._index_for("content").kind,
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
            index = idx._index_for("content")
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
            print(f"round {r} {n} rows: search(file) p50 {res['search_file_content']['p50_ms']:.1f} ms p95 "
                  f"{res['search_file_content']['p95_ms']:.1f}; search_vector p50 {res['search_vector_content']['p50_ms']:.2f} "
                  f"p95 {res['search_vector_content']['p95_ms']:.2f} ms (faiss p50 {res['faiss_only_content']['p50_ms']:.2f}, "
                  f"1 thread {res['faiss_only_content_1thread']['p50_ms']:.2f}; lance rows p50 "
                  f"{res['lance_rows_only']['p50_ms']:.2f}); load {res['search_file_content']['load_before']:.2f}", flush=True)
    for n in args.sizes:
        rounds = sizes[str(n)]["rounds"]
        sizes[str(n)]["median_over_rounds"] = {
            key: {stat: statistics.median(rd[key][stat] for rd in rounds) for stat in ("p50_ms", "p95_ms")}
            for key in rounds[0]}
    del opened
    result = {
        "command": " ".join(["python benchmarks/speed.py", *sys.argv[1:]]),
        "how_rows_were_made": (
            f"A real index of {args.base} augmented images (benchmarks/synth.py, seed {args.seed}) embedded by the "
            f"embedded model at {args.image_size} px is the source. Each synthetic table holds N rows; row i copies "
            f"source row i mod {args.base} (dense tensor, thumbnail, width, height) under a new fake path "
            f"/synthetic/.../row_i.jpg (new key and id), with its content and style vectors perturbed by "
            f"N(0, {args.noise}^2) per component and re-normalised. Rows are written with ImageStore.upsert in "
            f"256-row commits with the real schema and metadata, then compacted; queries go through the real Index."),
        "queries": f"{args.queries} other augmented images (seed {args.seed + 1000}), k={args.k}, mode content "
                   f"(search_vector also style); warm: model loaded, FAISS built, 4 searches done before timing",
        "k": args.k, "sizes": sizes,
    }
    update_results("latency", result)
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
import transformers; mark("import transformers")
import lancedb, pyarrow; mark("import lancedb+pyarrow")
import faiss; mark("import faiss")
from simsearch.index import Index; mark("import simsearch.index (+PIL, rest)")
simsearch.cli._quiet_libraries(); mark("_quiet_libraries")
idx = Index(sys.argv[1], device="cpu"); mark("Index(db) open (lance connect, schema, config check)")
n = idx.count(); mark("count rows")
from simsearch.backbones import resolve, fingerprint
from simsearch.backbones.vit import ViTBackbone
source, family = resolve(idx.conf.model); mark("resolve embedded weights (ensure_converted)")
cls = getattr(transformers, family.model_class); mark("import transformers' Dinov2Model module (lazy import)")
net = cls.from_pretrained(source); mark("Dinov2Model.from_pretrained (read safetensors, build, load)")
fp = fingerprint(net); mark("weights fingerprint")
bb = ViTBackbone(net, family); bb.fingerprint = fp
from simsearch.embedder import Embedder
emb = Embedder.__new__(Embedder)
emb.conf = idx.conf; emb.backbone = bb
h, w = bb.grid_size(idx.conf.image_size, idx.conf.image_size)
emb.dense_shape = (1 + h * w, bb.dim); emb.dims = {"content": bb.dim, "style": 2 * bb.dim}
idx._embedder = emb; mark("(wrap)")
e = idx.embed_image(sys.argv[2]); mark("embed query (decode + first forward, batch 1)")
e = idx.embed_image(sys.argv[2]); mark("embed query again (warm forward)")
vi = idx._index_for("content"); mark("load FAISS index (+table version check)")
hits = idx.search_vector(e.content[0], 10, "content"); mark("search_vector (FAISS + lance rows)")
print(json.dumps(T))
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


def cmd_cold(args) -> dict:
    work = Path(args.work)
    db = work / f"syn{args.size}.db"
    if not db.exists():
        raise SystemExit(f"{db} missing: run `python benchmarks/speed.py latency` first")
    qfolder = work / f"queries{args.queries}"
    query = sorted(qfolder.rglob("*.jpg"))[0]
    exe = shutil.which("simsearch") or str(Path(sys.executable).parent / "simsearch")
    env = {**os.environ, "SIMSEARCH_DB": ""}
    env.pop("SIMSEARCH_DB")
    subprocess.run([exe, "query", str(query), "--db", str(db), "-k", "10"], capture_output=True, env=env)  # page cache
    result = {
        "command": " ".join(["python benchmarks/speed.py", *sys.argv[1:]]),
        "note": "fresh process each run (page cache warm: files were read before); wall time of the whole subprocess",
        "db": f"{args.size}-row synthetic table (see latency)",
        "python_startup": run_wall([sys.executable, "-c", "pass"], args.runs, env),
        "help": run_wall([exe, "--help"], args.runs, env),
        "query": run_wall([exe, "query", str(query), "--db", str(db), "-k", "10"], args.runs, env),
        "importtime_help": importtime_top(["-c", "import sys; sys.argv=['simsearch','--help']; "
                                                "from simsearch.cli import main; main()"]),
    }
    # importtime of the heavy modules a query needs, in the order the query path pulls them
    result["importtime_query_modules"] = importtime_top(["-c", "import simsearch.cli, simsearch.index, torch, "
                                                               "transformers, lancedb, faiss; "
                                                               "transformers.Dinov2Model"])
    steps = []
    for _ in range(args.breakdown_runs):
        proc = subprocess.run([sys.executable, "-c", BREAKDOWN, str(db), str(query)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        steps.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result["breakdown_median_s"] = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    result["breakdown_runs"] = args.breakdown_runs
    print(json.dumps({k: result[k] for k in ("help", "query")}, indent=1))
    for k, v in result["breakdown_median_s"].items():
        print(f"  {v * 1000:8.1f} ms  {k}")
    update_results("cold_start", result)
    return result


# -- 3. memory -------------------------------------------------------------------------------------
WORKER = r"""
import sys, time
from simsearch import Index
folder, db, bs = sys.argv[1], sys.argv[2], int(sys.argv[3])
idx = Index(db, device="cpu")
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
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(db), str(args.batch_size)],
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
            print(f"  t={t:6.0f}s images={n:6d} rss={rss:7.0f} MiB hwm={hwm:7.0f} MiB load={loadavg():.2f}", flush=True)
            last_print = t
        if args.limit_s and t > args.limit_s:
            proc.kill()
            print(f"stopped after {args.limit_s} s at {n} images", flush=True)
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
        "command": " ".join(["python benchmarks/speed.py", *sys.argv[1:]]),
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
    print(json.dumps({k: v for k, v in result.items() if k != "trace"}, indent=1))
    if not args.keep:
        shutil.rmtree(db, ignore_errors=True)
    update_results("memory", result)
    return result


# -- markdown ----------------------------------------------------------------------------------
def render() -> None:
    path = RESULTS / "speed.json"
    if not path.exists():
        return
    R = json.loads(path.read_text())
    m = R.get("machine", {})
    L = ["# simsearch speed benchmarks", "",
         f"Machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('mem_gib')} GiB RAM, no GPU; torch "
         f"{m.get('torch')} with {m.get('torch_threads')} intra-op / {m.get('torch_interop_threads')} inter-op threads; "
         f"Python {m.get('python')}. The machine is shared with other jobs: the 1-min load average is given next to "
         "every timing (2.0 = both cores busy).", "",
         "Re-run: `python benchmarks/speed.py all` (or one of `throughput`, `latency`, `cold`, `memory`; `--help`).", ""]
    for section in sorted(k for k in R if k.startswith("throughput")):
        tp = R[section]
        env = ", ".join(f"{k}={v}" for k, v in tp.get("env", {}).items())
        L += [f"## Indexing throughput{'' if tp.get('variant', 'none') == 'none' else ' — ' + tp['variant_description']}"
              f"{' — ' + env if env else ''} ({tp['date']})", "",
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
        L += ["", f"Breakdown of a query's cold start (steps timed in a fresh process, median of {cs['breakdown_runs']}):", "",
              "| step | ms |", "|---|---|"]
        for k, v in cs["breakdown_median_s"].items():
            L.append(f"| {k} | {v * 1000:.0f} |")
        it = cs["importtime_help"]
        L += ["", f"`python -X importtime` of `simsearch --help`: {it['total_import_ms']:.0f} ms of imports; top level: " +
              ", ".join(f"{k} {v:.0f}" for k, v in it["top_level_cumulative_ms"].items()) + " (ms, cumulative).", ""]
        it = cs["importtime_query_modules"]
        L += [f"Imports a query needs (simsearch.cli, simsearch.index, torch, transformers + Dinov2Model, lancedb, faiss): "
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
    (RESULTS / "speed.md").write_text("\n".join(L))


# -- main --------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(DEFAULT_WORK), help="where images and databases go (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("throughput", help="indexing img/s vs bare forward img/s, same process")
    p.add_argument("-n", type=int, default=512, help="images in the folder (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--bare-batches", type=int, default=8, help="batches per bare measurement (default %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="bare/index/bare cycles (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the databases")
    p.add_argument("--variant", choices=list(VARIANTS), default="none",
                   help="none (default), or numpy-normalize: monkeypatch the proposed to_tensor (experiment)")

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
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    print(f"load average {loadavg():.2f} ({os.cpu_count()} CPUs)", flush=True)
    if args.cmd == "render":
        render()
    elif args.cmd == "all":
        for name in ("throughput", "stages", "latency", "cold", "memory"):
            main([f"--work={args.work}", f"--seed={args.seed}", name])
    else:
        {"throughput": cmd_throughput, "stages": cmd_stages, "latency": cmd_latency, "cold": cmd_cold, "memory": cmd_memory}[args.cmd](args)


if __name__ == "__main__":
    main()
