"""`simsearch dedup` measured: pair precision and recall on the copy-detection proxy (thresholds fitted
on its tuning split, reported on the held-out one), and time and peak memory as the table grows.

    python benchmarks/dedup.py proxy [--data DIR] [--work DIR]     # DIR: copydetect_data.py's DATA_VERSION folder
    python benchmarks/dedup.py scale [--sizes 10000 1000000]       # synthetic rows, each size in a fresh process
    python benchmarks/dedup.py render
    python benchmarks/dedup.py --quick --model M                    # the smoke test: both, tiny

proxy: the proxy's dedup pool (originals, distractors and their mild copies: crop to half, mirror plus
colour, rotation plus JPEG, small greyscale, text) indexed with the library's indexer (or the proxy's
own cached database, copied), then `simsearch.dedup` with every candidate (content neighbours above the
lowest floor, style neighbours) verified once (the pair cache); thresholds swept on the stored scores. A pair is true when both images
derive from one original. Two readings: the verified pairs themselves, and the pairs a group implies
(every two members of a group: what a user acting on the groups acts on). Splits: images of tuning
(or held-out) originals plus every distractor. The baseline in the same run: the same candidate pairs
thresholded by content cosine alone (imagededup's CNN mode), and grouped by single linkage. A diagnostic
row counts as copies the pairs that a blind audit of the labels (AUDIT) judged to be one picture.

scale: a database of n synthetic rows (scale.py's Synth: real content vectors plus noise of norm
NOISE_NORM, so that rows are as unrelated as distinct photos; the sources are the proxy pool's vectors
when scale_data.py's cache is absent), in which one row in PLANT_EVERY is half of a planted pair: the real content vectors and dense tensors of an original and one of its mild copies.
`find_duplicates` on the whole table runs in a fresh process that reports its wall time and peak
RSS; the FAISS index is built (`refresh_ann`, the table's own maintenance) and the model loaded before. Baseline in the
same process at the smallest size: the N x N cosine matrix imagededup builds.

Writes benchmarks/results/dedup.{json,md} (--out-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common
from common import command_line, data_root, loadavg, machine_info, machine_line, now
from copydetect_data import DATA_VERSION

PLANT_EVERY = 1000  # one planted copy pair per this many rows
BASELINE_ROWS = 100_000  # the N x N baseline is computed up to this size (1M rows: 3.6 TiB)
NOISE_NORM = 2.5  # norm of the noise added to a unit source vector for a synthetic row
# the tiny model's 32-d vectors meet by chance far more often than 384-d ones: a higher floor there
QUICK = dict(sizes=[300, 3000], work=Path("/tmp/simsearch-dedup-quick"), scale_min_cosine=0.95)
DEFAULT_WORK = Path(os.environ.get("SIMSEARCH_DEDUP_WORK", "/tmp/simsearch-dedup"))
THRESHOLDS = np.round(np.arange(0.10, 0.41, 0.02), 3)  # verified score (AGREEMENT_FROM and up)
AGREEMENTS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # the thumbnails' agreement (rerank.photometric); 0: not used
FLOORS = (0.8, 0.85, 0.9)  # this model's content cosines: nearly every 10-NN pair of the proxy is above 0.8
TARGET_PRECISION, TARGET_RECALL = 0.99, 0.90
AUDIT = Path(__file__).with_name("dedup_audit.json")  # a blind audit of the proxy's own labels: see audited_copies


# -- proxy -----------------------------------------------------------------------------------------------
def proxy_index(data: Path, work: Path, model: str | None):
    """The dedup pool's database: the proxy benchmark's cached one copied (it is the same indexer), or
    indexed here."""
    from simsearch import Index

    db = work / f"proxy-dedup-{data.name}.db"  # one per data version
    if not (db / "images.lance").exists():
        cached = sorted((data / "db").glob("*/dedup.db"))
        if cached and model is None:
            shutil.copytree(cached[0], db)
        report = Index(db, model=model).add_folder(data / "dedup")
        common.log.info("dedup pool: %s", report)
    return Index(db)


def audited_copies(idx, data: Path) -> tuple[set[tuple[int, int]], dict | None]:
    """(low key, high key) of the pool's pairs that the blind audit (AUDIT) judged to be one picture though
    the proxy's labels call them unrelated: the distractor pool holds copies of its own (a tutorial's source
    photo and its resized or annotated result, a stereo pair's two views); and how the audit was made.
    Empty, None without the file or for another data version than the audited one."""
    audit = json.loads(AUDIT.read_text()) if AUDIT.exists() else {"how": {}}
    if audit["how"].get("data") != data.name:
        return set(), None
    keys = {os.path.relpath(os.path.realpath(p), os.path.realpath(data)): k
            for batch in idx.store.scan(["key", "path"]) for k, p in zip(batch.column("key").to_pylist(), batch.column("path").to_pylist())}
    same = [(keys.get(x["a"]), keys.get(x["b"])) for x in audit["pairs"] if x["label"] == "same"]
    return {(min(a, b), max(a, b)) for a, b in same if a is not None and b is not None}, audit["how"]


def truth(idx, data: Path, manifest: dict) -> dict[int, tuple[str | None, str | None, str, str | None]]:
    """key -> (original, split, edit or role, kind) of every indexed image (paths reach the files through the
    pool's symlinked folders)."""
    files = {f["file"]: f for f in manifest["files"]}
    out = {}
    for batch in idx.store.scan(["key", "path"]):
        for key, path in zip(batch.column("key").to_pylist(), batch.column("path").to_pylist()):
            f = files[os.path.relpath(os.path.realpath(path), os.path.realpath(data))]
            out[key] = (f.get("original"), f.get("split"), f.get("edit") or f["role"], f.get("kind"))
    return out


def implied_pairs(groups) -> set[tuple[int, int]]:
    return {(min(a.key, b.key), max(a.key, b.key)) for g in groups for i, a in enumerate(g.members) for b in g.members[i + 1:]}


def single_linkage(a: np.ndarray, b: np.ndarray) -> set[tuple[int, int]]:
    """Pairs implied by connected components of the edges (a, b): the chains single linkage makes."""
    parent: dict[int, int] = {}

    def root(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for x, y in zip(a.tolist(), b.tolist()):
        parent[root(x)] = root(y)
    comps: dict[int, list[int]] = {}
    for x in list(parent):
        comps.setdefault(root(x), []).append(x)
    return {(min(p, q), max(p, q)) for c in comps.values() for i, p in enumerate(c) for q in c[i + 1:]}


def one_picture(a: int, b: int, label: dict, also: set[tuple[int, int]] = frozenset()) -> bool:
    """Whether two images are copies: both derive from one original, or (a, b) is in `also`."""
    return (label[a][0] is not None and label[a][0] == label[b][0]) or (min(a, b), max(a, b)) in also


def scored(pairs: set[tuple[int, int]], label: dict, total_true: int, also: set[tuple[int, int]] = frozenset()) -> dict:
    from simsearch.bench.metrics import wilson

    true = sum(one_picture(a, b, label, also) for a, b in pairs)
    return {"pairs": len(pairs), "precision": wilson(true, len(pairs)).to_dict(), "recall": wilson(true, total_true).to_dict()}


def bench_proxy(args) -> dict:
    from simsearch.dedup import DEFAULT_CONF, Scope, build_groups, scope_of, stored_pairs
    from simsearch.bench.metrics import wilson

    data = args.data
    manifest = json.loads((data / "manifest.json").read_text())
    idx = proxy_index(data, args.work, args.model)
    label = truth(idx, data, manifest)
    audited, audit = audited_copies(idx, data)
    k, floor = args.k or DEFAULT_CONF["k"], min(FLOORS)
    whole = scope_of(idx, None)
    chosen = sample(label, args.originals, args.distractors)
    full = Scope(chosen, whole.content[np.searchsorted(whole.keys, chosen)])
    with common.measure() as m:
        pairs, verified_now = stored_pairs(idx, full, k, floor)
    out = {"images": len(full.keys), "pool": len(whole.keys), "sample": {"originals_per_split": args.originals,
           "distractors": args.distractors}, "k": k, "floors": list(FLOORS), "verified_pairs": pairs.num_rows,
           "verified_now": verified_now, "verify_seconds": round(m.seconds, 1), "load": [m.load_before, m.load_after],
           "splits": {}, "audit": {**audit, "copies_in_pool": len(audited)} if audit else None}
    a_all, b_all = pairs.column("a").to_numpy(), pairs.column("b").to_numpy()
    cos_all, score_all = pairs.column("cosine").to_numpy(), pairs.column("score").to_numpy()
    by_style_all = np.isfinite(pairs.column("style").to_numpy())  # style candidates pass at any content floor
    agree_all = pairs.column("agreement").to_numpy()
    for split in ("tune", "heldout", "heldout-no-figures", *(("heldout-audited",) if audit else ())):
        # diagnostics: without the documentation figures (near-identical diagram renderings); with the
        # pairs the audit judged to be copies counted as copies
        also = audited if split.endswith("audited") else set()
        keys = np.sort(np.array([key for key in full.keys.tolist() if (label[key][0] is None or label[key][1] == split.split("-")[0])
                                 and not (split.endswith("no-figures") and label[key][3] == "figure")], np.int64))
        sub = Scope(keys, full.content[np.searchsorted(full.keys, keys)])
        per_original: dict[str, int] = {}
        for key in keys.tolist():
            if label[key][0] is not None:
                per_original[label[key][0]] = per_original.get(label[key][0], 0) + 1
        inside_keys = set(keys.tolist())
        total = sum(c * (c - 1) // 2 for c in per_original.values()) + sum(
            x in inside_keys and y in inside_keys and not one_picture(x, y, label) for x, y in also)
        inside = np.isin(a_all, keys) & np.isin(b_all, keys)
        a, b, cos, score, agree = a_all[inside], b_all[inside], cos_all[inside], score_all[inside], agree_all[inside]
        by_style = by_style_all[inside]
        true = np.array([one_picture(x, y, label, also) for x, y in zip(a.tolist(), b.tolist())], bool)
        res = {"images": len(keys), "true_pairs": total, "candidate_recall": {}, "verified": {}, "groups": {}, "cosine_only": {}}
        for f in FLOORS:
            cand = (cos >= f) | by_style
            res["candidate_recall"][f"{f:.2f}"] = wilson(int((true & cand).sum()), total).to_dict()
            if f == min(FLOORS):
                res["candidates"] = {"pairs": int(cand.sum()), "by_style": int(by_style.sum())}
            sweep_v, sweep_g = {}, {}
            keep = pairs.filter(np.isin(a_all, keys) & np.isin(b_all, keys) & ((cos_all >= f) | by_style_all))
            for t in THRESHOLDS:
                for g in AGREEMENTS:
                    edge = cand & (score >= t) & (agree >= g)
                    rule = f"{t:.2f}@{g:.2f}"
                    sweep_v[rule] = {"pairs": int(edge.sum()), "precision": wilson(int((true & edge).sum()), int(edge.sum())).to_dict(),
                                     "recall": wilson(int((true & edge).sum()), total).to_dict()}
                    if args.groups or t == THRESHOLDS[0]:
                        sweep_g[rule] = scored(implied_pairs(build_groups(idx, sub, keep, float(t), float(g))), label, total, also)
            res["verified"][f"{f:.2f}"], res["groups"][f"{f:.2f}"] = sweep_v, sweep_g
        for c in np.round(np.arange(0.80, 1.0, 0.01), 2):
            edge = cos >= c
            res["cosine_only"][f"{c:.2f}"] = {
                "edges": {"pairs": int(edge.sum()), "precision": wilson(int((true & edge).sum()), int(edge.sum())).to_dict(),
                          "recall": wilson(int((true & edge).sum()), total).to_dict()},
                "single_linkage": scored(single_linkage(a[edge], b[edge]), label, total, also)}
        res["per_edit_pairs"] = _per_edit(a, b, np.where(by_style, 1.0, cos), score, agree, label)  # style candidates: at any floor
        res["copies_per_edit"] = {}  # each copy is one (original, copy) pair: the per-edit recall's denominator
        for key in keys.tolist():
            if label[key][0] is not None and label[key][2] != "original":
                res["copies_per_edit"][label[key][2]] = res["copies_per_edit"].get(label[key][2], 0) + 1
        out["splits"][split] = res
    out["fit"] = fit(out)
    for res in out["splits"].values():
        del res["per_edit_pairs"]  # what the fit's per-edit recall came from: thousands of numbers
    return out


def sample(label: dict, originals: int | None, distractors: int | None) -> np.ndarray:
    """Keys of every image of `originals` originals per split (evenly spread over their sorted names)
    and of `distractors` distractors; None: all."""
    from simsearch.bench.fixtures import spread

    names = {sp: sorted({v[0] for v in label.values() if v[0] is not None and v[1] == sp}) for sp in ("tune", "heldout")}
    keep = {o for sp in names.values() for o in (spread(sp, originals) if originals else sp)}
    others = sorted(key for key, v in label.items() if v[0] is None)
    others = set(spread(others, distractors) if distractors else others)
    return np.sort(np.array([key for key, v in label.items() if v[0] in keep or key in others], np.int64))


def _per_edit(a, b, cos, score, agree, label) -> dict:
    """For pairs (original, copy), the copy's edit -> arrays kept for the fitted rule's per-edit recall."""
    rows: dict[str, list] = {}
    for x, y, c, s, g in zip(a.tolist(), b.tolist(), cos.tolist(), score.tolist(), agree.tolist()):
        lx, ly = label[x], label[y]
        if lx[0] is None or lx[0] != ly[0] or "original" not in (lx[2], ly[2]):
            continue
        edit = ly[2] if lx[2] == "original" else lx[2]
        rows.setdefault(edit, []).append([round(c, 4), round(s, 4), round(g, 4)])
    return rows


def fit(out: dict) -> dict:
    """On the tuning split: among the rules (floor, threshold @ agreement) whose GROUP pair precision
    reaches the target (Wilson point estimate), the one of the highest recall; when none does, the
    one of the best F1. Then the held-out split at that rule."""
    tune, held = out["splits"]["tune"], out["splits"]["heldout"]
    rules = [(f, rule, r) for f, sweep in tune["groups"].items() for rule, r in sorted(sweep.items()) if r["pairs"]]
    reaching = [x for x in rules if x[2]["precision"]["value"] >= TARGET_PRECISION]
    reached = bool(reaching)
    f1 = lambda r: 2 * r["precision"]["value"] * r["recall"]["value"] / max(r["precision"]["value"] + r["recall"]["value"], 1e-9)  # noqa: E731
    f, rule, _ = max(reaching, key=lambda x: x[2]["recall"]["value"]) if reached else max(rules, key=lambda x: f1(x[2]))
    t, g = (float(v) for v in rule.split("@"))
    per_edit = {}
    for split in ("tune", "heldout"):
        found = out["splits"][split]["per_edit_pairs"]
        per_edit[split] = {e: round(sum((c >= float(f)) and (s >= t) and (a >= g) for c, s, a in found.get(e, [])) / n, 3)
                           for e, n in sorted(out["splits"][split]["copies_per_edit"].items())}
    nofig, audit = out["splits"]["heldout-no-figures"], out["splits"].get("heldout-audited")
    no_agreement = max(((r, rr) for r, rr in tune["groups"][f].items() if r.endswith("@0.00") and rr["pairs"]), key=lambda x: f1(x[1]))[0]
    return {"found": True, "target_reached_on_tune": reached, "rule": "highest recall at the target precision" if reached
            else "best F1 (target precision not reached)", "min_cosine": float(f), "threshold": t, "min_agreement": g,
            "tune": tune["groups"][f][rule], "heldout": held["groups"][f].get(rule), "heldout_verified_edges": held["verified"][f][rule],
            "heldout_no_figures": nofig["groups"][f].get(rule), "heldout_audited": audit and audit["groups"][f].get(rule),
            "without_agreement": {"rule": no_agreement, "tune": tune["groups"][f][no_agreement], "heldout": held["groups"][f][no_agreement]},
            "per_edit_original_copy_recall": per_edit}


# -- scale ------------------------------------------------------------------------------------------------
def real_source(work: Path, data: Path | None, model: str | None):
    """(Synth source dict, planted pairs [(row a, row b) dicts with content, dense bytes, width, height], meta)."""
    from simsearch import Index

    if data is not None and (data / "manifest.json").exists():
        idx = proxy_index(data, work, model)
        manifest = json.loads((data / "manifest.json").read_text())
        label = truth(idx, data, manifest)
    else:  # the smoke test: examples/images and their mirrored halves
        idx, label = quick_source(work, model)
    keys, content = idx.store.vectors("content")
    style_keys, style = idx.store.vectors("style")
    style = style[np.argsort(style_keys)[np.searchsorted(np.sort(style_keys), keys)]]  # in the order of keys
    by_original: dict[str, dict[str, int]] = {}
    for key, (orig, _, edit, _) in label.items():
        if orig is not None:
            by_original.setdefault(orig, {})[edit] = key
    couples = [(v["original"], key) for v in by_original.values() if "original" in v
               for e, key in sorted(v.items()) if e != "original"]
    rows = idx.store.find(sorted({x for c in couples for x in c}), ["content", "style", "dense", "width", "height", "thumb"])
    planted = [(rows[a], rows[b]) for a, b in couples if a in rows and b in rows]
    source = {"paths": keys.astype(str), "content": content, "style": style}
    return source, planted, idx.store.meta


def quick_source(work: Path, model: str | None):
    """A tiny labelled set for --quick: examples/images and a mirrored copy of each."""
    from PIL import Image, ImageOps

    from simsearch import Index

    folder = work / "quick-images"
    if not folder.exists():
        folder.mkdir(parents=True)
        for p in sorted(common.EXAMPLES.glob("*.jpg")):
            Image.open(p).convert("RGB").save(folder / f"{p.stem}.png")
            ImageOps.mirror(Image.open(p).convert("RGB")).save(folder / f"{p.stem}.mirror.jpg")
    idx = Index(work / "quick.db", model=model)
    idx.add_folder(folder)
    label = {}
    for batch in idx.store.scan(["key", "path"]):
        for key, path in zip(batch.column("key").to_pylist(), batch.column("path").to_pylist()):
            name = Path(path).name
            label[key] = (name.split(".")[0], None, "copy" if ".mirror." in name else "original", "photo")
    return idx, label


def build_synthetic(db: Path, n: int, source: dict, planted: list, meta: dict) -> dict:
    """n rows of scale.Synth (scale.rows_table) in which rows 0 and 1 of every PLANT_EVERY are a
    planted copy pair: real content and style vectors (with 1e-3 noise), dense tensors and thumbnails. Other rows carry no
    dense tensor (none is read unless a row is a candidate), but for the first PRIOR_ROWS, which the
    verifier's positional prior samples. -> the planted keys"""
    import pyarrow as pa

    from scale import Synth, rows_table, unit
    from simsearch.descriptors.codec import decode_dense, encode_dense
    from simsearch.index import PRIOR_ROWS
    from simsearch.indexers.local import WIRE_DTYPE
    from simsearch.store import ImageStore

    s = Synth(source=source)
    s.noise = NOISE_NORM / s.nn["content"]  # unrelated rows: two of one source meet at cosine ~0.14, far below any floor
    store = ImageStore(db)
    store.create({k: v for k, v in meta.items() if k not in ("format", "uuid")}, s.content.shape[1], s.style.shape[1])
    tokens, dim = meta["dense_shape"]
    dtype = meta["config"]["dense_dtype"]
    rng = np.random.default_rng(0)
    truth = []
    for a in range(0, n, 50_000):
        b = min(n, a + 50_000)
        t = rows_table(s, a, b)
        content, style = (t.column(c).combine_chunks().values.to_numpy().reshape(b - a, -1).copy() for c in ("content", "style"))
        dense, width, height = [b""] * (b - a), [224] * (b - a), [224] * (b - a)
        thumb = t.column("thumb").to_pylist()
        keys = t.column("key").to_numpy()
        for i in range(a, min(b, PRIOR_ROWS)):  # the positional prior's sample (Index.positional_prior): real tokens
            dense[i - a] = encode_dense(decode_dense(planted[i % len(planted)][i % 2]["dense"], tokens, dim, dtype), WIRE_DTYPE)
        for start in range(a - a % PLANT_EVERY + (PLANT_EVERY if a % PLANT_EVERY else 0), b - 1, PLANT_EVERY):
            pair = planted[(start // PLANT_EVERY) % len(planted)]
            for i, row in zip((start - a, start + 1 - a), pair):
                for vectors, column in ((content, "content"), (style, "style")):
                    x = np.asarray(row[column], np.float32)[None]
                    vectors[i] = unit(x + 1e-3 * rng.standard_normal(x.shape, np.float32))[0]
                dense[i] = encode_dense(decode_dense(row["dense"], tokens, dim, dtype), WIRE_DTYPE)
                width[i], height[i], thumb[i] = row["width"], row["height"], row["thumb"]
            truth.append([int(keys[start - a]), int(keys[start + 1 - a])])
        for name, vectors in (("content", content), ("style", style)):
            t = t.set_column(t.schema.get_field_index(name), name, pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1).astype(t.schema.field(name).type.value_type.to_pandas_dtype())), vectors.shape[1]))
        for name, values, kind in (("dense", dense, pa.binary()), ("width", width, pa.int32()), ("height", height, pa.int32()),
                                   ("thumb", thumb, t.schema.field("thumb").type)):
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, kind))
        store.put(t)
        if b == n:  # once: every full compaction rewrites the whole table, and 1M rows of real style vectors are 23 GB
            store.compact(full=True)
        common.log.info("%s: %d rows", db.name, b)
    return {"planted_pairs": truth}


def scale_run(db: Path, min_cosine: float | None = None) -> dict:
    """In a fresh process: FAISS index brought up to date, then find_duplicates timed, peak RSS."""
    from simsearch import Index
    from simsearch.dedup import STYLE_K, find_duplicates

    idx = Index(db)  # as `simsearch dedup` opens it
    t = time.perf_counter()
    idx.refresh_ann()
    ann_s = time.perf_counter() - t
    t = time.perf_counter()
    idx.positional_prior()  # the model and the verifier's prior: a fixed cost, whatever the table's size
    model_s = time.perf_counter() - t
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load = loadavg()
    t, c = time.perf_counter(), time.process_time()
    res = find_duplicates(idx, min_cosine=min_cosine)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    pairs = implied_pairs(res.groups)  # a planted pair is found when both rows land in one group
    return {"rows": idx.count(), "ann_kind": idx.vector_index("content").kind, "ann_build_s": round(ann_s, 1), "model_load_s": round(model_s, 1),
            "dedup_s": round(seconds, 2), "dedup_cpu_s": round(cpu, 2), "pairs_verified": res.pairs_verified,
            "groups": len(res.groups), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_dedup_mib": round(rss_before / 1024), "load": [load, loadavg()], "found_pairs": sorted(pairs),
            "style_k": STYLE_K, "style_dim": idx.store.schema.field("style").type.list_size}


def n_by_n_baseline(source_db: Path) -> dict:
    """imagededup's way at this size: the whole N x N cosine matrix, thresholded."""
    from simsearch.store import ImageStore

    import tracemalloc

    _, x = ImageStore(source_db).vectors("content")
    tracemalloc.start()
    t = time.perf_counter()
    sim = x @ x.T
    pairs = int(((sim >= 0.5).sum() - len(x)) // 2)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"rows": len(x), "seconds": round(seconds, 2), "matrix_mib": round(sim.nbytes / 2**20),
            "peak_traced_mib": round(peak / 2**20),
            "pairs_at_0.5": pairs, "memory_at_1M_gib": round(4 * 1e12 / 2**30)}


def bench_scale(args) -> dict:
    from simsearch.store import ImageStore

    source, planted, meta = real_source(args.work, args.data, args.model)
    rows = []
    for n in args.sizes:
        db = args.work / f"synthetic-{n}.db"
        info_file = db / "planted.json"
        if info_file.exists() and ImageStore(db).schema.field("style").type.list_size != source["style"].shape[1]:
            info_file.unlink()  # built before the rows carried real style vectors: build again
        if not info_file.exists():
            shutil.rmtree(db, ignore_errors=True)
            t = time.perf_counter()
            info = build_synthetic(db, n, source, planted, meta)
            info["build_s"] = round(time.perf_counter() - t, 1)
            info_file.write_text(json.dumps(info))
        info = json.loads(info_file.read_text())
        shutil.rmtree(db / "dedup", ignore_errors=True)  # time a first run, not a cached one
        floor = [] if args.scale_min_cosine is None else [str(args.scale_min_cosine)]
        proc = subprocess.run([sys.executable, __file__, "_scale_run", str(db), *floor], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(common.HERE.parent), os.environ.get("PYTHONPATH", "")])})
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        found = {tuple(p) for p in run.pop("found_pairs")}
        truth = {tuple(sorted(p)) for p in info["planted_pairs"]}
        run["planted_pairs"] = len(truth)
        run["planted_found"] = len(truth & found)
        run["build_s"] = info.get("build_s")
        rows.append(run)
        common.log.info("scale %s", run)
    return {"rows": rows, "plant_every": PLANT_EVERY, "planted_sources": len(planted),
            "baseline": n_by_n_baseline(args.work / f"synthetic-{min(args.sizes)}.db") if min(args.sizes) <= BASELINE_ROWS else None}


# -- results -----------------------------------------------------------------------------------------------
def _candidates(row: dict) -> str:
    """A scale row's candidate stage: rows measured before the style neighbours carry no style_k."""
    return f"content + style ({row['style_k']} NN, {row['style_dim']}-d)" if row.get("style_k") else "content only (before style)"


def pct(e: dict | None) -> str:
    if not e or e["n"] == 0:
        return "-"
    return f"{e['value']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"


def _provenance(section: dict) -> str:
    data = f" Data: {section['data']}." if "data" in section else ""
    return f"Machine: {machine_line(section['machine'])}. Command: `{section['command']}` ({section['date']}).{data}\n"


def render(r: dict) -> str:
    lines = ["# simsearch dedup", ""]
    p = r.get("proxy")
    if isinstance(p, dict) and "splits" in p:
        f = p["fit"]
        lines += ["## Copy-detection proxy: pair precision and recall", "", _provenance(p),
                  f"{p['images']} images of the {p['pool']}-image pool (originals, distractors and the mild copies; sample: "
                  f"{p['sample']}), neighbours from the whole pool, k = {p['k']}, every candidate (content "
                  f"cosine >= {min(p['floors'])}, or a style neighbour: simsearch.dedup.candidates) verified once ({p['verified_pairs']} pairs, " + (
                      f"{p['verify_seconds']} s, load {p['load'][0]:.1f}-{p['load'][1]:.1f})" if p.get("verified_now", 1) else
                      "all read from the pair cache of an earlier run with the same verifier: its time is not this run's)") +
                  ". Intervals: 95 % Wilson.", ""]
        if f.get("found"):
            nf = f["heldout_no_figures"]
            wa = f.get("without_agreement") or {"rule": "not measured", "heldout": {"pairs": "-", "precision": None, "recall": None}}
            lines += [f"Fitted on the tuning split: candidate floor {f['min_cosine']}, verified-score threshold "
                      f"{f['threshold']}, thumbnails' agreement {f['min_agreement']} ({f['rule']}; target: precision "
                      f"{TARGET_PRECISION} at recall {TARGET_RECALL}).", "",
                      "| split | group pairs | precision | recall |", "|---|---|---|---|",
                      f"| tune | {f['tune']['pairs']} | {pct(f['tune']['precision'])} | {pct(f['tune']['recall'])} |",
                      f"| held-out | {f['heldout']['pairs']} | {pct(f['heldout']['precision'])} | {pct(f['heldout']['recall'])} |",
                      f"| held-out without documentation figures (diagnostic) | {nf['pairs']} | {pct(nf['precision'])} | {pct(nf['recall'])} |",
                      *([f"| held-out, the audit's copies counted as copies (diagnostic; AUDIT) | {au['pairs']} | {pct(au['precision'])} | "
                         f"{pct(au['recall'])} |"] if (au := f.get("heldout_audited")) and p.get("audit") else []),
                      f"| held-out, best F1 on tune without the agreement ({wa['rule']}) | {wa['heldout']['pairs']} | "
                      f"{pct(wa['heldout']['precision'])} | {pct(wa['heldout']['recall'])} |",
                      "", "Recall of (original, copy) pairs per edit at the fitted rule (verified edges, out of every copy of that edit):", "",
                      "| edit | tune | held-out |", "|---|---|---|"]
            pe = f["per_edit_original_copy_recall"]
            lines += [f"| {e} | {pe['tune'].get(e, '-')} | {pe['heldout'].get(e, '-')} |" for e in sorted(pe["heldout"])]
        else:
            lines += ["No threshold reached the target precision on the tuning split."]
        held = p["splits"]["heldout"]
        lines += ["", "Held-out split, other rules (same candidates): content cosine alone, as edges and as single-linkage groups; "
                  "verified edges at the fitted floor.", "",
                  "| rule | pairs | precision | recall |", "|---|---|---|---|"]
        for c in ("0.90", "0.95"):
            cc = held["cosine_only"].get(c)
            if cc:
                lines += [f"| cosine >= {c} | {cc['edges']['pairs']} | {pct(cc['edges']['precision'])} | {pct(cc['edges']['recall'])} |",
                          f"| cosine >= {c}, single linkage | {cc['single_linkage']['pairs']} | {pct(cc['single_linkage']['precision'])} | "
                          f"{pct(cc['single_linkage']['recall'])} |"]
        if f.get("found"):
            e = f["heldout_verified_edges"]
            lines += [f"| verified >= {f['threshold']}, agreement >= {f['min_agreement']} (edges) | {e['pairs']} | {pct(e['precision'])} | {pct(e['recall'])} |"]
        lines += ["", "Candidate recall ceiling (true pairs among the candidates: content k-NN above the floor, and the "
                  "style neighbours), held-out: " + ", ".join(f"{fl}: {pct(v)}" for fl, v in held["candidate_recall"].items())
                  + (f"; {held['candidates']['pairs']} candidate pairs, {held['candidates']['by_style']} of them style neighbours"
                     if "candidates" in held else ""), ""]
        if p.get("audit"):
            au = p["audit"]
            lines += [f"The audit ({AUDIT.name}): {au['what']} Labelled by {au['by']}; "
                      f"rule: {au['rule']} {au['result']} {au['copies_in_pool']} pairs of the pool count as copies in the "
                      "audited row; its recall counts them among the true pairs (pairs nobody audited are not).", ""]
    elif p:
        lines += ["## Copy-detection proxy", "", str(p), ""]
    s = r.get("scale")
    if s:
        lines += ["## Time and peak memory as the table grows", "", _provenance(s) if "machine" in s else "",
                  f"Synthetic rows (real content and style vectors + noise, scale.py's Synth), one planted copy pair (real vectors and "
                  f"dense tensors of an original and a mild copy) per {s['plant_every']} rows; `find_duplicates` on the whole "
                  "table in a fresh process, the FAISS index built and the model loaded before it (not counted).", "",
                  "| rows | candidates | FAISS | dedup s | CPU s | CPU ms per row | pairs verified | CPU ms per pair | planted found | peak RSS MiB | of it dedup MiB | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['rows']:,} | {_candidates(x)} | {x['ann_kind']} | {x['dedup_s']} | {x['dedup_cpu_s']} | {1000 * x['dedup_cpu_s'] / x['rows']:.3f} | "
                  f"{x['pairs_verified']} | {1000 * x['dedup_cpu_s'] / max(x['pairs_verified'], 1):.1f} | {x['planted_found']}/{x['planted_pairs']} | "
                  f"{x['peak_rss_mib']} | {x['peak_rss_mib'] - x['rss_before_dedup_mib']} | {x['load'][0]:.1f}-{x['load'][1]:.1f} |" for x in s["rows"]]
        lines += ["", "Rows carry no dense tensor unless planted, and the planted rows' real vectors all sit above the "
                  "cosine floor of one another (this model's content vectors are close), so every planted row brings its "
                  "k candidates once planted rows outnumber k: the verified pairs grow with n, as the cost does. "
                  "`peak RSS` includes the model and both FAISS indexes, built in the same process before the timing; "
                  "`of it dedup`: the growth during `find_duplicates`."]
        if s.get("content_only_same_machine"):
            lines += ["", "The same sizes with content candidates only, same machine, the commit before the style neighbours: " + "; ".join(
                f"{x['rows']:,} rows {x['dedup_s']} s ({x['dedup_cpu_s']} s CPU), {x['pairs_verified']} pairs, planted found "
                f"{x['planted_found']}/{x['planted_pairs']}" for x in s["content_only_same_machine"]) + "."]
        b = s["baseline"] or {}
        lines += [] if not b else ["", f"Baseline (same process as the {b['rows']:,}-row build): the N x N cosine matrix takes {b['seconds']} s and "
                  f"{b['matrix_mib']} MiB; at 1M rows it would be {b['memory_at_1M_gib']:,} GiB.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_scale_run"]:
        print(json.dumps(scale_run(Path(argv[1]), *map(float, argv[2:]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="all", choices=["all", "proxy", "scale", "render"])
    ap.add_argument("--data", type=Path, default=data_root() / DATA_VERSION)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--model", default=None)
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 1_000_000])
    ap.add_argument("--scale-min-cosine", type=float, default=None, help="candidate floor of the scale runs (default: the library's)")
    ap.add_argument("--k", type=int, default=None, help="proxy: neighbours per image (default: the library's)")
    ap.add_argument("--originals", type=int, default=None, help="proxy: originals per split (default all)")
    ap.add_argument("--distractors", type=int, default=None, help="proxy: distractors (default all)")
    ap.add_argument("--groups", action=argparse.BooleanOptionalAction, default=True, help="sweep group pairs at every threshold")
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS)
    ap.add_argument("--quick", action="store_true")
    args = common.parse_args(ap, argv, QUICK)
    common.setup_logging()
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "dedup.json"
    r = json.loads(path.read_text()) if path.exists() else {}
    ran = {"machine": machine_info(), "command": command_line(), "date": now()}  # each section keeps its own
    has_proxy = (args.data / "manifest.json").exists() and not args.quick
    if args.what in ("all", "proxy"):
        r["proxy"] = bench_proxy(args) | ran | {"data": args.data.name} if has_proxy else f"skipped: no proxy data at {args.data}"
    if args.what in ("all", "scale"):
        if not has_proxy:
            args.data = None
        fresh = bench_scale(args)
        kept = [x for x in (r.get("scale") or {}).get("rows", []) if x["rows"] not in {y["rows"] for y in fresh["rows"]}]
        fresh["rows"] = sorted(kept + fresh["rows"], key=lambda x: x["rows"])  # sizes not re-run stay as measured
        r["scale"] = fresh | ran
    common.write_results("dedup", r, render(r), args.out_dir)


if __name__ == "__main__":
    main()
