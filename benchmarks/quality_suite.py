"""Descriptor defaults chosen across the proxy suite, checked against the previous ones, and the speed of
`bench groups` (issue 12). Results: benchmarks/results/quality_suite.{md,json}, one section per step.

    python benchmarks/data.py suite                  # ROOT/suite/<set> + suite.json (ROOT: $SIMSEARCH_DATA or ~/.cache/simsearch-data)
    python benchmarks/quality_explore.py             # every candidate on every set (section explore-224)
    python benchmarks/quality_explore.py --size 448 --cache-layers 2,3,4,5,6,11,12   # (section explore-448)
    python benchmarks/quality_suite.py compare       # `simsearch bench suite`: previous vs chosen defaults
    python benchmarks/quality_suite.py timing        # `simsearch bench groups` on 800 images, every metric
    python benchmarks/quality_suite.py compact       # the style sets ranked through the compact style index's codes
    python benchmarks/quality_suite.py compare|timing --quick --model DIR --suite DIR   # the smoke test's run

`compare` runs simsearch.bench.suites.evaluate_suite (what `simsearch bench suite` runs) with two
variants: `previous` (the embedded model's defaults before this change, PREVIOUS) and `chosen` (its
defaults now), triplet accuracy with 95% Wilson intervals and mAP with 95% bootstrap intervals over
queries. `timing` builds an 800-image grouped folder (the suite's style sets merged, group =
set/style), runs the real `simsearch bench groups --mode style` on it with a fresh descriptor cache
(embedding + scoring) and again with the cache warm (scoring only), and measures the previous
protocol's cost (AAS for all N^2 pairs) from the per-pair time of a seeded sample of pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import (RESULTS, command_line, data_root, log, machine_info, machine_line, measure, now, parse_args,
                    setup_logging, update_sections)

from simsearch.backbones import DEFAULT_MODEL, descriptor_defaults

# The embedded model's descriptor defaults before issue 12 (chosen on card decks and tuxpaint categories).
PREVIOUS = {"image_size": 224, "content_pooling": "cls", "content_layer": 11, "style_layer": 4,
            "style_pooling": "meanstd", "dense_layer": 9}
QUICK = {"triplets": 50, "images": 12, "sample_pairs": 20}


# -- compare -----------------------------------------------------------------------------------------
def compare(args) -> dict:
    from simsearch.bench.suites import evaluate_suite

    chosen = descriptor_defaults(args.model)
    log.info("previous %s\nchosen %s", PREVIOUS, chosen)
    with measure() as m:
        result = evaluate_suite(args.suite, {"previous": PREVIOUS, "chosen": {}}, model=args.model,
                                triplets=args.triplets, seed=args.seed, cache=args.cache, intervals=True,
                                on_set=lambda v, s: log.info("%s: %s", v, s))
    return {"command": command_line(), "date": now(), "machine": machine_info(), "model": args.model,
            "previous": PREVIOUS, "chosen": chosen, "seconds": round(m.seconds), "load": [m.load_before, m.load_after],
            "suite": result.to_dict()}


# -- compact: the style sets through the compact style index's codes ---------------------------------
def compact(args) -> dict:
    """Each style set ranked as simsearch.compact's index ranks a large table's rows: projected by a
    PCA fitted on the OTHER style sets' vectors (rows outside the fit sample, as most of a large
    table's are), held as 8-bit codes, and (a) the codes alone, no re-scoring: a lower bound; (b) the
    top `compact.rescored(n)` re-scored exactly, as the library searches (at these sizes nearly
    every row). Triplet accuracy (Wilson) and mAP (bootstrap over queries) against the exact style
    vectors, same triplets."""
    import faiss

    from simsearch import compact as compact_index
    from simsearch.bench.features import FeatureSet
    from simsearch.bench.metrics import average_precisions, bootstrap_ci, reranked, sample_triplets, triplet_accuracy
    from simsearch.bench.suites import read_groups, read_suite
    from simsearch.paths import normalize

    sets = {name: info for name, info in read_suite(args.suite).items() if info["mode"] == "style"}
    vectors, labels = {}, {}
    for name, info in sets.items():
        paths, y = read_groups(info["root"])
        fs = FeatureSet(paths, cache=args.cache / "compact" / f"{name}.db", model=args.model)
        group = {normalize(p): g for p, g in zip(paths, y)}
        vectors[name], labels[name] = fs.vectors["style"], np.asarray([group[p] for p in fs.paths])
        fs.close()
    out = {}
    for name, v in vectors.items():
        others = np.concatenate([x for other, x in vectors.items() if other != name])
        proj = compact_index.fit_projection(others, min(compact_index.PROJECT_DIM, len(others)))
        sq = faiss.ScalarQuantizer(len(proj), faiss.ScalarQuantizer.QT_8bit)
        sq.train(np.ascontiguousarray(others @ proj.T))
        codes = sq.decode(sq.compute_codes(np.ascontiguousarray(v @ proj.T)))  # what the IVF lists hold
        exact, coded = v @ v.T, codes @ (v @ proj.T).T  # a query is projected, not coded (FAISS's SQ scoring)
        variants = {"exact": exact, "codes alone": coded,
                    "re-scored (library)": reranked(coded, exact, compact_index.rescored(len(v)))}
        trip = sample_triplets(labels[name], args.triplets, args.seed)
        row = {"images": len(v), "fit_rows": len(others), "dims": len(proj), "rescored": min(compact_index.rescored(len(v)), len(v) - 1)}
        for variant, sim in variants.items():
            ap_ = average_precisions(sim, labels[name])
            row[variant] = {"triplet": triplet_accuracy(sim, trip).to_dict(),
                            "mAP": {"value": float(ap_.mean()), "ci95": list(bootstrap_ci(ap_, seed=args.seed))}}
        out[name] = row
        log.info("%s: %s", name, {k: (round(x["triplet"]["value"], 4), round(x["mAP"]["value"], 4))
                                  for k, x in row.items() if isinstance(x, dict)})
    return {"command": command_line(), "date": now(), "machine": machine_info(), "model": args.model, "sets": out}


def render_compact(c: dict) -> list[str]:
    lines = ["## The style sets through the compact style index", "",
             f"{c['date']}, {machine_line(c['machine'])}; `{c['command']}`. simsearch.compact's projection fitted on the "
             "other style sets' vectors (rows outside the fit sample), 8-bit codes; `codes alone`: ranked by the codes "
             "with no re-scoring (a lower bound); `re-scored`: the top max(256, n/1000) re-scored exactly, as the library "
             "searches. Triplet accuracy % [Wilson 95 %] and mAP % [bootstrap 95 %].", "",
             "| set | images | fit rows, dims | exact: triplet | mAP | codes alone: triplet | mAP | re-scored: triplet | mAP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in c["sets"].items():
        cells = " | ".join(f"{pct(r[v]['triplet'])} | {pct(r[v]['mAP'])}" for v in ("exact", "codes alone", "re-scored (library)"))
        lines.append(f"| {name} | {r['images']} | {r['fit_rows']}, {r['dims']} | {cells} |")
    return lines + [""]


# -- timing ------------------------------------------------------------------------------------------
def timing_folder(suite: Path, out: Path, n: int) -> Path:
    """The style sets of the suite merged into one grouped folder (group = <set>--<group>) and thinned
    evenly to n images (every k-th of the sorted list), as symlinks."""
    from simsearch.bench.suites import read_suite

    if out.is_dir():
        return out
    style_sets = [name for name, info in read_suite(suite).items() if info["mode"] == "style"]
    files = sorted((s, g.name, f) for s in style_sets for g in (suite / s).iterdir() if g.is_dir()
                   for f in sorted(g.iterdir()))
    keep = [files[i * len(files) // n] for i in range(n)]
    tmp = out.with_name(out.name + ".part")
    for s, g, f in keep:
        d = tmp / f"{s}--{g}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f.name).symlink_to(f.resolve())
    tmp.rename(out)
    return out


def bench_groups(folder: Path, cache: Path, model: str) -> tuple[dict, dict]:
    """The real `simsearch bench groups --mode style --json` in a subprocess -> (its JSON, timing)."""
    cmd = [str(Path(sys.executable).with_name("simsearch")), "bench", "groups", str(folder), "--mode", "style",
           "--json", "--cache", str(cache), "--model", model]
    with measure() as m:
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout), {"seconds": round(m.seconds, 1), "load_before": m.load_before, "load_after": m.load_after,
                                  "command": "simsearch " + " ".join(cmd[1:])}


def timing(args) -> dict:
    from simsearch.bench.features import FeatureSet
    from simsearch.bench.suites import read_groups

    folder = timing_folder(args.suite, args.work / f"timing-{args.images}", args.images)
    cache = args.work / f"timing-{args.images}.db"
    cold = None
    if not cache.exists():
        log.info("bench groups, cold cache (embedding + scoring)")
        _, cold = bench_groups(folder, cache, args.model)
    log.info("bench groups, warm cache (scoring only)")
    result, warm = bench_groups(folder, cache, args.model)
    # the previous protocol: AAS for all N(N-1)/2 pairs; its per-pair time from a seeded sample
    paths, _ = read_groups(folder)
    fs = FeatureSet(paths, cache=cache)
    n = len(fs.paths)
    rng = np.random.default_rng(0)
    i = rng.integers(0, n, args.sample_pairs)
    j = (i + rng.integers(1, n, args.sample_pairs)) % n
    fs.pair_scores("aas", i[:64], j[:64])  # q, k, v of every image, computed once (as the old protocol did too)
    with measure() as m:
        fs.pair_scores("aas", np.sort(i), j[np.argsort(i)])
    fs.close()
    per_pair = m.seconds / args.sample_pairs
    all_pairs = n * (n - 1) // 2
    return {"command": command_line(), "date": now(), "machine": machine_info(), "images": n,
            "groups": result["groups"], "cold": cold, "warm": warm, "config": result["config"],
            "metrics": result["metrics"],
            "previous_protocol": {"aas_pairs": all_pairs, "sampled_pairs": args.sample_pairs,
                                  "seconds_per_pair": per_pair, "aas_seconds": per_pair * all_pairs,
                                  "load": [m.load_before, m.load_after]}}


# -- results page ------------------------------------------------------------------------------------
def pct(e: dict) -> str:
    return f"{100 * e['value']:.1f} [{100 * e['ci95'][0]:.1f}, {100 * e['ci95'][1]:.1f}]"


def render(res: dict) -> str:
    lines = ["# Descriptor defaults chosen across a proxy suite (issue 12)", ""]
    if "compare" in res:
        if "explore-224" in res:
            lines += render_targets(res["compare"]["suite"], res["explore-224"])
        lines += render_compare(res["compare"])
    for key in [k for k in res if "ranks" in res[k]]:  # quality_explore.py sections, in the order they were made
        lines += render_explore(key, res[key])
    if "compact" in res:
        lines += render_compact(res["compact"])
    if "timing" in res:
        lines += render_timing(res["timing"])
    return "\n".join(lines) + "\n"


def render_targets(suite: dict, explore: dict) -> list[str]:
    """Issue 12's targets, row by row: the chosen style metric against single-block raw mean/std (the best
    block of each set, and the block best over the suite), AAS / combined against style cosine, and the
    content default against the final CLS (explore's cls@12, same seeded triplets)."""
    rows, ex = suite["rows"], explore["results"]
    acc = lambda st: 100 * st["triplet_accuracy"]["value"]  # noqa: E731
    style_sets = [n for n, i in suite["sets"].items() if i["mode"] == "style"]
    content_sets = [n for n, i in suite["sets"].items() if i["mode"] == "content"]
    raw = [c for c in explore["ranks"]["style"] if c.startswith("raw-ms@") and "-" not in c[7:]]
    suite_best = raw[0]  # ranks are sorted: the single block best on average over the style sets
    lines = ["## Targets", "", "Style sets: triplet accuracy %. `raw-ms@l` is the plain mean/std of the raw tokens entering "
             f"block l (quality_explore.py, same seeded triplets); `{suite_best}` is the block best on average over "
             "the style sets.", "",
             f"| style set | chosen: style | best raw-ms@l of this set | {suite_best} | chosen: aas | chosen: combined | "
             "previous: style |", "|---|---|---|---|---|---|---|"]
    gains = []
    for n in style_sets:
        best = max(raw, key=lambda c: ex[n][c]["triplet"]["value"])
        style, aas, comb = (acc(rows[f"chosen: {m}"][n]) for m in ("style", "aas", "combined"))
        gains.append(max(aas, comb) - style)
        lines.append(f"| {n} | {style:.1f} | {100 * ex[n][best]['triplet']['value']:.1f} ({best}) | "
                     f"{100 * ex[n][suite_best]['triplet']['value']:.1f} | {aas:.1f} | {comb:.1f} | "
                     f"{acc(rows['previous: style'][n]):.1f} |")
    lines += ["", f"Mean over the style sets of max(aas, combined) - style: **{np.mean(gains):+.1f}** points.", "",
              "| content / instance set | chosen: cosine | final CLS (cls@12) | previous: cosine |", "|---|---|---|---|"]
    for n in content_sets:
        lines.append(f"| {n} | {acc(rows['chosen: cosine'][n]):.1f} | {100 * ex[n]['cls@12']['triplet']['value']:.1f} | "
                     f"{acc(rows['previous: cosine'][n]):.1f} |")
    return lines + [""]


def render_compare(c: dict) -> list[str]:
    s = c["suite"]
    lines = ["## The suite", "", "| set | mode | group = | images | groups | Debian packages | licenses |",
             "|---|---|---|---|---|---|---|"]
    for name, info in s["sets"].items():
        lines.append(f"| {name} | {info['mode']} | {info.get('group', '')} | {info.get('images', '')} | "
                     f"{info.get('groups', '')} | {info.get('packages', '')} | {info.get('licenses', '')} |")
    lines += ["", f"## Previous vs chosen defaults of `{c['model']}`", "",
              f"previous: `{json.dumps(c['previous'])}`", "", f"chosen: `{json.dumps(c['chosen'])}`", "",
              f"Made {c['date']} by `{c['command']}` ({c['seconds']} s; load {c['load'][0]:.1f} -> {c['load'][1]:.1f}) "
              f"on {machine_line(c['machine'])}. Triplet accuracy % with its 95% Wilson interval "
              f"({s['config']['triplets']} seeded triplets per set), mAP % with its 95% bootstrap interval over queries.", ""]
    for m, text in s["config"]["definitions"]["suite"].items():
        lines.append(f"- `{m}`: {text}")
    sets = list(s["sets"])
    lines += ["", "| row | " + " | ".join(f"{n} ({s['sets'][n]['mode']})" for n in sets) + " | mean rank style | mean rank content |",
              "|---|" + "---|" * (len(sets) + 2)]
    for row in sorted(s["rows"], key=lambda r: (r.split(": ")[1], r)):
        cells = []
        for n in sets:
            st = s["rows"][row][n]
            cells.append(f"{pct(st['triplet_accuracy'])} / {100 * st['mAP']:.1f} [{100 * st['mAP_ci95'][0]:.1f}, "
                         f"{100 * st['mAP_ci95'][1]:.1f}]")
        r = s["ranks"].get(row, {})
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {r.get('style', float('nan')):.1f} | {r.get('content', float('nan')):.1f} |")
    return lines + [""]


def render_explore(key: str, sec: dict) -> list[str]:
    modes = {n: s["mode"] for n, s in sec["sets"].items()}
    lines = [f"## Candidates at {sec['size']} px ({key})", "", f"Made {sec['date']} by `{sec['command']}`. "
             "Triplet accuracy % / leave-one-out mAP % (mAP for vectors only; AAS and combined: triplets only); "
             "sorted by mean rank of triplet accuracy over the sets of the mode (definitions: "
             "benchmarks/quality_explore.py). Top 30 and the reference rows.", ""]
    for mode, ranked in sec["ranks"].items():
        sets = [n for n, m in modes.items() if m == mode]
        lines += [f"### {mode} sets", "", "| candidate | mean rank | " + " | ".join(sets) + " |",
                  "|---|---|" + "---|" * len(sets)]
        refs = {"ms@4", "cls@11", "cls@12", "aas@9"} | {c for c in ranked if c.startswith("comb(0.5):aas@9+")}
        for i, (cand, r) in enumerate(ranked.items()):
            if i >= 30 and cand not in refs:
                continue
            if any(cand not in sec["results"][n] for n in sets):
                continue
            cells = []
            for n in sets:
                v = sec["results"][n][cand]
                cells.append(f"{100 * v['triplet']['value']:.1f}" + (f" / {100 * v['mAP']:.1f}" if "mAP" in v else ""))
            lines.append(f"| {cand} | {r:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render_timing(t: dict) -> list[str]:
    prev = t["previous_protocol"]
    lines = [f"## `bench groups` speed: {t['images']} images, every metric", "",
             f"Made {t['date']} by `{t['command']}` on {machine_line(t['machine'])}.", ""]
    if t.get("cold"):
        c = t["cold"]
        lines.append(f"- fresh cache (embedding + scoring): **{c['seconds']:.0f} s** (1-min load {c['load_before']:.1f} "
                     f"-> {c['load_after']:.1f}); `{c['command']}`")
    w = t["warm"]
    lines += [f"- warm cache (scoring only): **{w['seconds']:.0f} s** (load {w['load_before']:.1f} -> {w['load_after']:.1f})",
              f"- previous protocol (AAS for all {prev['aas_pairs']} pairs): {1000 * prev['seconds_per_pair']:.2f} ms a "
              f"pair over {prev['sampled_pairs']} sampled pairs -> **{prev['aas_seconds'] / 60:.0f} min** of AAS alone "
              f"(load {prev['load'][0]:.1f} -> {prev['load'][1]:.1f})", "", "What each metric's numbers are:", ""]
    lines += [f"- `{m}`: {text}" for m, text in t["config"]["definitions"].items()]
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("compare", "compact", "timing", "render"))
    ap.add_argument("--suite", type=Path, default=data_root() / "suite")
    ap.add_argument("--cache", type=Path, default=data_root() / "quality-cache")
    ap.add_argument("--work", type=Path, default=data_root() / "quality-work")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--triplets", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=800, help="timing: images of the merged style sets")
    ap.add_argument("--sample-pairs", type=int, default=2000)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help=f"seconds, not minutes: {QUICK}")
    args = parse_args(ap, argv, QUICK)
    setup_logging()
    args.work.mkdir(parents=True, exist_ok=True)
    sections = {"compare": compare, "compact": compact, "timing": timing}
    update_sections("quality_suite", {args.step: sections[args.step](args)} if args.step in sections else {},
                    render, args.out_dir)


if __name__ == "__main__":
    main()
