"""The benchmark scripts run end to end in their quick modes on the tiny random 12-block ViT and
write their results (JSON + markdown, into a temporary --out-dir) with the expected keys.

All scripts run one after another in ONE subprocess (each as `__main__`, with its own argv, as
`python benchmarks/<script>.py ...` would), so torch and transformers are imported once. The grouped
datasets of benchmarks/data.py (and the proxy suite made of them) come from Debian packages; here a
small stand-in with the same layout is made from examples/images, and cut-outs with an alpha channel
stand in for the tuxpaint stamps. Not run: data.py, copydetect_data.py's Debian build and scale_data.py's
Debian sources (apt), `speed.py cold` and `memory`, `quality_suite.py timing` and `scale.py ray` (each
starts fresh Python processes or a Ray cluster, tens of seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import EXAMPLES, REPO
from simsearch.rerank import RERANKERS

pytestmark = pytest.mark.slow  # one subprocess, ~25 s of CPU
RUNNER = r"""
import json, runpy, sys, time, traceback
sys.path.insert(0, "benchmarks")  # as for a script run from there
status = {}
for label, script, argv in json.loads(sys.argv[1]):
    sys.argv = [script, *argv]
    print(f"=== {label}", file=sys.stderr, flush=True)
    t, c = time.perf_counter(), time.process_time()
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except Exception:
        traceback.print_exc()
        code = "exception"
    status[label] = {"code": code, "seconds": round(time.perf_counter() - t, 1), "cpu": round(time.process_time() - c, 1)}
print("STATUS " + json.dumps(status))
"""
# Grouped stand-ins of data.py's datasets: two groups of three images each.
DATASETS = {"tuxpaint-categories": ("animals", "food"), "card-ranks": ("1", "2"),
            "tuxpaint-style": ("cartoon", "photo"), "card-decks": ("oxygen", "paris")}


SUITE = {"tuxpaint-categories": "content", "card-ranks": "content", "tuxpaint-style": "style", "card-decks": "style"}


def grouped_data(root):
    """The stand-ins, and a proxy-suite manifest over them (as `data.py suite` writes)."""
    photos = sorted(EXAMPLES.glob("*.jpg"))
    for d, (name, groups) in enumerate(DATASETS.items()):
        for g, group in enumerate(groups):
            (root / name / group).mkdir(parents=True)
            for k in range(3):
                img = Image.open(photos[(3 * g + k + d) % len(photos)]).convert("RGB")
                img.resize((80, 60)).save(root / name / group / f"{group}_{k}.png")
    (root / "suite.json").write_text(json.dumps({"sets": {name: {"mode": mode} for name, mode in SUITE.items()}}))
    return root


def cutouts(root, n: int = 3):
    """ROOT/cutouts/<k>.png: photos with an elliptical alpha mask, as coseg.py pastes the tuxpaint stamps."""
    from PIL import ImageDraw

    (root / "cutouts").mkdir(parents=True)
    for k, photo in enumerate(sorted(EXAMPLES.glob("*.jpg"))[:n]):
        img = Image.open(photo).convert("RGBA").resize((96, 72))
        alpha = Image.new("L", img.size, 0)
        ImageDraw.Draw(alpha).ellipse((8, 6, 88, 66), fill=255)
        img.putalpha(alpha)
        img.save(root / "cutouts" / f"cutout_{k}.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny12):
    """-> (status per run, out dir per script, the runner's stderr, the temporary folder)"""
    tmp = tmp_path_factory.mktemp("benchmarks")
    data = grouped_data(tmp / "data")
    out = {name: tmp / "out" / name for name in ("scoring", "speed", "dense", "rerank", "retrieval", "proxy",
                                                  "rerank_device", "replace", "runtime", "copydetect", "dedup", "coseg",
                                                  "quality", "scale", "sd_scoring", "sd_correspondence", "serve")}
    common = ["--quick", "--model", str(tiny12)]
    scale = ["benchmarks/scale.py", "--work", str(tmp / "scale" / "work"), "--data-root", str(tmp / "scale"),
             "--images-dir", str(EXAMPLES), "--model", str(tiny12), "--out-dir", str(out["scale"])]
    quality = [*common, "--suite", str(data), "--out-dir", str(out["quality"])]
    plan = [
        ("scoring", "benchmarks/scoring.py", [*common, "--work", str(tmp / "scoring"), "--out-dir", str(out["scoring"])]),
        *[(f"speed {cmd}", "benchmarks/speed.py", [*common, "--work", str(tmp / "speed"), "--out-dir", str(out["speed"]), cmd])
          for cmd in ("throughput", "stages", "latency")],
        ("dense", "benchmarks/dense.py", [*common, "--work", str(tmp / "dense"), "--fixture", str(tmp / "spair"),
                                          "--out-dir", str(out["dense"]), "all"]),
        ("rerank_quality", "benchmarks/rerank_quality.py", [*common, "--root", str(data), "--out-dir", str(out["rerank"])]),
        ("retrieval_quality", "benchmarks/retrieval_quality.py", [*common, "--root", str(data), "--datasets", ",".join(DATASETS),
                                                                  "--out-dir", str(out["retrieval"])]),
        ("proxy_benchmarks", "benchmarks/proxy_benchmarks.py", [*common, "--data", str(data), "--work", str(tmp / "proxy"),
                                                                "--max-images", "4", "--out-dir", str(out["proxy"])]),
        ("make_spair_fixture", "benchmarks/make_spair_fixture.py", [str(tmp / "fixture"), "--no-graf"]),
        ("rerank_device", "benchmarks/rerank_device.py", ["--quick", "--out-dir", str(out["rerank_device"])]),
        ("replace", "benchmarks/replace.py", ["--quick", "--work", str(tmp / "replace"), "--out-dir", str(out["replace"])]),
        ("runtime", "benchmarks/runtime.py", [*common, "--work", str(tmp / "runtime"), "--out-dir", str(out["runtime"])]),
        ("copydetect", "benchmarks/copydetect.py", [*common, "--data-root", str(tmp / "copydetect"),
                                                    "--out-dir", str(out["copydetect"])]),
        ("dedup", "benchmarks/dedup.py", [*common, "--work", str(tmp / "dedup"), "--out-dir", str(out["dedup"])]),
        ("coseg", "benchmarks/coseg.py", [*common, "--stamps", str(cutouts(tmp / "stamps")), "--categories", "cutouts",
                                          "--out-dir", str(out["coseg"])]),
        ("quality_suite compare", "benchmarks/quality_suite.py", ["compare", *quality, "--cache", str(tmp / "quality" / "cache"),
                                                                  "--work", str(tmp / "quality" / "work")]),
        ("quality_suite compact", "benchmarks/quality_suite.py", ["compact", *quality, "--cache", str(tmp / "quality" / "cache")]),
        ("quality_explore", "benchmarks/quality_explore.py", [*quality, "--cache", str(tmp / "quality" / "tokens")]),
        ("scale_data", "benchmarks/scale_data.py", ["--root", str(tmp / "scale"), "--images", str(EXAMPLES),
                                                    "--model", str(tiny12)]),
        ("scale ann", scale[0], [*scale[1:], "ann", "--rows", "3000", "--queries", "40", "--latency-queries", "5",
                                 "--ivf", "IVF16,Flat", "IVF16,SQ8", "--nprobe", "2", "16"]),
        ("scale growth", scale[0], [*scale[1:], "growth", "--sizes", "300", "--queries", "5"]),
        ("scale indexes", scale[0], [*scale[1:], "indexes", "--sizes", "1500", "--queries", "5", "--ivf-threshold", "1000",
                                     "--project-rows", "500", "--project-dim", "8"]),
        ("scale codec", scale[0], [*scale[1:], "codec", "--images", "12", "--fit", "8", "--queries", "4"]),
        ("scale rerank", scale[0], [*scale[1:], "rerank", "--images", "12", "--queries", "2", "--threads", "1"]),
        ("scale region", scale[0], [*scale[1:], "region", "--region-db", str(tmp / "scale" / "work" / "rerank-raw-12"),
                                    "--sizes", "40", "--sources", "6", "--queries", "4"]),
        ("sd_scoring", "benchmarks/sd_scoring.py", ["--quick", "--out-dir", str(out["sd_scoring"])]),
        ("sd_correspondence", "benchmarks/sd_correspondence.py", [*common, "--out-dir", str(out["sd_correspondence"])]),
        ("serve_latency", "benchmarks/serve_latency.py", ["--sizes", "40", "--queries", "2", "--rerank-queries", "1",
                                                          "--clients", "2", "--per-client", "2", "--model", str(tiny12),
                                                          "--work", str(tmp / "serve"), "--out-dir", str(out["serve"]),
                                                          "--in-process"]),
    ]
    env = {**os.environ, "SIMSEARCH_DATA": str(tmp / "no-debian-data")}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(plan)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "STATUS " in proc.stdout, proc.stderr[-3000:]
    status = json.loads(proc.stdout.split("STATUS ", 1)[1])
    return status, out, proc.stderr, tmp


def ran(runs, label: str) -> None:
    """The run exited with 0; else its own part of the runner's stderr is the message."""
    status, _, err, _ = runs
    assert status[label]["code"] == 0, err.split(f"=== {label}\n", 1)[1].split("\n=== ", 1)[0][-4000:]


def results(runs, label: str, script: str, name: str) -> dict:
    _, out, _, _ = runs
    ran(runs, label)
    md = (out[script] / f"{name}.md").read_text()
    assert md.startswith("# ") and "GPU:" in md  # rendered through to the end, machine facts included
    return json.loads((out[script] / f"{name}.json").read_text())


MACHINE = {"nproc", "cpu_model", "mem_gib", "gpu", "torch", "faiss", "torch_threads", "python"}


def test_scoring(runs, tiny12):
    res = results(runs, "scoring", "scoring", "scoring")
    assert MACHINE <= set(res["machine"]) and res["model"] == str(tiny12)
    assert res["data"] == {"refs": 3, "generated": 6, "side": 96, "work": str(runs[3] / "scoring")}
    assert set(res["cases"]) == {"by-name", "all-pairs"}
    assert (res["cases"]["by-name"]["pairs"], res["cases"]["all-pairs"]["pairs"]) == (6, 18)
    for case in res["cases"].values():
        assert case["images"] == 9 and case["deterministic_rerun"] is True
        assert set(case["cold"]["pair_scoring_s"]) == set(case["warm_per_metric"]) == {"cosine", "style", "aas"}
        assert set(case["overall"]) == {"cosine", "style", "aas"}


def test_speed(runs):
    res = results(runs, "speed latency", "speed", "speed")
    ran(runs, "speed throughput")
    ran(runs, "speed stages")
    # the throughput section is named after OMP_WAIT_POLICY when the caller's environment sets it
    policy = os.environ.get("OMP_WAIT_POLICY")
    throughput = "throughput" + (f"_omp-{policy.lower()}" if policy else "")
    assert {"machine", throughput, "stages", "latency"} <= set(res) and MACHINE <= set(res["machine"])
    (run,) = res[throughput]["runs"]
    assert run["images"] == 8 and run["failed"] == 0
    stages = res["stages"]["cpu_ms_per_img"]
    assert res["stages"]["images"] == 8 and any(k.startswith("LanceDB ImageStore.put") for k in stages)
    assert set(res["latency"]["sizes"]) == {"40", "80"}
    for size in res["latency"]["sizes"].values():
        assert size["ann_kind"] == "flat" and len(size["rounds"]) == 1


def test_dense(runs):
    res = results(runs, "dense", "dense", "dense")
    assert set(res) == {"latency", "compress", "pck"}
    assert {(r["dtype"], r["method"]) for r in res["latency"]["rows"]} == {
        (d, m) for d in ("float16", "int8") for m in RERANKERS}
    assert res["pck"]["fixtures"] == {"translation": {"pairs": 2, "points": 50, "categories": ["chelsea"]}}
    assert len(res["pck"]["rows"]) == 8 and all(0 <= r["pck@0.1"] <= 1 for r in res["pck"]["rows"])


def test_rerank_quality(runs):
    res = results(runs, "rerank_quality", "rerank", "rerank_quality")
    assert set(res["datasets"]) == {"card-decks", "tuxpaint-categories"}
    for entry in res["datasets"].values():
        assert entry["images"] == 6 and set(entry["results"]) == {"first stage", *(f"+{m}" for m in RERANKERS)}
    assert set(res["datasets"]["card-decks"]["triplets"]["accuracy"]) == {
        "aas", "cosine (style vector)", "cosine (content vector)"}


def test_retrieval_quality(runs):
    res = results(runs, "retrieval_quality", "retrieval", "retrieval_quality")
    assert {d: v["images"] for d, v in res["datasets"].items()} == dict.fromkeys(DATASETS, 6)
    assert {"content:cls", "style:L12", "chance"} <= set(res["results"])


def test_proxy_benchmarks(runs):
    res = results(runs, "proxy_benchmarks", "proxy", "proxy_benchmarks")
    assert res["verify_memo"]["identical"] is True
    assert set(res["datasets"]) == set(DATASETS) and set(res["ip_like"]) == {"blend", "cut"}
    entry = res["datasets"]["card-decks"]
    assert entry["sample"] == {"images": 4, "of": 6, "cap_per_group": 2}  # --max-images 4: two per group
    assert set(entry["runs"]) == {"groups --mode content", "groups --mode style", "sref"}
    assert set(entry["runs"]["sref"]) == {"cosine", "style", "aas", "combined"}


def test_make_spair_fixture(runs):
    ran(runs, "make_spair_fixture")
    assert len(list((runs[3] / "fixture" / "translation" / "PairAnnotation" / "test").glob("*.json"))) == 8


def test_rerank_device(runs):
    res = results(runs, "rerank_device", "rerank_device", "rerank_device")
    (row,) = res["results"]
    assert res["candidates"] == 4 and row["device"] == "cpu" and row["runs"] == 2
    assert 0 < row["ms_p50"] <= row["ms_p95"]


def test_replace(runs):
    res = results(runs, "replace", "replace", "replace")
    (row,) = res["results"].values()
    assert set(res["results"]) == {"2000"} and res["batch"] == 32
    assert row["append"]["seconds_p50"] > 0 and row["replace half"]["seconds_p50"] > 0


def test_runtime(runs):
    res = results(runs, "runtime", "runtime", "runtime")
    assert [r["runtime"] for r in res["index"]] == ["torch", "torch-bf16", "onnx", "auto", "torch"]
    assert all(r["images"] == 16 and r["failed"] == 0 and r["img_per_s"] > 0 for r in res["index"])
    assert res["auto"]["choice"] == "torch"  # pinned for the tests (conftest)
    assert set(res["rankings"]) == {"torch-bf16", "onnx", "auto", "onnx-int8 (not offered)"}
    assert res["sd"]["min_cosine"]["dense"] >= 0.999 and set(res["sd"]["s_per_image"]) == {"torch", "torch-bf16"}
    assert res["rankings"]["onnx"]["content"]["min_cosine"] >= 0.9999
    cold = res["cold_query"]
    assert cold["loaded"] == "{'torch': False, 'transformers': False, 'onnxruntime': True}"
    assert cold["query_s"] > 0 and cold["import_torch_s"] > 0


def test_copydetect(runs):
    """The copy-detection proxy (from examples/images) is what the manifest says, and the benchmark's dedup
    pairs (FAISS k-NN through the index) are the pairs an N x N cosine matrix of the stored vectors gives."""
    import numpy as np

    from simsearch import Index

    res = results(runs, "copydetect", "copydetect", "copydetect")
    data = runs[3] / "copydetect" / "copydetect-quick"
    m = json.loads((data / "manifest.json").read_text())
    files = {f["file"]: f for f in m["files"]}
    originals = {f["original"]: f for f in m["files"] if f["role"] == "original"}
    assert len(originals) == 4 and len(m["queries"]) == 4 * 7 == res["copies"]["queries"]
    assert set(res["cost"]) >= {"queries", "first stage", *RERANKERS} and res["cost"]["first stage"]["wall_s_p50"] > 0
    for q in m["queries"]:  # every copy is a file, its target the original's file, its split the original's
        assert (data / q["file"]).is_file() and q["target"] == originals[q["original"]]["file"]
        assert q["split"] == originals[q["original"]]["split"]
    pool = {str(p.relative_to(data)) for p in (data / "pool").rglob("*") if p.is_file()}
    assert pool == {f for f, e in files.items() if e["role"] in ("original", "distractor", "composite")}
    for r in m["regions"]:  # the crop is the boxed part of the scene, the box inside the scene
        scene, crop = Image.open(data / r["image"]), Image.open(data / r["crop"])
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height and crop.size == (x1 - x0, y1 - y0)
        assert r["target"] in pool
    assert set(res["regions"]["crop_as_query"]) == {f"{k} 1/{n}" for k in ("original", "pasted") for n in (4, 9, 16)}
    table = res["copies"]["splits"]["all"]
    assert set(table) == {*m["edits"], "mean over edit types"} and all(
        table[e]["first stage"]["R@1"]["n"] == 4 for e in m["edits"])
    assert set(table["text"]) == {"first stage", *RERANKERS}
    assert res["copies"]["plan"]["check"]["search() == embed_image + search_embedded"] is True

    # dedup: the true pairs counted from the manifest, the found pairs from an N x N matrix
    dedup = res["dedup"]
    assert dedup["images"] == 4 + 4 + 4 * 5 and dedup["true_pairs"] == 4 * 15  # each original: itself + 5 mild copies
    (db,) = (data / "db").glob("*/dedup.db")
    idx = Index(db)
    keys, vectors = idx.store.vectors("content")
    owner = {int(k): files[str(Path(row["path"]).resolve().relative_to(data))].get("original")
             for k, row in idx.store.find(keys, ["path"]).items()}
    sim = vectors @ vectors.T
    for t, entry in dedup["thresholds"].items():
        a, b = np.nonzero(np.triu(sim >= float(t), 1))
        true = sum(owner[int(keys[i])] is not None and owner[int(keys[i])] == owner[int(keys[j])] for i, j in zip(a, b))
        assert entry["pairs"] == len(a) and entry["recall"]["value"] == true / 60


def test_dedup(runs):
    res = results(runs, "dedup", "dedup", "dedup")
    assert res["proxy"].startswith("skipped")  # --quick: the proxy set is measured by the full run
    rows = res["scale"]["rows"]
    assert [r["rows"] for r in rows] == [300, 3000] and all(r["ann_kind"] == "flat" for r in rows)
    assert [r["planted_pairs"] for r in rows] == [1, 3] and all(r["peak_rss_mib"] > 0 for r in rows)
    assert res["scale"]["baseline"]["rows"] == 300


def test_coseg(runs, tiny12):
    res = results(runs, "coseg", "coseg", "coseg")
    (row,) = res["categories"].values()
    assert set(res["categories"]) == {"cutouts"} and res["model"] == str(tiny12) and res["config"]["image_size"] == 112
    assert row["images"] == len(row["per_image"]) == 3 and row["jaccard"] == pytest.approx(sum(row["per_image"]) / 3)
    assert all(0 <= j <= 1 for j in row["per_image"]) and res["mean"]["jaccard"] == row["jaccard"]


def test_quality_suite(runs, tiny12):
    """compare: the previous and the model's own defaults on every set of the suite; explore: every kind
    of candidate, ranked over the sets of its mode."""
    from simsearch.backbones import descriptor_defaults

    res = results(runs, "quality_suite compare", "quality", "quality_suite")
    ran(runs, "quality_explore")
    ran(runs, "quality_suite compact")
    style_sets = {n for n, mode in SUITE.items() if mode == "style"}
    compact = res["compact"]["sets"]
    assert set(compact) == style_sets and all(r["images"] == 6 and r["fit_rows"] == 6 for r in compact.values())
    for r in compact.values():  # every other image re-scored at this size: the library's ranking is the exact one
        assert r["re-scored (library)"]["mAP"]["value"] == pytest.approx(r["exact"]["mAP"]["value"])
    compare = res["compare"]
    assert compare["chosen"] == json.loads(json.dumps(descriptor_defaults(str(tiny12))))
    assert compare["suite"]["config"]["variants"]["previous"]["descriptors"]["style_layer"] == 4
    rows = compare["suite"]["rows"]
    assert set(rows) == {f"{v}: {m}" for v in ("previous", "chosen") for m in ("cosine", "style", "aas", "combined")}
    for per_set in rows.values():
        assert set(per_set) == set(SUITE) and all(s["triplet_accuracy"]["n"] == 50 for s in per_set.values())
    explore = res["explore-56"]
    assert {n: s["images"] for n, s in explore["sets"].items()} == dict.fromkeys(SUITE, 6)
    assert set(explore["ranks"]) == {"style", "content"}
    for name in ("ms@4", "cov@3", "cov8@5", "ms@2-5", "wt-ms@4", "w-cls@5", "aas@3", "aas@3-nocls", "comb(0.5):aas@3+ms@4"):
        assert name in explore["ranks"]["style"], name


def test_scale(runs):
    """The sources scale_data.py embedded, and every command on rows made from them: an IVF index that
    probes all its lists (flat codes) finds the exact top 10."""
    import numpy as np

    ran(runs, "scale_data")
    (part,) = (runs[3] / "scale" / "scale-embeddings").glob("part-*.npz")
    assert len(np.load(part)["paths"]) == 12
    res = results(runs, "scale rerank", "scale", "scale")
    for label in ("scale ann", "scale growth", "scale indexes", "scale codec", "scale region"):
        ran(runs, label)
    (region,) = res["region"]["results"]
    assert (region["images"], region["kind"], region["codec"]) == (40, "flat", "SQ8") and region["bytes_per_image"] > 0
    ann = {(r["kind"], r["param"]): r["recall@10"] for r in res["ann"]["results"]}
    assert set(ann) == {("flat", ""), *((k, f"nprobe={p}") for k in ("IVF16,Flat", "IVF16,SQ8") for p in (2, 16))}
    assert ann["flat", ""] == ann["IVF16,Flat", "nprobe=16"] == 1.0 and ann["IVF16,Flat", "nprobe=2"] < 1.0
    (growth,) = res["growth"]["results"]
    assert growth["rows"] == 300 and growth["kind"] == "flat" and growth["add_1000_found"] is True
    indexes = {(r["column"], r["variant"]): r for r in res["indexes"]["results"]}
    assert set(indexes) == {("content", "plain"), ("style", "plain"), ("style", "compact")}
    plain, compact = indexes["style", "plain"], indexes["style", "compact"]
    assert (plain["build_kind"], plain["build_project"], compact["build_kind"], compact["build_project"]) == ("ivf", 0, "ivf", 8)
    assert compact["build_file_mib"] < plain["build_file_mib"] and all(0 <= r["recall@10"] <= 1 for r in indexes.values())
    assert {r["format"] for r in res["codec"]["results"]} == {"float16 (raw)", "int8 (raw)", "pca", "pca, plain squared error"}
    assert [(r["format"], r["rows"]) for r in res["rerank"]["results"]] == [("raw", 12), ("pca", 12)]


def test_sd_scoring(runs):
    res = results(runs, "sd_scoring", "sd_scoring", "sd_scoring")
    assert "full" not in res and res["tiny"]["size"] == 128
    assert [(s["n"], s["pairs"]) for s in res["tiny"]["simsearch"]] == [(4, 6), (6, 15)]
    assert [d["timed_pairs"] for d in res["tiny"]["diffsim"]] == [3, 3]


def test_sd_correspondence(runs):
    res = results(runs, "sd_correspondence", "sd_correspondence", "sd_correspondence")
    assert set(res["pck"]) == {"translation"} and set(res["pck"]["translation"]) == {"dino", "sd", "sd+dino"}
    for row in res["pck"]["translation"].values():
        assert row["pairs"] == 2 and row["points"] == 2 * 25 and 0 <= row["pck@0.1"] <= 1
    assert res["ldm"]["measured"]["steps"] == 2 and res["ldm"]["paper_point_s"] > 0


def test_serve_latency(runs):
    res = results(runs, "serve_latency", "serve", "serve")
    (size,) = res["sizes"].values()
    assert set(res["sizes"]) == {"40"} and size["rows"] == 40
    assert size["sequential"]["n"] == 2 and size["rerank_both"]["n"] == 1
    assert size["concurrent"]["requests"] == size["concurrent"]["n"] == 4
