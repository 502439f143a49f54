"""Does the second stage pay its way on copy detection? (issue 18, "Measure")

    python benchmarks/copydetect_data.py                 # first (or let this script build it): the proxy set
    python benchmarks/copydetect.py [--data-root DIR] [--split tune|heldout|all] [--rerankers aas,matches,both]
                                    [--candidates N] [--limit-originals N] [--model M] [--out-dir DIR] [--quick]

Data: the copy-detection proxy of benchmarks/copydetect_data.py (DATA_ROOT/copydetect-v2; with --quick a tiny
one made from examples/images into DATA_ROOT/copydetect-quick, no apt). Its pool (originals, distractors,
composites) and its dedup pool (originals, distractors, mild copies) are indexed once each with the library's
indexer (`Index.add_folder`) into DATA/db/<model>/{pool,dedup}.db and reused (incremental: a re-run embeds
nothing); another model or data version gets other databases.

Copies: every edited copy of an original of the chosen split queries the pool through the library's path:
`Index.embed_image` once, then `Index.search_embedded` without reranking and with each reranker of
`simsearch.rerank.RERANKERS` (or --rerankers) on `--candidates` first-stage hits; the same as
`Index.search(copy, k=10, rerank=name, candidates=50)` without embedding the copy once per reranker (checked on
the first query). A reranker whose score another reranker's hits already carry (`both` reports `aas` and
`matches`) is read from those hits when, on the first query, that gives exactly its own call's top 10; else it
is called. R@1 / R@10: the original is first / in the top 10; 95% Wilson intervals per edit type; the mean over
edit types with a bootstrap interval stratified by edit type (seeded).

--limit-originals N: at most N originals (and N paste sources) per split, evenly spread over their sorted names,
for a shorter run on 2 shared cores (~1-4 s a query with 3 rerankers, depending on the load).

Dedup: the baseline a user has today, near-duplicate pairs by thresholding content cosine. Candidate pairs come
from the dedup database's own FAISS index (`Index.vector_index("content").search`, k-NN of every stored vector,
k doubled until every row's k-th neighbour is below the lowest threshold), never an N x N matrix. A pair is
true when both images derive from the same original. Pair precision and recall per threshold; also single-
linkage groups (connected components) at each threshold, scored by the pairs they imply.

Regions: when `Index.search` takes `box=` (region search), each region query is `search(scene, box=box)`
(the region pasted into an unrelated picture, its box given) with and without rerankers; until then "not
available". Always: the crop alone as a plain query (what a user can do without region search).

Writes <out-dir>/copydetect.{json,md} (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import inspect
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from common import (RESULTS, command_line, cpu_facts, data_root, log, machine_info, machine_line, measure, now, parse_args,
                    percentile, setup_logging, write_results)
from copydetect_data import EXAMPLES_ARGS, build_from_folder, build_from_debian, load_manifest

from simsearch import Index
from simsearch.bench.fixtures import spread
from simsearch.bench.metrics import wilson
from simsearch.index import rerank_candidates
from simsearch.rerank import RERANKERS

K = 10
THRESHOLDS = (0.80, 0.85, 0.90, 0.95, 0.97)
QUICK = {"split": "all", "candidates": 4, "cost_queries": 2}
FIRST = "first stage"


# ---- data and databases ---------------------------------------------------------------------------
def dataset(root: Path, quick: bool) -> Path:
    root = root.expanduser().resolve()
    return build_from_folder(root / "copydetect-quick", EXAMPLES_ARGS) if quick else build_from_debian(root)


def open_index(data: Path, name: str, model: str | None) -> Index:
    """DATA/db/<model>/<name>.db with DATA/<name> indexed into it (nothing embedded when up to date)."""
    from simsearch.backbones import DEFAULT_MODEL

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model or DEFAULT_MODEL).strip("_")[-60:]
    idx = Index(data / "db" / slug / f"{name}.db", model=model)
    with measure() as m:
        report = idx.add_folder(data / name)
    log.info("%s: %d rows (%s) in %.0f s", name, idx.count(), report, m.seconds)
    return idx


def relative(path: str, data: Path) -> str:
    """A hit's path as the manifest names it (the dedup pool reaches the files through symlinks)."""
    return str(Path(path).resolve().relative_to(data))


# ---- copies ---------------------------------------------------------------------------------------
def reranked_lists(idx: Index, vec: np.ndarray, query, method: str, candidates: int) -> list:
    """All `candidates` hits in `method`'s order (their .scores hold every stage's score); `query`:
    method -> what the second stage gets of the query (Index.rerank_query)."""
    return idx.search_embedded(vec, query(method), candidates, rerank=method, candidates=candidates)


def order_by(hits: list, name: str, first_order: dict[int, int]) -> list[int]:
    """Keys of `hits` sorted by their `name` score, ties in first-stage order (as Index.rerank sorts)."""
    return [h.key for h in sorted(hits, key=lambda h: (-h.scores[name], first_order[h.key]))]


def plan_rerankers(idx: Index, vec, dense, rerankers: list[str], candidates: int) -> tuple[dict, dict]:
    """On one query: which rerankers to call and which to read off another's hits. -> ({name: source}, check)"""
    direct = {m: reranked_lists(idx, vec, dense, m, candidates) for m in rerankers}
    first = idx.search_vector(vec, candidates)
    first_order = {h.key: i for i, h in enumerate(first)}
    source, check = {m: m for m in rerankers}, {}
    for m in rerankers:
        for other in rerankers:
            if other == m or source[other] != other or not all(m in h.scores for h in direct[other]):
                continue
            same = order_by(direct[other], m, first_order)[:K] == [h.key for h in direct[m][:K]]
            diff = max(abs(h.scores[m] - g.score) for h in direct[other] for g in direct[m] if g.key == h.key)
            check[f"{m} from {other}"] = {"same_top10": same, "max_abs_score_diff": float(diff)}
            if same and diff < 1e-5:
                source[m] = other
                break
    return source, check


def query_cost(idx: Index, data: Path, queries: list[dict], rerankers: list[str], candidates: int, n: int) -> dict:
    """p50 wall and CPU seconds of `Index.search(copy, k=K)` one query at a time, in process and warm
    (the query forward included), without rerank and with each reranker, on n copies spread over the list."""
    chosen = [queries[i] for i in np.linspace(0, len(queries) - 1, min(n, len(queries))).astype(int)]
    out = {"queries": len(chosen), "candidates": candidates}
    for method in [None, *rerankers]:
        idx.search(data / chosen[0]["file"], k=K, rerank=method, candidates=candidates)  # warm
        wall, cpu = [], []
        for q in chosen:
            with measure() as m:
                idx.search(data / q["file"], k=K, rerank=method, candidates=candidates)
            wall.append(m.seconds)
            cpu.append(m.cpu_seconds)
        out[method or FIRST] = {"wall_s_p50": round(percentile(wall, 50), 3), "cpu_s_p50": round(percentile(cpu, 50), 3)}
    return out


def run_copies(idx: Index, data: Path, queries: list[dict], rerankers: list[str], candidates: int) -> tuple[list, dict]:
    """-> per query {edit, split, rank per method (1-based, 0 = not in top 10)}, the reranker plan"""
    rows, plan = [], None
    t0 = time.perf_counter()
    with measure() as m:
        for i, q in enumerate(queries):
            img = idx.load_query(data / q["file"])
            emb = idx.embed_image(img)
            vec, dense = emb.content[0], (lambda method, img=img, d=emb.dense[0]: idx.rerank_query(img, d, method))
            if plan is None:
                source, check = plan_rerankers(idx, vec, dense, rerankers, candidates)
                direct = [h.key for h in idx.search(data / q["file"], k=K)]  # the one-call path gives the same hits
                plan = {"source": source, "check": check}
            first = idx.search_vector(vec, max(K, candidates))
            first_order = {h.key: r for r, h in enumerate(first)}
            if i == 0:
                plan["check"]["search() == embed_image + search_embedded"] = direct == [h.key for h in first[:K]]
            lists = {FIRST: [h.key for h in first[:K]]}
            called = {s: reranked_lists(idx, vec, dense, s, candidates) for s in set(plan["source"].values())}
            for r in rerankers:
                src = plan["source"][r]
                lists[r] = [h.key for h in called[r][:K]] if src == r else order_by(called[src], r, first_order)[:K]
            paths = idx.store.find({k for keys in lists.values() for k in keys}, ["path"])
            rank = {}
            for method, keys in lists.items():
                names = [relative(paths[k]["path"], data) for k in keys]
                rank[method] = names.index(q["target"]) + 1 if q["target"] in names else 0
            rows.append({"file": q["file"], "edit": q["edit"], "split": q["split"], "rank": rank})
            if (i + 1) % 10 == 0 or i + 1 == len(queries):
                log.info("  copies: %d/%d queries, %.0f s", i + 1, len(queries), time.perf_counter() - t0)
    plan["seconds"] = m.seconds
    return rows, plan


def stratified_bootstrap(groups: list[np.ndarray], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean over groups of each group's mean, resampling within groups."""
    rng = np.random.default_rng(seed)
    means = np.mean([g[rng.integers(0, len(g), (resamples, len(g)))].mean(1) for g in groups if len(g)], axis=0)
    return [float(x) for x in np.quantile(means, [0.025, 0.975])]


def recall_table(rows: list[dict], methods: list[str], edits: list[str]) -> dict:
    """{edit | "mean over edit types": {method: {"R@1": estimate, "R@10": estimate}}}"""
    table: dict = {}
    for edit in edits:
        sub = [r for r in rows if r["edit"] == edit]
        table[edit] = {m: {f"R@{k}": wilson(sum(0 < r["rank"][m] <= k for r in sub), len(sub)).to_dict() for k in (1, K)}
                       for m in methods}
    table["mean over edit types"] = {}
    for m in methods:
        entry = {}
        for k in (1, K):
            hits = [np.array([0 < r["rank"][m] <= k for r in rows if r["edit"] == e], float) for e in edits]
            hits = [h for h in hits if len(h)]
            entry[f"R@{k}"] = {"value": float(np.mean([h.mean() for h in hits])), "n": int(sum(map(len, hits))),
                               "ci95": stratified_bootstrap(hits)}
        table["mean over edit types"][m] = entry
    return table


def delta_table(rows: list[dict], rerankers: list[str], edits: list[str]) -> dict:
    """{edit | "mean over edit types": {reranker: R@1 minus the first stage's, on the same queries, with a
    paired 95% bootstrap interval (queries resampled, within edit types for the mean)}}"""
    def diffs(m: str, edit: str) -> np.ndarray:
        return np.array([(r["rank"][m] == 1) - (r["rank"][FIRST] == 1) for r in rows if r["edit"] == edit], float)

    table = {}
    for edit in [*edits, "mean over edit types"]:
        table[edit] = {}
        for m in rerankers:
            groups = [diffs(m, e) for e in (edits if edit == "mean over edit types" else [edit])]
            groups = [g for g in groups if len(g)]
            table[edit][m] = {"value": float(np.mean([g.mean() for g in groups])), "ci95": stratified_bootstrap(groups)}
    return table


def summarise(record: dict, edits: list[str]) -> None:
    """Recall and paired-difference tables per split from the per-query ranks."""
    rows, methods = record["copies"]["per_query"], [FIRST, *record["rerankers"]]
    splits = {s: [r for r in rows if r["split"] == s] for s in ("tune", "heldout") if any(r["split"] == s for r in rows)}
    if len(splits) > 1:
        splits["all"] = rows
    record["copies"]["splits"] = {s: recall_table(sub, methods, edits) for s, sub in splits.items()}
    record["copies"]["delta_r1"] = {s: delta_table(sub, record["rerankers"], edits) for s, sub in splits.items()}


# ---- dedup ----------------------------------------------------------------------------------------
def knn_pairs(idx: Index, threshold: float) -> tuple[dict[tuple[int, int], float], np.ndarray]:
    """{(key a, key b): cosine} of every pair at or above `threshold`, from k-NN on the FAISS index."""
    keys, vectors = idx.store.vectors("content")
    index = idx.vector_index("content")
    k, todo, pairs = min(32, len(keys)), np.arange(len(keys)), {}
    while len(todo):
        scores, found = index.search(vectors[todo], k)
        for row, q in enumerate(todo):
            for s, key in zip(scores[row], found[row]):
                if key >= 0 and key != keys[q] and s >= threshold:
                    pairs[tuple(sorted((int(keys[q]), int(key))))] = float(s)
        full = scores[:, -1] >= threshold  # the k-th neighbour is still above: there may be more
        if k >= len(keys):
            break
        todo, k = todo[full], min(2 * k, len(keys))
    return pairs, keys


def components(pairs, keys) -> dict[int, int]:
    """Single-linkage groups: key -> root (union-find)."""
    parent = {int(k): int(k) for k in keys}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[root(a)] = root(b)
    return {k: root(k) for k in parent}


def run_dedup(idx: Index, data: Path, manifest: dict) -> dict:
    origin = {f["file"]: f.get("original") for f in manifest["files"]}
    with measure() as m:
        pairs, keys = knn_pairs(idx, min(THRESHOLDS))
    paths = idx.store.find(keys, ["path"])
    owner = {int(k): origin[relative(paths[int(k)]["path"], data)] for k in keys}
    what = {f["file"]: "copy" if f["role"] == "query" else f"{f['role']} {f.get('kind', '')}" for f in manifest["files"]}
    kind = {int(k): what[relative(paths[int(k)]["path"], data)] for k in keys}
    per_original = Counter(o for o in owner.values() if o)
    true_total = sum(n * (n - 1) // 2 for n in per_original.values())
    out = {"images": len(keys), "true_pairs": int(true_total), "knn_seconds": m.seconds, "thresholds": {}}
    for t in THRESHOLDS:
        kept = [p for p, s in pairs.items() if s >= t]
        true = sum(owner[a] is not None and owner[a] == owner[b] for a, b in kept)
        groups: dict[int, list[int]] = {}
        for k, r in components(kept, keys).items():
            groups.setdefault(r, []).append(k)
        false_kinds = Counter(" + ".join(sorted((kind[a], kind[b]))) for a, b in kept
                              if owner[a] is None or owner[a] != owner[b])
        implied = [(a, b) for g in groups.values() for i, a in enumerate(g) for b in g[i + 1:]]
        implied_true = sum(owner[a] is not None and owner[a] == owner[b] for a, b in implied)
        out["thresholds"][f"{t:.2f}"] = {
            "pairs": len(kept), "precision": wilson(true, len(kept)).to_dict(),
            "recall": wilson(true, true_total).to_dict(), "false_pairs_by_kind": dict(false_kinds.most_common()),
            "single_linkage": {"groups": sum(len(g) > 1 for g in groups.values()), "implied_pairs": len(implied),
                               "precision": wilson(implied_true, len(implied)).to_dict(),
                               "recall": wilson(implied_true, true_total).to_dict()}}
    return out


# ---- regions --------------------------------------------------------------------------------------
def has_region_search() -> bool:
    return "box" in inspect.signature(Index.search).parameters


def run_regions(idx: Index, data: Path, regions: list[dict], rerankers: list[str], candidates: int) -> dict:
    """R@1 per (kind, area) of the crop alone (first stage) and, with region search, of the boxed scene."""
    box_search = has_region_search()
    methods = [FIRST, *rerankers] if box_search else []
    firsts: dict[str, list] = {}
    hits_box: dict[str, dict[str, list]] = {}
    seconds: dict[str, list[float]] = {}  # per boxed query, the forward included (the first builds the region index)
    for r in regions:
        key = f"{r['kind']} {r['area']}"
        top = idx.search(data / r["crop"], k=1)
        firsts.setdefault(key, []).append(relative(top[0].path, data) == r["target"])
        for m in methods:
            t0 = time.perf_counter()
            top = idx.search_region(data / r["image"], tuple(r["box"]), k=1, rerank=None if m == FIRST else m,
                                    candidates=candidates)
            seconds.setdefault(m, []).append(time.perf_counter() - t0)
            hits_box.setdefault(key, {}).setdefault(m, []).append(relative(top[0].path, data) == r["target"])
    fractions: dict[str, list[float]] = {}
    for r in regions:
        fractions.setdefault(f"{r['kind']} {r['area']}", []).append(r["target_area_fraction"])
    return {"region_search": "available" if box_search else "not available (Index.search has no `box`)",
            "target_area_fraction": {k: float(np.median(v)) for k, v in fractions.items()},
            "crop_as_query": {k: wilson(sum(v), len(v)).to_dict() for k, v in firsts.items()},
            "box": {k: {m: wilson(sum(v), len(v)).to_dict() for m, v in d.items()} for k, d in hits_box.items()},
            "box_seconds_p50": {m: round(float(np.median(v)), 3) for m, v in seconds.items()}}


def chosen_originals(manifest: dict, splits: tuple[str, ...], limit: int) -> set[str]:
    """Originals and paste sources of `splits`; with `limit`, at most that many of each role per split, evenly
    spread over their sorted names (deterministic; a shorter run on the same kind of sample)."""
    chosen: set[str] = set()
    for role in ("original", "paste-source"):
        for split in splits:
            names = [f["original"] for f in manifest["files"] if f["role"] == role and f["split"] == split]
            chosen.update(spread(names, limit) if limit else names)
    return chosen


# ---- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", type=Path, default=data_root())
    ap.add_argument("--split", choices=("tune", "heldout", "all"), default="all")
    ap.add_argument("--rerankers", default=",".join(RERANKERS), help="comma-separated names of simsearch.rerank.RERANKERS")
    ap.add_argument("--candidates", type=int, default=None, help="default: the library's (index.rerank_candidates)")
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--cost-queries", type=int, default=11, help="copies timed one by one, in process and warm (0: none)")
    ap.add_argument("--limit-originals", type=int, default=0,
                    help="at most this many originals (and paste sources) per split, spread over their names; 0: all")
    ap.add_argument("--no-dedup", action="store_true")
    ap.add_argument("--no-regions", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help=f"the tiny set from examples/images, {QUICK}")
    args = parse_args(ap, argv, QUICK)
    rerankers = [m for m in args.rerankers.split(",") if m]
    if unknown := [m for m in rerankers if m not in RERANKERS]:
        ap.error(f"unknown reranker(s) {', '.join(unknown)} (choose from {', '.join(RERANKERS)})")
    setup_logging()
    record = {"date": now(), "command": command_line(), "machine": machine_info(), **cpu_facts(),
              "split": args.split, "candidates": rerank_candidates(args.candidates),
              "region_candidates": rerank_candidates(args.candidates, region=True), "rerankers": rerankers, "k": K}
    with measure() as total:
        data = dataset(args.data_root, args.quick)
        manifest = load_manifest(data)
        record["data"] = {"folder": str(data), "version": manifest["version"], "counts": manifest["counts"],
                          "packages": manifest["packages"]}
        splits = ("tune", "heldout") if args.split == "all" else (args.split,)
        pool = open_index(data, "pool", args.model)
        record["config"] = {"model": pool.conf.model, "weights": pool.store.meta["weights"]}
        chosen = chosen_originals(manifest, splits, args.limit_originals)
        record["limit_originals"] = args.limit_originals or None
        queries = [q for q in manifest["queries"] if q["original"] in chosen]
        log.info("copies: %d queries (%s), rerankers %s", len(queries), args.split, rerankers)
        rows, plan = run_copies(pool, data, queries, rerankers, record["candidates"])
        record["copies"] = {"queries": len(rows), "plan": plan, "per_query": rows}
        summarise(record, manifest["edits"])
        if args.cost_queries:
            record["cost"] = query_cost(pool, data, queries, rerankers, record["candidates"], args.cost_queries)
        if not args.no_regions:
            regions = [r for r in manifest["regions"] if r["original"] in chosen]
            log.info("regions: %d queries", len(regions))
            record["regions"] = run_regions(pool, data, regions, rerankers, record["region_candidates"])
        if not args.no_dedup:
            record["dedup"] = run_dedup(open_index(data, "dedup", args.model), data, manifest)
    record["total_s"], record["uptime_end"] = total.seconds, cpu_facts()["uptime"]
    write_results("copydetect", record, md := markdown(record), args.out_dir)
    print(md)


def markdown(r: dict) -> str:
    pct = lambda e: f"{100 * e['value']:.1f} [{100 * e['ci95'][0]:.0f}-{100 * e['ci95'][1]:.0f}]"  # noqa: E731
    c = r["data"]["counts"]
    lines = ["# Copy detection: first stage vs second stage (issue 18)", "",
             f"{r['date']}; model `{r['config']['model']}` (weights `{r['config']['weights']}`); {machine_line(r['machine'])}.",
             f"CPU `{r['lscpu_model']}`, SIMD flags: {' '.join(r['simd_flags']) or 'none'}. Total run {r['total_s']:.0f} s.",
             f"Load at start: `{r['uptime']}`; at end: `{r['uptime_end']}` (load above the core count means shared, slower cores).",
             "", f"Made by `{r['command']}`.", "",
             f"Data `{r['data']['version']}` ({r['data']['folder']}, built by `python benchmarks/copydetect_data.py` from "
             f"{', '.join(r['data']['packages'])}): {c['originals']} originals ({c['originals_tune']} tune / "
             f"{c['originals_heldout']} held out; {c['originals_photo']} photos, {c['originals_drawing']} drawings), "
             f"{c['distractors']} distractors, {c['composites']} composites: pool of {c['pool']}. "
             f"{r['copies']['queries']} copy queries (split: {r['split']}"
             + (f"; at most {r['limit_originals']} originals and paste sources per split, spread over their names"
                if r.get("limit_originals") else "") + f"); k = {r['k']}, {r['candidates']} candidates reranked.",
             "", "Cells: R@1 / R@10 in percent with 95% intervals (Wilson per edit type; the mean over edit types "
             "with a stratified bootstrap).", ""]
    methods = [FIRST, *r["rerankers"]]
    for split, table in r["copies"]["splits"].items():
        lines += [f"## Copies, split `{split}`", "", "| edit | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for edit, row in table.items():
            n = row[FIRST]["R@1"]["n"]
            lines.append(f"| {edit} (n={n}) | " + " | ".join(f"{pct(row[m]['R@1'])} / {pct(row[m]['R@10'])}"
                                                           for m in methods) + " |")
        lines.append("")
        delta = r["copies"]["delta_r1"][split]
        lines += [f"R@1 of each reranker minus the first stage's, split `{split}`, in points (paired bootstrap 95% interval):",
                  "", "| edit | " + " | ".join(r["rerankers"]) + " |", "|---|" + "---|" * len(r["rerankers"])]
        for edit, row in delta.items():
            lines.append(f"| {edit} | " + " | ".join(f"{100 * row[m]['value']:+.1f} [{100 * row[m]['ci95'][0]:+.0f}, "
                                                     f"{100 * row[m]['ci95'][1]:+.0f}]" for m in r["rerankers"]) + " |")
        lines.append("")
    plan = r["copies"]["plan"]
    lines += [f"Reranker calls: {plan['source']} (a reranker read off another's hits was checked on the first query: "
              f"{plan['check']}). Copies took {plan['seconds']:.0f} s.", ""]
    if "cost" in r:
        c = r["cost"]
        lines += [f"Cost: `Index.search(copy, k={r['k']})` one query at a time, in process and warm, the query forward "
                  f"included, p50 over {c['queries']} copies: " + ", ".join(
                      f"{m} {c[m]['wall_s_p50']} s ({c[m]['cpu_s_p50']} s CPU)" for m in c if m not in ("queries", "candidates"))
                  + f"; {c['candidates']} candidates reranked.", ""]
    if "regions" in r:
        g = r["regions"]
        boxed = list(next(iter(g["box"].values()), {}))
        lines += ["## Region queries", "", f"Region search: {g['region_search']}.", "",
                  "| kind, area of the source | region's share of the target (median) | crop alone as query (R@1) | "
                  + "".join(f"scene + box, {m} (R@1) | " for m in boxed), "|---|---|---|" + "---|" * len(boxed)]
        for key, est in g["crop_as_query"].items():
            lines.append(f"| {key} (n={est['n']}) | {g['target_area_fraction'][key]:.3f} | {pct(est)} | "
                         + "".join(f"{pct(g['box'][key][m])} | " for m in boxed))
        lines += ["", "`original 1/n`: a crop of 1/n of an original, target that original (in the pool). `pasted 1/n`: a "
                  "crop of 1/n of a paste source (not in the pool), target the composite it was pasted into. Scene + box: "
                  "the crop pasted into an unrelated distractor and searched with its box.", ""]
        if g.get("box_seconds_p50"):
            lines += ["Scene + box, wall-clock per query (p50, one at a time, the region's forwards included): "
                      + ", ".join(f"{m} {s} s" for m, s in g["box_seconds_p50"].items()) + f"; {r.get('region_candidates', r['candidates'])} candidates.", ""]
    if "dedup" in r:
        d = r["dedup"]
        lines += ["## Dedup baseline: threshold on content cosine", "",
                  f"{d['images']} images (originals, distractors, mild copies), {d['true_pairs']} true pairs; "
                  f"k-NN on the FAISS index took {d['knn_seconds']:.1f} s.", "",
                  "| cosine >= | pairs | pair precision | pair recall | single-linkage precision | single-linkage recall |",
                  "|---|---|---|---|---|---|"]
        for t, e in d["thresholds"].items():
            s = e["single_linkage"]
            lines.append(f"| {t} | {e['pairs']} | {pct(e['precision'])} | {pct(e['recall'])} | {pct(s['precision'])} | "
                         f"{pct(s['recall'])} |")
        lines += ["", "Wrong pairs by what their two images are (`copy`: a mild copy of an original; figure: OpenCV's "
                  "documentation figures, mostly text and diagrams on white):", ""]
        for t in ("0.90", "0.95"):
            if t in d["thresholds"]:
                top = list(d["thresholds"][t]["false_pairs_by_kind"].items())[:5]
                lines.append(f"- cosine >= {t}: " + "; ".join(f"{k}: {n}" for k, n in top))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
