"""Throughput of `simsearch.scoring.score` with the embedded model, and where the time goes.

    python benchmarks/scoring.py [--refs 20] [--per-ref 10] [--side 512] [--work DIR] [--model M] [--out-dir DIR]
    python benchmarks/scoring.py --quick --model DIR --out-dir DIR      # seconds: checks that it runs

Data (deterministic, under --work, default /tmp/simsearch-scoring): 20 reference photos (the
scikit-image sample photos shipped in its wheel, a test dependency), and per reference 10 "generated"
images `<stem>_<k>.png` (512x512 PNG): random crops, flips, colour jitter, blends with another
reference. Two pairings are timed, each from a cold start of the descriptors (new temporary
database, model loaded) and again warm (same FeatureSet, descriptors computed):

- by name:   200 generated images against their 20 references  -> 200 pairs
- all pairs: every generated image against every reference     -> 4000 pairs

Every metric (cosine, style, aas). Time is split into: model load (an Embedder built in the same
process, timed on its own), model forward (IndexReport.embedded_seconds), the rest of indexing
(listing, read, hash, decode, resize, thumbnail, LanceDB writes), and pair scoring per metric (AAS
includes reading the dense tensors and computing q/k/v). Results: <out-dir>/scoring.json and
scoring.md (default benchmarks/results). The 1-min load average is recorded next to each timing,
because the machine may be shared (2.0 = both cores busy).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from common import (RESULTS, command_line, log, machine_info, machine_line, measure, now, parse_args, setup_logging,
                    write_results)

from simsearch.backbones import DEFAULT_MODEL
from simsearch.bench.features import METRICS, FeatureSet
from simsearch.embedder import Embedder
from simsearch.scoring import make_pairs, score

REF_NAMES = ["astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "color", "grass", "gravel",
             "horse", "hubble_deep_field", "ihc", "logo", "microaneurysms", "moon", "motorcycle_left", "page",
             "retina", "rocket"]
QUICK = {"refs": 3, "per_ref": 2, "side": 96}


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


# -- timing ------------------------------------------------------------------------------------------
def run_case(name: str, refs: Path, gen: Path, all_pairs: bool, model: str, model_load_s: float) -> dict:
    """Cold: what score() does from nothing, step by step so that each step is timed (FeatureSet: new
    temporary database, model loaded, every image embedded; then each metric's pair scores). Warm:
    score() itself on that FeatureSet, and each metric again."""
    import torch

    pairs, _ = make_pairs(refs, gen, all_pairs=all_pairs)
    with measure() as cold:
        fs = FeatureSet([p for pair in pairs for p in pair], model=model)
        kept = [(r, g) for r, g in pairs if r in fs.pos and g in fs.pos]
        i, j = (np.array([fs.pos[p] for p in side]) for side in zip(*kept))
        cold_scores, metric_s = {}, {}
        for m in METRICS:
            with measure() as t:
                cold_scores[m] = fs.pair_scores(m, i, j)
            metric_s[m] = t.seconds
    r = fs.report
    n_pairs, n_images = len(kept), len(fs.paths)
    forward = r.embedded_seconds
    index_other = r.seconds - forward - model_load_s
    rest = cold.seconds - r.seconds - sum(metric_s.values())
    cold_res = {
        "seconds": cold.seconds, "pairs_per_s": n_pairs / cold.seconds, "images_per_s": n_images / cold.seconds,
        "cpu_seconds": cold.cpu_seconds, "pairs_per_cpu_s": n_pairs / cold.cpu_seconds,
        "model_load_s": model_load_s, "forward_s": forward, "index_other_s": index_other,
        "pair_scoring_s": metric_s, "rest_s": rest,
        "share": {"forward": forward / cold.seconds, "model_load": model_load_s / cold.seconds,
                  "index_other": index_other / cold.seconds,
                  **{f"score_{m}": sec / cold.seconds for m, sec in metric_s.items()}, "rest": rest / cold.seconds},
        "load_before": cold.load_before, "load_after": cold.load_after,
    }
    # warm: descriptors already computed (same FeatureSet; AAS q/k/v are cached on it after the first call)
    with measure() as warm:
        report, _ = score(refs, gen, all_pairs=all_pairs, features=fs)
    warm_metric_s = {}
    for m in METRICS:
        with measure() as t:
            fs.pair_scores(m, i, j)
        warm_metric_s[m] = t.seconds
    warm_res = {"seconds": warm.seconds, "pairs_per_s": n_pairs / warm.seconds, "pair_scoring_s": warm_metric_s,
                "load_before": warm.load_before, "load_after": warm.load_after}
    per_metric = {m: {"seconds": sec, "pairs_per_s": n_pairs / sec if sec else float("inf")}
                  for m, sec in warm_metric_s.items()}
    same = all(np.array_equal([p[m] for p in report.pairs], cold_scores[m]) for m in METRICS)
    fs.close()
    log.info("%s: %d pairs, %d images: cold %.1f s (%.1f pairs/s), forward %.1f s (%.0f %%), warm %.2f s",
             name, n_pairs, n_images, cold.seconds, n_pairs / cold.seconds, forward, 100 * forward / cold.seconds,
             warm.seconds)
    return {"pairs": n_pairs, "images": n_images, "unmatched": len(report.unmatched), "cold": cold_res,
            "warm": warm_res, "warm_per_metric": per_metric, "deterministic_rerun": same,
            "overall": report.overall, "torch_threads": torch.get_num_threads()}


def render(res: dict) -> str:
    lines = [
        "# `simsearch score` throughput",
        "",
        f"Measured {res['date']} on {machine_line(res['machine'])}; "
        f"model `{res['model']}` (weights {res['weights']}) at {res['image_size']} px. The machine may be "
        "shared: the 1-min load average is given with each timing (2.0 = both cores busy).",
        "",
        f"Data: {res['data']['refs']} reference photos (scikit-image samples) and {res['data']['generated']} "
        f"generated images ({res['data']['side']}x{res['data']['side']} PNG: crops, flips, colour jitter, "
        f"blends), named `<ref>_<k>.png`. Made by `{res['command']}`.",
        "",
        f"One-time process cost before the timings (imports, first model construction, one pair): "
        f"{res['first_call_warmup_s']:.1f} s; a CLI run pays it on top of the numbers below.",
        "",
        "Cold = the work of `simsearch.scoring.score(...)` from nothing, done step by step to time each step: "
        "a FeatureSet (new temporary database, model loaded, every image embedded once), then every metric "
        "(cosine, style, AAS) on every pair. Warm = `score(..., features=fs)` with the FeatureSet of the cold "
        "run (descriptors already computed). Model load = an Embedder of the same model built on its own in "
        "the same process. CPU s = CPU time of the process during the cold run (both cores; less sensitive "
        "than wall time to other jobs on the machine).",
        "",
        "| pairing | pairs | images | cold s | cold pairs/s | cold CPU s (pairs per CPU s) | warm s | warm pairs/s | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in res["cases"].items():
        lines.append(f"| {name} | {c['pairs']} | {c['images']} | {c['cold']['seconds']:.1f} | "
                     f"**{c['cold']['pairs_per_s']:.1f}** | {c['cold']['cpu_seconds']:.0f} ({c['cold']['pairs_per_cpu_s']:.2f}) | "
                     f"{c['warm']['seconds']:.2f} | "
                     f"{c['warm']['pairs_per_s']:.0f} | {c['cold']['load_before']:.1f}→{c['cold']['load_after']:.1f} |")
    lines += ["", "With both cores to itself the cold run could not go faster than its CPU time / 2: "
              + "; ".join(f"{n} at most {2 * c['cold']['pairs_per_cpu_s']:.1f} pairs/s" for n, c in res["cases"].items())
              + " (an upper bound; the wall-time figures above are what was measured on the shared machine)."]
    lines += ["", "Where the cold time goes (share of the wall time of the cold run):", "",
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
    lines += ["", "Warm, per metric (pairs/s of `FeatureSet.pair_scores` after the warm call; AAS q/k/v are already cached on the FeatureSet):", "", "| pairing | cosine | style | AAS |", "|---|---|---|---|"]
    for name, c in res["cases"].items():
        pm = c["warm_per_metric"]
        lines.append(f"| {name} | {pm['cosine']['pairs_per_s']:.0f} | {pm['style']['pairs_per_s']:.0f} | "
                     f"{pm['aas']['pairs_per_s']:.1f} |")
    lines += ["", "Reading: the model forward is paid once per image, so its share falls as pairs per image "
              "grow; cosine and style are one dot product per pair and cost nothing next to it; AAS runs "
              "three attention passes of the dense layer per pair (A's queries on B, B's queries on A, "
              "and B's own self-attention) and dominates as soon as there are many more pairs than "
              "images. The warm call gives bit-identical scores to the cold run: "
              + ", ".join(f"{n}: {c['deterministic_rerun']}" for n, c in res["cases"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=int, default=20)
    ap.add_argument("--per-ref", type=int, default=10)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help=f"a run of seconds: {QUICK}")
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SIMSEARCH_SCORING_WORK", "/tmp/simsearch-scoring")))
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--only", choices=["by-name", "all-pairs"], default=None)
    args = parse_args(ap, argv, QUICK)
    setup_logging()
    model = args.model or DEFAULT_MODEL
    refs, gen = make_data(args.work, args.refs, args.per_ref, args.side)
    # one-time process costs (imports, first model construction) are paid here, outside the timings
    with measure() as warmup:
        _, fs = score(next(refs.glob("*.png")), next(gen.glob("*.png")), model=model)
    conf = fs.index.conf
    fs.close()
    with measure() as load:  # what building the FeatureSet's model costs, now that the files are cached
        weights = Embedder(conf).fingerprint
    cases = {name: run_case(name, refs, gen, all_pairs, model, load.seconds)
             for name, all_pairs in (("by-name", False), ("all-pairs", True)) if args.only in (None, name)}
    res = {"date": now(), "command": command_line(), "machine": machine_info(), "model": model, "weights": weights,
           "image_size": conf.image_size,
           "data": {"refs": args.refs, "generated": args.refs * args.per_ref, "side": args.side, "work": str(args.work)},
           "first_call_warmup_s": warmup.seconds, "cases": cases}
    write_results("scoring", res, render(res), args.out_dir)


if __name__ == "__main__":
    main()
