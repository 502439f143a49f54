"""Co-segmentation quality and speed on composites with exact ground truth.

    python benchmarks/coseg.py [--per-category 6] [--image-size 392] [--categories food/fruit ...]
    python benchmarks/coseg.py --quick --model DIR --stamps DIR --categories C   # the smoke test's seconds-long run

Sets: for each of 10 tuxpaint categories of cut-out photos, n stamps pasted on crops of different
example photos (simsearch.bench.fixtures.composite_set, seeded per category; the Debian package is
unpacked under the data root: `make test-deps` or `python benchmarks/data.py tuxpaint-categories` fetch it;
--stamps names another folder of <category>/<cut-out>.png).
Method: simsearch.coseg with its defaults on the embedded DINOv2-S/14 (CPU). Score: Jaccard of each
mask against the stamp's alpha mask (>= 128), averaged per category, then over categories.
Baseline: the same saliency maps, upsampled the same way, thresholded: at the method's 0.065, and at
the one threshold best over the whole benchmark (an oracle: it looks at the ground truth).
Results: benchmarks/results/coseg.json and coseg.md (a run with other settings writes coseg-<tag>.*).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

import common
from debian_data import stamps_dir
from simsearch.bench.fixtures import composite_set

THRESHOLDS = np.round(np.arange(0.02, 0.62, 0.02), 2)
# Folders of cut-out photos (drawings live in `cartoon/` subfolders, which are not read).
CATEGORIES = ["animals/birds", "animals/fish", "animals/insects", "animals/mammals", "animals/mammals/bovines",
              "food/fruit", "food/vegetables", "household/tools", "plants/flowers", "space/planets"]


def run(stamps: Path, categories: list[str], n: int, conf, seed: int, model: str) -> dict:
    from simsearch import coseg as C
    from simsearch.backbones import load_backbone

    backbone = load_backbone(model, "cpu")
    rows, baseline = {}, {}
    for i, category in enumerate(categories):
        images, truths = composite_set(stamps, category, n, common.EXAMPLES, seed=seed + i)
        load = common.loadavg()
        t0 = time.perf_counter()
        feats = [C.image_features(backbone, img, conf) for img in images]
        t1 = time.perf_counter()
        result = C.cosegment_features(feats, [t.shape for t in truths], conf)
        t2 = time.perf_counter()
        scores = [C.jaccard(m, t) for m, t in zip(result.masks, truths)]
        baseline[category] = [saliency_only(result, truths, th) for th in THRESHOLDS]
        rows[category] = {"images": len(images), "jaccard": float(np.mean(scores)), "per_image": scores,
                          "saliency_fixed": saliency_only(result, truths, conf.saliency_threshold),
                          "k": result.clusters, "foreground_clusters": len(result.foreground),
                          "features_s_per_image": (t1 - t0) / len(images), "clustering_s": t2 - t1,
                          "load_before": load, "load_after": common.loadavg()}
        print(f"{category}: J {rows[category]['jaccard']:.3f} (k {result.clusters}), "
              f"{(t1 - t0) / len(images):.2f} s/image + {t2 - t1:.2f} s clustering", file=sys.stderr, flush=True)
    overall = np.mean([baseline[c] for c in categories], axis=0)
    best = int(np.argmax(overall))
    for c in categories:
        rows[c]["saliency_oracle"] = float(baseline[c][best])
    keys = ("jaccard", "saliency_fixed", "saliency_oracle", "features_s_per_image", "clustering_s")
    mean = {k: float(np.mean([rows[c][k] for c in categories])) for k in keys}
    return {"categories": rows, "config": asdict(conf), "per_category": n, "seed": seed, "model": model,
            "oracle_threshold": float(THRESHOLDS[best]), "mean": mean,
            "machine": common.machine_info(), "date": common.now()}


def saliency_only(result, truths, threshold: float) -> float:
    """Mean Jaccard of the baseline: each image's saliency map, upsampled like the masks, above `threshold`."""
    from simsearch.coseg import jaccard, saliency_mask

    return float(np.mean([jaccard(saliency_mask(s, t.shape, threshold), t) for s, t in zip(result.saliency, truths)]))


def render(res: dict, command: str) -> str:
    m, mach = res["mean"], res["machine"]
    conf = res["config"]
    layer = "the last (11)" if conf["layer"] is None else conf["layer"]
    lines = [
        "# Co-segmentation on tuxpaint stamps pasted on photos", "",
        f"Command: `{command}`", "",
        f"Machine: {common.machine_line(mach)}; no GPU used; {res['date']} (shared machine: 1-min load average "
        f"per category in the JSON).", "",
        f"Model: {res['model']}, key facet of block {layer}, {conf['image_size']} px, "
        f"stride {conf['stride'] or 7}; elbow {conf['elbow']}, saliency threshold {conf['saliency_threshold']}, "
        f"votes {conf['votes']}. {res['per_category']} composites per category (seed {res['seed']}): each a stamp "
        f"of the category pasted on a crop of a different examples/images photo. Jaccard of the mask against the "
        f"stamp's alpha mask, mean per category.",
        f"Saliency-only baseline: the same CLS-attention saliency maps, upsampled like the masks, above "
        f"{conf['saliency_threshold']} (the method's threshold), or above {res['oracle_threshold']} (the single best "
        f"threshold over the whole benchmark, chosen on the ground truth: an upper bound for any fixed threshold).",
        "",
        "| category | images | co-segmentation J | saliency > fixed | saliency > oracle | k | s / image |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c, r in res["categories"].items():
        lines.append(f"| {c} | {r['images']} | {r['jaccard']:.3f} | {r['saliency_fixed']:.3f} | "
                     f"{r['saliency_oracle']:.3f} | {r['k']} | {r['features_s_per_image']:.2f} |")
    lines.append(f"| **mean** | | **{m['jaccard']:.3f}** | {m['saliency_fixed']:.3f} | {m['saliency_oracle']:.3f} | | "
                 f"{m['features_s_per_image']:.2f} |")
    lines += ["", f"Time per image: {m['features_s_per_image']:.2f} s of feature extraction (one forward at "
              f"{conf['image_size']} px, stride {conf['stride'] or 7}) plus {m['clustering_s']:.2f} s of clustering "
              f"per set, on CPU."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from simsearch.backbones import DEFAULT_MODEL
    from simsearch.coseg import CosegConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--categories", nargs="*", default=CATEGORIES)
    ap.add_argument("--per-category", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=CosegConfig.image_size)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--stamps", type=Path, default=None, help="folder of <category>/<cut-out>.png (default: the tuxpaint stamps)")
    ap.add_argument("--tag", default="", help="results go to coseg-TAG.* instead of coseg.*")
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS)
    ap.add_argument("--quick", action="store_true", help="seconds, not minutes: 3 images a category at 112 px")
    args = common.parse_args(ap, argv, quick=dict(per_category=3, image_size=112))
    stamps = args.stamps or stamps_dir()
    if stamps is None:
        sys.exit("tuxpaint stamps missing: run `make test-deps` or `python benchmarks/data.py tuxpaint-categories` first")
    conf = replace(CosegConfig(), image_size=args.image_size, layer=args.layer)
    res = run(stamps, args.categories, args.per_category, conf, args.seed, args.model)
    common.write_results(f"coseg-{args.tag}" if args.tag else "coseg", res, render(res, common.command_line()), args.out_dir)


if __name__ == "__main__":
    main()
