"""Inference runtimes end to end (simsearch.backbones.runtime), each against eager torch in the same run.

    python benchmarks/runtime.py [--images 520] [--runtimes torch,torch-bf16,onnx,auto] [--quick]

- index: `Index.add_folder` on real JPEGs (every JPEG of a few Debian packages, data.py's cache; with
  --quick or without them, crops of examples/images) into a fresh database per runtime, each in its own
  process so that its peak RSS is its own: img/s end to end (decode, forward, LanceDB writes) and the
  forward's share, after the one-off model load / graph export (timed apart). Eager torch runs first and
  last, the others in between forward and then backward (--rounds 2); a runtime's ratio is the mean
  of its runs over the mean of eager torch's two.
- rankings: each runtime's stored vectors against eager torch's: the lowest cosine, whether every
  image's nearest other image (content and style) is the same, and the overlap of the top 10. A
  candidate that is not offered (onnx-int8: MatMul weights quantised dynamically with onnxruntime's own
  tool from the library's float32 graph) is scored the same way on the same pixels.
- sd: the Stable Diffusion UNet's descriptor forward (DiffSim-S taps, DIFT content) in torch-bf16 against
  float32 on the random-weight SD 1.x of common.random_sd (--sd-width 1: the real channel counts), the
  library's runner on the same pixels: time per image and the cosine of the stored vectors.
- cold query: `simsearch query` in a fresh process (best of --cold-repeats) against `python -c "import
  torch"` in the same run, and which of torch / transformers / onnxruntime the query loaded.
Results: benchmarks/results/runtime.{json,md}.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it (simsearch.cli.main), before torch loads
from common import EXAMPLES, command_line, data_root, loadavg, log, machine_info, machine_line, now, parse_args, write_results

JPEG_PACKAGES = ("opencv-doc", "plasma-workspace-wallpapers", "mate-backgrounds", "desktop-base", "ukui-wallpapers",
                 "python3-skimage")
QUICK = dict(images=16, cold_repeats=1, rounds=1, batch_size=4, runtimes="torch,torch-bf16,onnx,auto", subprocess=False,
             sd_width=0.1, sd_side=64, sd_images=2)


# -- data ------------------------------------------------------------------------------------------
def real_jpegs(n: int) -> tuple[list[Path], str] | None:
    """`n` JPEGs spread over those of JPEG_PACKAGES already in the data cache (none downloaded here)."""
    from PIL import Image

    from simsearch.bench.fixtures import spread

    found, used = [], []
    for package in JPEG_PACKAGES:
        tree = data_root() / "pkgs" / package
        jpegs = [p for p in tree.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.stat().st_size > 4096]
        if jpegs:
            found += jpegs
            used.append(package)
    readable = []
    for p in found:
        try:
            with Image.open(p) as im:
                if im.format == "JPEG" and min(im.size) >= 32:
                    readable.append(p)
        except OSError:
            pass
    if len(readable) < n:
        return None
    return spread(readable, n), f"{n} JPEGs spread over the {len(readable)} in Debian packages {', '.join(used)}"


def example_jpegs(n: int, work: Path) -> tuple[list[Path], str]:
    from PIL import Image, ImageOps

    folder = work / "examples-jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    photos, paths = sorted(EXAMPLES.glob("*.jpg")), []
    for k in range(n):
        img = Image.open(photos[k % len(photos)]).convert("RGB")
        v, (w, h) = k // len(photos), img.size
        if v:
            f = 0.9 - 0.08 * (v % 4)
            img = img.crop((int(w * (1 - f) / 2), int(h * (1 - f) / 3), int(w * (1 + f) / 2), int(h * (1 + 2 * f) / 3)))
            img = ImageOps.mirror(img) if v % 2 else img
        paths.append(folder / f"{photos[k % len(photos)].stem}_{v}.jpg")
        img.save(paths[-1], quality=90)
    return paths, f"{n} JPEGs: examples/images and crops / flips of them"


def image_folder(paths: list[Path], work: Path) -> Path:
    folder = work / f"jpegs-{len(paths)}"
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, p in enumerate(paths):
        (folder / f"{i:04d}_{p.name}").symlink_to(p.resolve())
    return folder


# -- one runtime's index run (in this process or a child) ------------------------------------------
def index_run(folder: Path, db: Path, runtime: str, model: str | None, batch_size: int) -> dict:
    from simsearch import Index

    if db.exists():
        shutil.rmtree(db)
    t0 = time.perf_counter()
    idx = Index(db, model=model, runtime=runtime)
    ran = idx.embedder.runtime_for(batch_size)
    idx.ensure_table()  # the model's load
    idx.compile_for_queries()  # the query graph's export, once per configuration (after any index run)
    setup = time.perf_counter() - t0
    load0 = loadavg()
    report = idx.add_folder(folder, batch_size=batch_size)
    seconds = report.seconds  # the indexer's own clock: the folder walk to the last commit
    return {"runtime": runtime, "ran": ran, "images": report.added, "failed": len(report.failed),
            "img_per_s": report.added / seconds, "seconds": seconds, "forward_share": report.embedded_seconds / seconds,
            "setup_s": setup, "load": [round(load0, 2), round(loadavg(), 2)],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def index_in_child(folder: Path, db: Path, runtime: str, model: str | None, batch_size: int) -> dict:
    args = [sys.executable, __file__, "_index", str(folder), str(db), runtime, model or "", str(batch_size)]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if proc.returncode:
        raise RuntimeError(f"index with runtime {runtime} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- rankings --------------------------------------------------------------------------------------
def stored(db: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    from simsearch import Index

    store = Index(db).store
    rows = sorted(store.rows(store.keys_where("true"), ["path", "content", "style"]), key=lambda r: r["path"])
    return [r["path"] for r in rows], {m: np.asarray([r[m] for r in rows], np.float32) for m in ("content", "style")}


def agreement(want: dict[str, np.ndarray], got: dict[str, np.ndarray], k: int = 10) -> dict:
    from simsearch.backbones.runtime import cosines
    from simsearch.bench.metrics import top_candidates

    out = {}
    for mode in ("content", "style"):
        a, b = (top_candidates(v @ v.T, k) for v in (want[mode], got[mode]))  # each image's k nearest others
        out[mode] = {"min_cosine": round(float(cosines(want[mode], got[mode]).min()), 6),
                     "same_top1": round(float((a[:, 0] == b[:, 0]).mean()), 4),
                     "top10_overlap": round(float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)])), 4)}
    return out


def int8_candidate(paths: list[str], db: Path, work: Path) -> dict[str, np.ndarray]:
    """The vectors of `paths` from the library's float32 graph with its MatMul weights quantised to
    int8 (onnxruntime.quantization.quantize_dynamic, what the issue measured), on the library's pixels."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from simsearch import Index
    from simsearch.backbones import runtime
    from simsearch.images import open_image

    idx = Index(db, runtime="onnx")
    fp32 = idx.embedder.export_graph()
    source = runtime.graph_path(idx.conf.to_dict(), fp32.fingerprint)
    quantised = work / "int8.onnx"
    quantize_dynamic(str(source), str(quantised), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    graph = runtime.OnnxGraph(quantised, fp32.size, fp32.fingerprint, [], 0.0, "onnx-int8")
    out = {"content": [], "style": []}
    for i in range(0, len(paths), 16):
        pixels = np.stack([idx.embedder.preprocess(open_image(Path(p), max_side=fp32.size).image) for p in paths[i:i + 16]])
        got = graph.run(pixels)
        for m in out:
            out[m].append(got[m])
    return {m: np.concatenate(v) for m, v in out.items()}


# -- Stable Diffusion ------------------------------------------------------------------------------
def sd_bf16(width: float, side: int, n: int) -> dict:
    """torch-bf16 against torch on the random SD UNet: seconds per image (best of 2) and cosines."""
    from PIL import Image

    from common import random_sd
    from simsearch.backbones import runtime
    from simsearch.descriptors.head import DescriptorHead
    from simsearch.embedder import DescriptorConfig

    bb, _ = random_sd(width)
    conf = DescriptorConfig.for_model("sd15")  # SD 1.5's defaults, on the random SD 1.x-shaped UNet
    wanted = {"content": (conf.content_layer, "features"), "dense": (conf.dense_layer, "source"),
              "style0": (conf.style_layer, "features")}
    head = DescriptorHead(bb, wanted, conf.content_pooling, conf.style_pooling).eval()
    photos = sorted(EXAMPLES.glob("*.jpg"))[:n]
    pixels = np.stack([bb.preprocess(Image.open(p).convert("RGB"), side).numpy() for p in photos])
    out, seconds = {}, {}
    for name in ("torch", "torch-bf16"):
        runner = runtime.TorchRunner(head, bf16=name == "torch-bf16")
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            out[name] = runner.run(pixels)
            best = min(best, time.perf_counter() - t)
        seconds[name] = best / n
    cos = {f: round(float(runtime.cosines(out["torch"][f], out["torch-bf16"][f]).min()), 6) for f in out["torch"]}
    return {"width": width, "side": side, "images": n, "s_per_image": seconds,
            "speedup": seconds["torch"] / seconds["torch-bf16"], "min_cosine": cos, "load": round(loadavg(), 2)}


# -- cold query ------------------------------------------------------------------------------------
def best_of(cmd: list[str], repeats: int) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        best = min(best, time.perf_counter() - t)
    return best


def cold_query(db: Path, query: Path, repeats: int) -> dict:
    cli = [sys.executable, "-c", "from simsearch.cli import main; main()"]
    args = ["query", str(query), "--db", str(db), "-k", "5", "--json"]
    probe = ("import sys; from simsearch.cli import main\n"
             f"sys.argv = ['simsearch', *{args!r}]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print({m: m in sys.modules for m in ('torch', 'transformers', 'onnxruntime')})")
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    out = {"import_torch_s": best_of([sys.executable, "-c", "import torch"], repeats),
           "query_s": best_of([*cli, *args], repeats),
           "query_runtime_torch_s": best_of([*cli, *args, "--runtime", "torch"], repeats),
           "loaded": loaded}
    for module in ("onnxruntime", "lance", "faiss"):
        out[f"import_{module}_s"] = best_of([sys.executable, "-c", f"import {module}"], repeats)
    out["ratio_to_import_torch"] = out["query_s"] / out["import_torch_s"]
    return out


# -- report ----------------------------------------------------------------------------------------
def render(res: dict) -> str:
    from simsearch.backbones.runtime import machine

    m = res["machine"]
    lines = [
        "# Inference runtimes: `index` end to end and a cold query", "",
        f"Run {res['when']}: `{res['command']}`", "",
        f"Machine: {machine_line(m)}. CPU flags that matter: {', '.join(machine()['flags']) or 'none of them'}.", "",
        f"Data: {res['data']}; batch {res['batch_size']}; model {res['model']}.", "",
        f"`auto` on this machine: **{res['auto']['choice']}** ({res['auto']['reason']}; "
        f"img/s {res['auto']['img_per_s']}).", "",
        "## index end to end (one fresh process and database per runtime)", "",
        "| runtime | ran | img/s | x eager torch | forward share | setup s | peak RSS MiB"
        f"{'' if res['own_process'] else ' (one process: cumulative)'} | load before/after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["index"]:
        lines.append(f"| {r['runtime']} | {r['ran']} | {r['img_per_s']:.1f} | {r['ratio']:.2f} | {r['forward_share']:.0%} | "
                     f"{r['setup_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['load'][0]} / {r['load'][1]} |")
    lines += ["", f"Eager torch ran first and last ({', '.join(f'{v:.1f}' for v in res['torch_runs'])} img/s); "
              "ratios are to their mean"
              f"{'; the others ran forward, then backward.' if res['rounds'] == 2 else '.'}", "",
              "| runtime | img/s, each run | x eager torch (mean of its runs) |", "|---|---|---|"]
    lines += [f"| {name} | {', '.join(f'{v:.1f}' for v in r['img_per_s'])} | **{r['ratio']:.2f}** |" for name, r in res["summary"].items()]
    lines += ["",
              "## Rankings against eager torch's stored vectors", "",
              "| runtime | content: min cosine | same nearest image | top-10 overlap | style: min cosine | same nearest image | top-10 overlap |",
              "|---|---|---|---|---|---|---|"]
    for name, a in res["rankings"].items():
        c, s = a["content"], a["style"]
        lines.append(f"| {name} | {c['min_cosine']} | {c['same_top1']:.2%} | {c['top10_overlap']:.2%} | "
                     f"{s['min_cosine']} | {s['same_top1']:.2%} | {s['top10_overlap']:.2%} |")
    sd = res["sd"]
    lines += ["", f"## Stable Diffusion UNet in bf16 (random SD 1.x, channel width x{sd['width']}, {sd['side']} px, "
              f"{sd['images']} photos, load {sd['load']})", "",
              f"- float32 {sd['s_per_image']['torch']:.2f} s/image, bf16 {sd['s_per_image']['torch-bf16']:.2f} s/image: "
              f"**{sd['speedup']:.2f}x**; lowest cosine of the stored vectors to float32: {sd['min_cosine']}"]
    q = res["cold_query"]
    lines += ["", "## Cold `simsearch query` (fresh process, best of "
              f"{res['cold_repeats']})", "",
              f"- `simsearch query`: {q['query_s']:.2f} s = **{q['ratio_to_import_torch']:.2f}x** `import torch` "
              f"({q['import_torch_s']:.2f} s); modules loaded: {q['loaded']}",
              f"- the same query with `--runtime torch`: {q['query_runtime_torch_s']:.2f} s",
              f"- `import onnxruntime` {q['import_onnxruntime_s']:.2f} s, `import lance` {q['import_lance_s']:.2f} s, "
              f"`import faiss` {q['import_faiss_s']:.2f} s (each a fresh `python -c`, interpreter start included)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_index"]:
        folder, db, runtime, model, batch = argv[1:6]
        print(json.dumps(index_run(Path(folder), Path(db), runtime, model or None, int(batch))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=520)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runtimes", default="torch,torch-bf16,onnx,auto")
    ap.add_argument("--rounds", type=int, choices=(1, 2), default=2,
                    help="2: the runtimes other than torch run again in reverse order (ABBA)")
    ap.add_argument("--cold-repeats", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/simsearch-bench-runtime"))
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--subprocess", action=argparse.BooleanOptionalAction, default=True,
                    help="each runtime's index run in its own process (its own peak RSS)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="score the onnx-int8 candidate")
    ap.add_argument("--sd-width", type=float, default=1.0, help="channel width of the random SD (1 = SD 1.x)")
    ap.add_argument("--sd-side", type=int, default=512)
    ap.add_argument("--sd-images", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="16 example JPEGs, in this process, one cold run")
    args = parse_args(ap, argv, QUICK)
    from common import setup_logging

    from simsearch.backbones import runtime

    setup_logging()
    args.work.mkdir(parents=True, exist_ok=True)
    found = None if args.quick else real_jpegs(args.images)
    paths, source = found or example_jpegs(args.images, args.work)
    folder = image_folder(paths, args.work)
    auto = runtime.choose()
    run = index_in_child if args.subprocess else index_run
    names = args.runtimes.split(",")
    others = [n for n in names if n != "torch"]
    # the others forward, then backward: a machine whose speed drifts during the run moves each
    # runtime's mean as much as eager torch's (first and last)
    order = ["torch", *others, *(others[::-1] if args.rounds == 2 else []), "torch"]
    rows, dbs = [], {}
    for i, name in enumerate(order):
        log.info("index %d images with runtime %s", len(paths), name)
        db = args.work / f"db-{name}-{i}"
        rows.append(run(folder, db, name, args.model, args.batch_size))
        dbs.setdefault(name, db)
    torch_runs = [r["img_per_s"] for r in rows if r["runtime"] == "torch"]
    for r in rows:
        r["ratio"] = r["img_per_s"] / np.mean(torch_runs)
    summary = {name: {"img_per_s": [r["img_per_s"] for r in rows if r["runtime"] == name]} for name in ["torch", *others]}
    for v in summary.values():
        v["ratio"] = float(np.mean(v["img_per_s"]) / np.mean(torch_runs))
    keys, eager = stored(dbs["torch"])
    rankings = {}
    for name in names:
        if name != "torch":
            got_keys, got = stored(dbs[name])
            assert got_keys == keys, f"{name} stored other images"
            rankings[name] = agreement(eager, got)
    if args.int8:
        log.info("onnx-int8 candidate")
        rankings["onnx-int8 (not offered)"] = agreement(eager, int8_candidate(keys, dbs["onnx"], args.work))
    log.info("Stable Diffusion in bf16")
    sd = sd_bf16(args.sd_width, args.sd_side, args.sd_images)
    log.info("cold queries")
    query = sorted(EXAMPLES.glob("*.jpg"))[0]
    res = {"when": now(), "command": command_line(), "machine": machine_info(), "runtime_machine": runtime.machine(),
           "auto": auto, "data": source, "images": len(paths), "batch_size": args.batch_size, "model": args.model or "embedded",
           "sd": sd, "index": rows, "summary": summary, "rounds": args.rounds, "own_process": args.subprocess,
           "torch_runs": torch_runs, "rankings": rankings,
           "cold_query": cold_query(dbs["torch"], query, args.cold_repeats), "cold_repeats": args.cold_repeats}
    out_dir = {"out_dir": args.out_dir} if args.out_dir else {}
    write_results("runtime", res, render(res), **out_dir)


if __name__ == "__main__":
    main()
