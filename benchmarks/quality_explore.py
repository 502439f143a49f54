"""Which descriptors to make the defaults: every candidate scored on every set of the proxy suite.

    python benchmarks/data.py suite                 # first: ROOT/suite/<set> + suite.json
    python benchmarks/quality_explore.py [--size 224] [--aas-layers 3,5,7,9,11] [--triplets 2000]
    python benchmarks/quality_explore.py --quick --model DIR --suite DIR     # the smoke test's seconds-long run

The hidden state entering every block (and the last block's output) of every suite image is computed
once per input size and cached, fp16, outside the repository (ROOT/quality-tokens/<weights>-<size>/,
one file per image content hash). Every candidate is then a function of those tensors, computed with
the library's own pure functions (simsearch.descriptors.pooling, the backbone's layer norms and
attention projections, simsearch.rerank.aas), so exploring costs one forward pass per image and size.

Candidates (l = block index; features of block l = its layer-normed input, l = 12 the final tokens):
  style  ms@l      mean/std of block l's features (the style vector; `raw-ms`: of the raw hidden state)
         cov@l     channel covariance, signed square root (covariance_vector); ms+cov@l both
         ms@a-b    blocks a..b, each unit-norm, concatenated (concat_normalized); ms@a,b,c likewise
         w-ms@l    PCA-whitened (fit_whitening) on the other sets' images, unlabelled
         wt-ms@l   PCA-whitened on the set's own images, unlabelled (transductive, as an index could)
  content cls@l, mean@l, gem@l, cls+mean@l (content_vector), cls@a-b concatenated, w-/wt- whitened
  both   aas@l     AAS of block l's self-attention (nocls: the CLS token dropped from queries and keys)
         comb(w)   w z(aas) + (1 - w) z(vector): z-scores from 500 random pairs (labels unused;
                   simsearch.bench.suites.combine)
Every set is scored by triplet accuracy on the same seeded triplets for every candidate (exact for
AAS too), and by leave-one-out mAP for the vectors; candidates are ranked per set by triplet accuracy
and the table is sorted by their mean rank over the sets of their mode (style sets for style
candidates, content/instance sets for content candidates).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import RESULTS, command_line, data_root, log, machine_info, now, parse_args, setup_logging, update_sections
from quality_suite import render

from simsearch.backbones import DEFAULT_MODEL, load_backbone
from simsearch.bench.features import aas_pairs
from simsearch.bench.metrics import average_rank, leave_one_out, sample_triplets, triplet_accuracy
from simsearch.bench.suites import combine, read_groups, read_suite
from simsearch.descriptors.pooling import (channel_projection, content_vector, covariance_vector, fit_whitening,
                                           style_vector, whiten)
from simsearch.images import open_image
from simsearch.rerank.aas import attend

WINDOWS = [(a, a + w - 1) for w in (2, 3, 4, 5) for a in range(0, 13 - w + 1)]
CALIBRATION_PAIRS = 500
COMBINED_WEIGHTS = (0.25, 0.5, 0.75)
KEEP_TOP = 60  # candidates per mode whose per-set numbers go into the results file
QUICK = {"size": 56, "cache_layers": "2,3,4,5", "aas_layers": "3,3nocls", "sketch": "8", "triplets": 50}
COMBINED_BASES = ("ms@4", "cov@6", "cls@11", "cls@12")  # the vectors `comb` mixes with AAS (those scored)


# -- token cache -------------------------------------------------------------------------------------
class Tokens:
    """Hidden states entering each block of `layers` (layer n = the last block's output), per image, fp16."""

    def __init__(self, bb, size: int, cache: Path, layers: list[int]):
        self.bb, self.size, self.layers = bb, size, layers
        self.dir = cache / f"{bb.fingerprint}-{size}-{'.'.join(map(str, layers))}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, Path] = {}

    def ensure(self, paths: list[str], batch: int = 8) -> None:
        todo = {}  # file -> one path of that content (the sets share images through symlinks)
        for p in paths:
            f = self.dir / f"{hashlib.blake2b(Path(p).read_bytes(), digest_size=16).hexdigest()}.npy"
            self.files[p] = f
            if not f.exists():
                todo.setdefault(f, p)
        todo = list(todo.values())
        log.info("tokens at %d px: %d of %d images to compute", self.size, len(todo), len(set(self.files.values())))
        for s in range(0, len(todo), batch):
            part = todo[s:s + batch]
            pixels = torch.stack([self.bb.preprocess(open_image(p).image, self.size) for p in part])
            out = self.bb(pixels, keep=set(self.layers), last_block=max(self.layers))
            hidden = torch.stack([out.hidden[l] for l in self.layers], 1).half().numpy()  # (B, L, T, C)
            for p, h in zip(part, hidden):
                np.save(tmp := self.files[p].with_suffix(".part.npy"), h)
                tmp.rename(self.files[p])
            if (s // batch) % 10 == 0:
                log.info("  %d / %d", s + len(part), len(todo))

    def hidden(self, paths: list[str], layer: int) -> torch.Tensor:
        """(N, T, C) float32 hidden state entering block `layer`."""
        k = self.layers.index(layer)
        return torch.from_numpy(np.stack([np.load(self.files[p], mmap_mode="r")[k] for p in paths])).float()

    def features(self, paths: list[str], layer: int) -> torch.Tensor:
        """Block `layer`'s features as the embedder takes them (its layer-normed input; n: final norm)."""
        h = self.hidden(paths, layer)
        with torch.inference_mode():
            if layer == self.bb.num_layers:
                return torch.cat([self.bb.final_norm(h[i:i + 64]) for i in range(0, len(h), 64)])
            return torch.cat([self.bb.prenorm(layer, h[i:i + 64]) for i in range(0, len(h), 64)])


# -- scoring -----------------------------------------------------------------------------------------
def cos(v: torch.Tensor) -> np.ndarray:
    v = F.normalize(v.float(), dim=-1)
    return (v @ v.T).numpy()


def score(sim: np.ndarray, labels: np.ndarray, trip: np.ndarray, ranking: bool = True) -> dict:
    out = {"triplet": triplet_accuracy(sim, trip).to_dict()}
    if ranking:
        out["mAP"] = leave_one_out(sim, labels, (1,))["mAP"]
    return out


def vector_candidates(tok: Tokens, paths: list[str], layers: list[int], prefix: int, kinds: set[str],
                      sketch_dims: list[int]) -> tuple[dict, dict]:
    """-> ({name: (N, N) similarity}, {name: (N, D) vectors kept for whitening})."""
    sims, vecs = {}, {}
    for l in layers:
        f = tok.features(paths, l)
        patches = f[:, prefix:]
        vecs[f"ms@{l}"] = style_vector(patches)
        vecs[f"raw-ms@{l}"] = style_vector(tok.hidden(paths, l)[:, prefix:])
        vecs[f"cls@{l}"] = content_vector(f, "cls", prefix)
        for pooling in ("mean", "gem", "cls+mean"):
            sims[f"{pooling}@{l}"] = cos(content_vector(f, pooling, prefix))
        if "cov" in kinds:
            cov = torch.cat([covariance_vector(patches[i:i + 32]) for i in range(0, len(patches), 32)])
            sims[f"cov@{l}"] = cos(cov)
            sims[f"ms+cov@{l}"] = 0.5 * (cos(vecs[f"ms@{l}"]) + sims[f"cov@{l}"])
            del cov
        for k in sketch_dims:  # covariance of the features projected on k fixed random orthonormal directions
            proj = channel_projection(patches.shape[-1], k)
            sims[f"cov{k}@{l}"] = cos(covariance_vector(patches @ proj))
            sims[f"ms+cov{k}@{l}"] = 0.5 * (cos(vecs[f"ms@{l}"]) + sims[f"cov{k}@{l}"])
        del f
        for name in (f"ms@{l}", f"raw-ms@{l}", f"cls@{l}"):
            sims[name] = cos(vecs[name])
    # A concatenation of unit-norm parts has as cosine the mean of the parts' cosines.
    for a, b in WINDOWS:
        if all(l in layers for l in range(a, b + 1)):
            for kind in ("ms", "cls", *(["cov"] if "cov" in kinds else []), *(f"cov{k}" for k in sketch_dims),
                         *(f"ms+cov{k}" for k in sketch_dims)):
                sims[f"{kind}@{a}-{b}"] = np.mean([sims[f"{kind}@{l}"] for l in range(a, b + 1)], 0)
    for picks in ((2, 4, 6), (2, 4, 6, 8), (3, 6, 9), (4, 8), (4, 8, 12), (0, 2, 4, 6, 8, 10, 12)):
        if all(l in layers for l in picks):
            sims["ms@" + ",".join(map(str, picks))] = np.mean([sims[f"ms@{l}"] for l in picks], 0)
    return sims, vecs


def random_pairs(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, n, count), rng.integers(0, n, count)
    keep = i != j
    return i[keep], j[keep]


def aas_candidates(tok: Tokens, paths: list[str], trip: np.ndarray, layers: list[int], prefix: int,
                   calib: np.ndarray) -> dict:
    """-> {name: (N, N) similarity with only the triplet and calibration pairs filled}."""
    n = len(paths)
    pairs = np.unique(np.sort(np.r_[trip[:, [0, 1]], trip[:, [0, 2]], calib], axis=1), axis=0)
    sims = {}
    for spec in layers:
        l, nocls = int(spec.removesuffix("nocls")), spec.endswith("nocls")
        name = f"aas@{l}" + ("-nocls" if nocls else "")
        t = time.perf_counter()
        h = tok.hidden(paths, l)
        with torch.inference_mode():
            q, k, v = (torch.cat(x) for x in zip(*[tok.bb.qkv(l, h[s:s + 32]) for s in range(0, n, 32)]))
        del h
        if nocls:
            q, k, v = q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:]
        own = torch.cat([attend(q[s:s + 64], k[s:s + 64], v[s:s + 64]) for s in range(0, n, 64)])
        vals = aas_pairs((q, k, v, own), pairs[:, 0], pairs[:, 1])
        del q, k, v, own
        sim = np.full((n, n), np.nan, dtype=np.float32)
        sim[pairs[:, 0], pairs[:, 1]] = sim[pairs[:, 1], pairs[:, 0]] = vals
        sims[name] = sim
        log.info("  %s: %d pairs in %.0f s", name, len(pairs), time.perf_counter() - t)
    return sims


# -- main --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", type=Path, default=data_root() / "suite")
    ap.add_argument("--cache", type=Path, default=data_root() / "quality-tokens")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--cache-layers", default="all", help="blocks whose tokens to cache (all = 0..n)")
    ap.add_argument("--layers", default="all", help="blocks to score vector candidates of (all = the cached ones)")
    ap.add_argument("--aas-layers", default="", help="e.g. 5,9,9nocls (empty: no AAS)")
    ap.add_argument("--no-cov", action="store_true", help="leave out the full covariance (C(C+1)/2 dims) candidates")
    ap.add_argument("--no-whitening", action="store_true")
    ap.add_argument("--sketch", default="", help="covariance of k random directions, e.g. 32,64,128")
    ap.add_argument("--triplets", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", default="", help="comma-separated subset of the suite's sets")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--section", default=None, help="results section name (default: explore-<size>)")
    ap.add_argument("--quick", action="store_true", help=f"seconds, not minutes: {QUICK}")
    args = parse_args(ap, argv, QUICK)
    setup_logging()
    torch.set_grad_enabled(False)
    suite = read_suite(args.suite)
    if args.sets:
        suite = {k: v for k, v in suite.items() if k in args.sets.split(",")}
    bb = load_backbone(args.model, "cpu")
    cached = list(range(bb.num_layers + 1)) if args.cache_layers == "all" else [int(x) for x in args.cache_layers.split(",")]
    layers = cached if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    aas_layers = [x for x in args.aas_layers.split(",") if x]
    kinds = set() if args.no_cov else {"cov"}
    tok = Tokens(bb, args.size, args.cache, cached)
    data = {}
    for name, info in suite.items():
        paths, labels = read_groups(info["root"])
        data[name] = (info["mode"], paths, np.asarray(labels))
    tok.ensure(sorted({p for _, paths, _ in data.values() for p in paths}))

    t0 = time.perf_counter()
    per_set_sims, per_set_vecs, trips = {}, {}, {}
    for name, (mode, paths, labels) in data.items():
        log.info("%s (%s): %d images", name, mode, len(paths))
        trips[name] = sample_triplets(labels, args.triplets, args.seed)
        per_set_sims[name], per_set_vecs[name] = vector_candidates(tok, paths, layers, bb.prefix_tokens, kinds,
                                                                   [int(k) for k in args.sketch.split(",") if k])
    # Whitening: fit on the other sets' images (unlabelled), or on the set's own images (transductive).
    white_of = [] if args.no_whitening else [k for k in per_set_vecs[next(iter(data))] if k.startswith(("ms@", "cls@"))]
    for name in data:
        log.info("whitening on %s", name)
        for key in white_of:
            x = per_set_vecs[name][key]
            fits = {"wt": x}
            if len(data) > 1:
                fits["w"] = torch.cat([per_set_vecs[o][key] for o in data if o != name])
            for tag, fit_on in fits.items():
                mean, proj = fit_whitening(fit_on, dim=min(256, len(fit_on) - 1), shrink=0.1)
                per_set_sims[name][f"{tag}-{key}"] = cos(whiten(x, mean, proj))
    results: dict[str, dict[str, dict]] = {}
    for name, (mode, paths, labels) in data.items():
        results[name] = {k: score(s, labels, trips[name]) for k, s in per_set_sims[name].items()}
    log.info("vector candidates scored in %.0f s", time.perf_counter() - t0)

    if aas_layers:
        for name, (mode, paths, labels) in data.items():
            log.info("AAS on %s", name)
            calib = np.c_[random_pairs(len(paths), CALIBRATION_PAIRS, args.seed + 1)]
            sims = aas_candidates(tok, paths, trips[name], aas_layers, bb.prefix_tokens, calib)
            for key, sim in sims.items():
                results[name][key] = score(sim, labels, trips[name], ranking=False)
                for base in COMBINED_BASES:
                    if base not in per_set_sims[name]:
                        continue
                    for w in COMBINED_WEIGHTS:
                        comb = combine(per_set_sims[name][base], sim, calib, w)
                        results[name][f"comb({w}):{key}+{base}"] = score(comb, labels, trips[name], ranking=False)

    ranks = rank_table(results, {n: m for n, (m, _, _) in data.items()})
    section = args.section or f"explore-{args.size}"
    update_sections("quality_suite", {section: {
        "command": command_line(), "date": now(), "machine": machine_info(), "model": args.model,
        "size": args.size, "triplets": args.triplets, "seed": args.seed, "weights": bb.fingerprint,
        "sets": {n: {"mode": m, "images": len(p), "groups": len(set(lab))} for n, (m, p, lab) in data.items()},
        "results": kept_results(results, ranks), "ranks": ranks}}, render, args.out_dir)


def kept_results(results: dict, ranks: dict, top: int = KEEP_TOP) -> dict:
    """The per-set numbers of each mode's `top` candidates and of the single-block baselines (ms@, raw-ms@,
    cls@); every candidate keeps its mean rank in `ranks`. Keeps the results file readable in review."""
    keep = {c for ranked in ranks.values() for c in list(ranked)[:top]}
    keep |= {c for per_set in results.values() for c in per_set
             if c.split("@")[0] in ("ms", "raw-ms", "cls", "aas") and "-" not in c.split("@")[1]}
    return {n: {c: v for c, v in per_set.items() if c in keep} for n, per_set in results.items()}


def rank_table(results: dict, modes: dict) -> dict:
    """{mode: {candidate: mean rank}} by triplet accuracy over the sets of that mode (1 = best), over
    the candidates scored on every set of the mode."""
    out = {}
    for mode in ("style", "content"):
        sets = [s for s, m in modes.items() if m == mode]
        if not sets:
            continue
        common = sorted(set.intersection(*[set(results[s]) for s in sets]))
        r = np.mean([average_rank([results[s][c]["triplet"]["value"] for c in common]) for s in sets], 0)
        out[mode] = dict(sorted(zip(common, r.tolist()), key=lambda kv: kv[1]))
    return out


if __name__ == "__main__":
    main()
