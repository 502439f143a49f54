"""Throughput of `simsearch.scoring.score` with the embedded model, and where the time goes.

    python benchmarks/scoring.py [--refs 20] [--per-ref 10] [--side 512] [--work DIR] [--repeats 1]

Data (deterministic, under --work, default /tmp/simsearch-scoring): 20 reference photos (the
scikit-image sample photos shipped in its wheel, a test dependency), and per reference 10 "generated"
images `<stem>_<k>.png` (512x512 PNG): random crops, flips, colour jitter, blends with another
reference. Two pairings are timed, each from a cold start of the descriptors (new temporary
database, model loaded inside the call) and again warm (same FeatureSet, descriptors computed):

- by name:   200 generated images against their 20 references  -> 200 pairs
- all pairs: every generated image against every reference     -> 4000 pairs

Every metric (cosine, style, aas). Time is split into: model load, model forward
(IndexReport.embedded_seconds), the rest of indexing (listing, read, hash, decode, resize,
thumbnail, LanceDB writes), and pair scoring per metric (AAS includes reading the dense tensors and
computing q/k/v). Results: benchmarks/results/scoring.json and scoring.md. The 1-min load average is
recorded next to each timing, because the machine may be shared (2.0 = both cores busy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REF_NAMES = ["astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "color", "grass", "gravel",
             "horse", "hubble_deep_field", "ihc", "logo", "microaneurysms", "moon", "motorcycle_left", "page",
             "retina", "rocket"]


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


from speed import machine_info  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


# -- data ----------------------------------------------------------------------------------------
def skimage_photo(name: str) -> Image.Image:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    path = next(folder.glob(f"{name}.*"))
    return Image.open(path).convert("RGB")


def make_data(work: Path, n_refs: int, per_ref: int, side: int, seed: int = 0) -> tuple[Path, Path]:
    refs_dir, gen_dir = work / "refs", work / "gen"
    names = REF_NAMES[:n_refs]
    if len(list(refs_dir.glob("*.png"))) == n_refs and len(list(gen_dir.glob("*.png"))) == n_refs * per_ref:
        return refs_dir, gen_dir
    refs_dir.mkdir(parents=True, exist_ok=True)
    gen_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = {n: skimage_photo(n) for n in names}
    for n, img in photos.items():
        img.save(refs_dir / f"{n}.png")
    for n, img in photos.items():
        w, h = img.size
        for k in range(per_ref):
            out = img
            f = float(rng.uniform(0.6, 0.95))
            cw, ch = int(w * f), int(h * f)
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out = out.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                out = ImageOps.mirror(out)
            out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.7, 1.3)))
            out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.6, 1.4)))
            out = out.resize((side, side), Image.Resampling.BICUBIC)
            if k % 3 == 2:  # every third: blended with another reference
                other = photos[names[int(rng.integers(len(names)))]].resize((side, side), Image.Resampling.BICUBIC)
                out = Image.blend(other, out, float(rng.uniform(0.5, 0.9)))
            out.save(gen_dir / f"{n}_{k}.png")
    return refs_dir, gen_dir


# -- timing ----------------------------------------------------------------------------------------
class Timers:
    """Wraps load_backbone and FeatureSet.pair_scores to time them inside an unmodified score()."""

    def __init__(self):
        import simsearch.bench.features as features
        import simsearch.embedder as embedder

        self.load_s = 0.0
        self.metric_s: dict[str, float] = {}
        orig_load, orig_pairs = embedder.load_backbone, features.FeatureSet.pair_scores
        timers = self

        def load_backbone(*a, **kw):
            t = time.perf_counter()
            try:
                return orig_load(*a, **kw)
            finally:
                timers.load_s += time.perf_counter() - t

        def pair_scores(fs, metric, i, j, *a, **kw):
            t = time.perf_counter()
            try:
                return orig_pairs(fs, metric, i, j, *a, **kw)
            finally:
                timers.metric_s[metric] = timers.metric_s.get(metric, 0.0) + time.perf_counter() - t

        embedder.load_backbone = load_backbone
        features.FeatureSet.pair_scores = pair_scores

    def reset(self):
        self.load_s, self.metric_s = 0.0, {}


def run_case(name: str, refs: Path, gen: Path, all_pairs: bool, timers: Timers, model: str) -> dict:
    import torch

    from simsearch.scoring import score

    timers.reset()
    la0 = loadavg()
    t, c = time.perf_counter(), time.process_time()
    report, fs = score(refs, gen, all_pairs=all_pairs, model=model)
    cold, cold_cpu = time.perf_counter() - t, time.process_time() - c
    la1 = loadavg()
    r = fs.report
    n_pairs, n_images = len(report.pairs), len(fs.paths)
    load_s = timers.load_s
    forward = r.embedded_seconds
    index_other = r.seconds - forward - load_s
    metric_s = dict(timers.metric_s)
    scoring_s = sum(metric_s.values())
    other = cold - r.seconds - scoring_s
    cold_res = {
        "seconds": cold, "pairs_per_s": n_pairs / cold, "images_per_s": n_images / cold,
        "cpu_seconds": cold_cpu, "pairs_per_cpu_s": n_pairs / cold_cpu,
        "model_load_s": load_s, "forward_s": forward, "index_other_s": index_other,
        "pair_scoring_s": metric_s, "rest_s": other,
        "share": {"forward": forward / cold, "model_load": load_s / cold, "index_other": index_other / cold,
                  **{f"score_{m}": s / cold for m, s in metric_s.items()}, "rest": other / cold},
        "load_before": la0, "load_after": la1,
    }
    # warm: descriptors already computed (same FeatureSet; AAS q/k/v are cached on it after the first call)
    timers.reset()
    la0 = loadavg()
    t = time.perf_counter()
    report2, _ = score(refs, gen, all_pairs=all_pairs, features=fs)
    warm = time.perf_counter() - t
    warm_res = {"seconds": warm, "pairs_per_s": n_pairs / warm, "pair_scoring_s": dict(timers.metric_s),
                "load_before": la0, "load_after": loadavg()}
    per_metric = {m: {"seconds": sec, "pairs_per_s": n_pairs / sec if sec else float("inf")}
                  for m, sec in warm_res["pair_scoring_s"].items()}
    same = all(a == b for a, b in zip(report.pairs, report2.pairs))
    fs.close()
    print(f"{name}: {n_pairs} pairs, {n_images} images: cold {cold:.1f} s ({n_pairs / cold:.1f} pairs/s), "
          f"forward {forward:.1f} s ({100 * forward / cold:.0f} %), warm {warm:.2f} s", flush=True)
    return {"pairs": n_pairs, "images": n_images, "unmatched": len(report.unmatched), "cold": cold_res,
            "warm": warm_res, "warm_per_metric": per_metric, "deterministic_rerun": same,
            "overall": report.overall, "torch_threads": torch.get_num_threads()}


def render(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# `simsearch score` throughput",
        "",
        f"Measured {res['date']} on {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB, "
        f"{'GPU' if m['gpu'] else 'no GPU'}; torch {m['torch']} with {m['torch_threads']} threads; "
        f"model `{res['model']}` (weights {res['weights']}) at {res['image_size']} px. The machine may be "
        "shared: the 1-min load average is given with each timing (2.0 = both cores busy).",
        "",
        f"Data: {res['data']['refs']} reference photos (scikit-image samples) and {res['data']['generated']} "
        f"generated images ({res['data']['side']}x{res['data']['side']} PNG: crops, flips, colour jitter, "
        "blends), named `<ref>_<k>.png`. Re-run: `python benchmarks/scoring.py`.",
        "",
        f"One-time process cost before the timings (imports, first model construction, one pair): "
        f"{res['first_call_warmup_s']:.1f} s; a CLI run pays it on top of the numbers below.",
        "",
        "Cold = `simsearch.scoring.score(...)` from nothing: new temporary database, model loaded, every "
        "image embedded once, then every metric (cosine, style, AAS) on every pair. Warm = the same call "
        "with the FeatureSet of the cold call (descriptors already computed). CPU s = CPU time of the "
        "process during the cold call (both cores; less sensitive than wall time to other jobs on the machine).",
        "",
        "| pairing | pairs | images | cold s | cold pairs/s | cold CPU s (pairs per CPU s) | warm s | warm pairs/s | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in res["cases"].items():
        lines.append(f"| {name} | {c['pairs']} | {c['images']} | {c['cold']['seconds']:.1f} | "
                     f"**{c['cold']['pairs_per_s']:.1f}** | {c['cold']['cpu_seconds']:.0f} ({c['cold']['pairs_per_cpu_s']:.2f}) | "
                     f"{c['warm']['seconds']:.2f} | "
                     f"{c['warm']['pairs_per_s']:.0f} | {c['cold']['load_before']:.1f}→{c['cold']['load_after']:.1f} |")
    lines += ["", "With both cores to itself the cold call could not go faster than its CPU time / 2: "
              + "; ".join(f"{n} at most {2 * c['cold']['pairs_per_cpu_s']:.1f} pairs/s" for n, c in res["cases"].items())
              + " (an upper bound; the wall-time figures above are what was measured on the shared machine)."]
    lines += ["", "Where the cold time goes (share of the wall time of the cold call):", "",
              "| pairing | model forward | model load | rest of indexing (read, decode, resize, thumbnails, LanceDB) "
              "| cosine | style | AAS (dense read, q/k/v, attention) | other |",
              "|---|---|---|---|---|---|---|---|"]
    for name, c in res["cases"].items():
        cc = c["cold"]
        sh = cc["share"]

        def cell(key, secs):
            return f"{100 * sh[key]:.1f} % ({secs:.1f} s)"

        lines.append(f"| {name} | **{cell('forward', cc['forward_s'])}** | {cell('model_load', cc['model_load_s'])} | "
                     f"{cell('index_other', cc['index_other_s'])} | "
                     f"{cell('score_cosine', cc['pair_scoring_s']['cosine'])} | "
                     f"{cell('score_style', cc['pair_scoring_s']['style'])} | "
                     f"{cell('score_aas', cc['pair_scoring_s']['aas'])} | {cell('rest', cc['rest_s'])} |")
    lines += ["", "Warm, per metric (pairs/s inside the warm call; AAS q/k/v are already cached on the FeatureSet):", "", "| pairing | cosine | style | AAS |", "|---|---|---|---|"]
    for name, c in res["cases"].items():
        pm = c["warm_per_metric"]
        lines.append(f"| {name} | {pm['cosine']['pairs_per_s']:.0f} | {pm['style']['pairs_per_s']:.0f} | "
                     f"{pm['aas']['pairs_per_s']:.1f} |")
    lines += ["", "Reading: the model forward is paid once per image, so its share falls as pairs per image "
              "grow; cosine and style are one dot product per pair and cost nothing next to it; AAS runs "
              "three attention passes of the dense layer per pair (A's queries on B, B's queries on A, "
              "and B's own self-attention) and dominates as soon as there are many more pairs than "
              "images. Re-running on the same FeatureSet gives bit-identical scores: "
              + ", ".join(f"{n}: {c['deterministic_rerun']}" for n, c in res["cases"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=int, default=20)
    ap.add_argument("--per-ref", type=int, default=10)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SIMSEARCH_SCORING_WORK", "/tmp/simsearch-scoring")))
    ap.add_argument("--only", choices=["by-name", "all-pairs"], default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from simsearch.backbones import DEFAULT_MODEL
    from simsearch.embedder import DescriptorConfig

    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = args.model or DEFAULT_MODEL
    refs, gen = make_data(args.work, args.refs, args.per_ref, args.side)
    timers = Timers()
    # one-time process costs (imports, first model construction) are paid here, outside the timings
    from simsearch.scoring import score

    t = time.perf_counter()
    _, fs = score(next(refs.glob("*.png")), next(gen.glob("*.png")), model=model)
    fs.close()
    warmup_s = time.perf_counter() - t
    cases = {}
    for name, all_pairs in (("by-name", False), ("all-pairs", True)):
        if args.only and args.only != name:
            continue
        cases[name] = run_case(name, refs, gen, all_pairs, timers, model)
    from simsearch.backbones import load_backbone

    res = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine_info(),
           "model": model, "weights": load_backbone(model, "cpu").fingerprint,
           "image_size": DescriptorConfig().image_size,
           "data": {"refs": args.refs, "generated": args.refs * args.per_ref, "side": args.side,
                    "work": str(args.work)},
           "first_call_warmup_s": warmup_s, "cases": cases}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scoring.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "scoring.md").write_text(render(res))
    print(f"wrote {RESULTS / 'scoring.json'} and scoring.md")


if __name__ == "__main__":
    sys.exit(main())
