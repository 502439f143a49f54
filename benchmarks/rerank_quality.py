"""Does second-stage reranking improve retrieval on real grouped data? (issue 3, "Measure")

    python benchmarks/rerank_quality.py [--root DIR] [--per-group 5] [--candidates 50] [--triplets 2000]
                                        [--model M] [--out-dir DIR] [--quick]

For each dataset (ROOT/<group>/<image>, built by benchmarks/data.py), every image is embedded once
with the embedded model (simsearch.bench.features.FeatureSet, the normal indexer into a temp LanceDB).

Leave-one-out retrieval: each image queries all others. The first stage ranks them by cosine of
the dataset's mode vector (content for tuxpaint-categories, style for card-decks). The top
`--candidates` are reranked by every reranker (simsearch.rerank.RERANKERS) from the stored dense
tensors, their scores fused with the first stage as the library does (rerank.fuse); the rest keep
their first-stage order below them (simsearch.bench.metrics.reranked). mAP (over the full list) and
recall@1 come from simsearch.bench.metrics.leave_one_out on that reranked similarity matrix.

Triplet accuracy (card-decks, style groups): sample_triplets(labels, 2000, seed=0) scored by the AAS
matrix (FeatureSet.matrix("aas"), every pair) vs cosine of the style vector (and of the content
vector, for reference).

Writes <out-dir>/rerank_quality.{json,md} (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import (RESULTS, command_line, data_root, loadavg, log, machine_info, machine_line, measure, now,
                    parse_args, read_grouped, setup_logging, write_results)

from simsearch.bench.features import FeatureSet
from simsearch.bench.metrics import leave_one_out, reranked, sample_triplets, top_candidates, triplet_accuracy
from simsearch.rerank import RERANKERS, RerankQuery, fuse, rerank_scores
from simsearch.store import path_key

# dataset -> first-stage vector ("mode"); per-group cap applies to content datasets (None: all)
DATASETS = {"card-decks": "style", "tuxpaint-categories": "content"}
QUICK = {"per_group": 3, "deck_per_group": 3, "candidates": 4, "triplets": 50}


def rerank_eval(fs: FeatureSet, labels: np.ndarray, mode: str, n_cand: int) -> dict:
    vec = fs.vectors[mode]
    first = vec @ vec.T
    n = len(labels)
    bb, layer = fs.index.embedder.backbone, fs.index.conf.dense_layer
    keys = [path_key(p) for p in fs.paths]
    dense = fs.index.dense(keys)
    sizes = np.array([(r["width"], r["height"]) for r in fs.index.store.rows(keys, ["width", "height"])])
    prior = fs.index.positional_prior()
    fused = {m: np.full((n, n), np.nan) for m in RERANKERS}  # second-stage scores of each query's candidates
    t0 = time.perf_counter()
    for i, cands in enumerate(top_candidates(first, n_cand)):
        query = RerankQuery(dense[i], tuple(sizes[i]))
        for m in RERANKERS:
            out = rerank_scores(bb, layer, query, dense[cands], m, sizes[cands], prior=prior)
            fused[m][i, cands] = fuse(first[i, cands].astype(np.float64), out, m)
        if (i + 1) % 25 == 0 or i + 1 == n:
            log.info("  reranked %d/%d queries, %.0f s", i + 1, n, time.perf_counter() - t0)
    rerank_s = time.perf_counter() - t0
    res = {"first stage": leave_one_out(first, labels)}
    for m in RERANKERS:
        res[f"+{m}"] = leave_one_out(reranked(first, fused[m], n_cand), labels)
    return {"results": res, "rerank_s": rerank_s, "rerank_ms_per_query": 1000 * rerank_s / n}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=data_root())
    ap.add_argument("--per-group", type=int, default=5, help="images per group for tuxpaint-categories (first by name)")
    ap.add_argument("--deck-per-group", type=int, default=0, help="images per group for card-decks (0: all 13)")
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--triplets", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help=f"a run of seconds: {QUICK}")
    args = parse_args(ap, argv, QUICK)
    setup_logging()
    record: dict = {"date": now(), "command": command_line(),
                    "machine": machine_info(), "load_start": loadavg(), "candidates": args.candidates, "datasets": {}}
    caps = {"card-decks": args.deck_per_group or None, "tuxpaint-categories": args.per_group or None}
    with measure() as total:
        for name, mode in DATASETS.items():
            paths, labels = read_grouped(args.root / name, caps[name])
            log.info("%s: %d images, %d groups; embedding", name, len(paths), len(set(labels)))
            with measure() as embed:
                fs = FeatureSet(paths, model=args.model, batch_size=args.batch)
            try:
                labels = np.array([g for p, g in zip(paths, labels) if p in fs.pos])
                record.setdefault("config", fs.config)
                log.info("%s: embedded in %.0f s (%d failed); reranking", name, embed.seconds, len(fs.report.failed))
                entry = {"mode": mode, "images": len(fs.paths), "groups": len(set(labels)),
                         "per_group_cap": caps[name], "embed_s": embed.seconds, "failed": [p for p, _ in fs.report.failed]}
                entry.update(rerank_eval(fs, labels, mode, args.candidates))
                if name == "card-decks":
                    trip = sample_triplets(labels, args.triplets, seed=0)
                    with measure() as aas_t:
                        aas = fs.matrix("aas")
                    log.info("%s: AAS matrix %d^2 in %.0f s", name, len(labels), aas_t.seconds)
                    sims = {"aas": aas, "cosine (style vector)": fs.vectors["style"] @ fs.vectors["style"].T,
                            "cosine (content vector)": fs.vectors["content"] @ fs.vectors["content"].T}
                    entry["triplets"] = {"n": args.triplets, "seed": 0, "aas_matrix_s": aas_t.seconds,
                                         "accuracy": {k: triplet_accuracy(s, trip).to_dict() for k, s in sims.items()}}
                record["datasets"][name] = entry
                log.info("%s: %s", name, json.dumps({k: [round(v["mAP"], 4), round(v["recall@1"], 4)]
                                                     for k, v in entry["results"].items()}))
            finally:
                fs.close()
    record["total_s"], record["load_end"] = total.seconds, loadavg()
    write_results("rerank_quality", record, md := markdown(record), args.out_dir)
    print(md)


def markdown(r: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    cfg = r["config"]
    lines = ["# Reranking quality on real grouped data", "",
             f"{r['date']}, model `{cfg['descriptors']['model']}` (weights `{cfg['weights']}`), device {cfg['device']}, "
             f"simsearch {cfg['simsearch']}; {machine_line(r['machine'])}. Total run {r['total_s']:.0f} s; 1-min load "
             f"average {r['load_start']:.1f} at the start, {r['load_end']:.1f} at the end (above the core count "
             "means shared, slower cores).", "",
             f"Made by `{r['command']}` (data from `python benchmarks/data.py`).", "",
             f"Leave-one-out: each image queries all others. First stage = cosine of the dataset's mode vector; "
             f"its top {r['candidates']} candidates are reranked, the rest keep first-stage order. "
             "mAP over the full ranking and recall@1 (R@1), in percent.", "",
             "| dataset | mode | groups | images | first stage mAP / R@1 | +aas mAP / R@1 | +matches mAP / R@1 | +both mAP / R@1 | rerank ms/query |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in r["datasets"].items():
        cells = [f"{pct(e['results'][k]['mAP'])} / {pct(e['results'][k]['recall@1'])}"
                 for k in ("first stage", "+aas", "+matches", "+both")]
        cap = f" (first {e['per_group_cap']}/group)" if e["per_group_cap"] else ""
        lines.append(f"| {name} | {e['mode']} | {e['groups']} | {e['images']}{cap} | " + " | ".join(cells)
                     + f" | {e['rerank_ms_per_query']:.0f} |")
    for name, e in r["datasets"].items():
        if "triplets" not in e:
            continue
        t = e["triplets"]
        lines += ["", f"Triplet accuracy on {name} (style groups): {t['n']} triplets (anchor, same group, other group), "
                  f"`sample_triplets(labels, {t['n']}, seed={t['seed']})`; ties count half; 95% Wilson interval. "
                  f"AAS matrix over all pairs took {t['aas_matrix_s']:.0f} s.", "",
                  "| similarity | accuracy % | 95% CI |", "|---|---|---|"]
        for k, a in t["accuracy"].items():
            lines.append(f"| {k} | {pct(a['value'])} | {pct(a['ci95'][0])}-{pct(a['ci95'][1])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
