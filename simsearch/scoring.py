"""Score generated images against references (`simsearch score`).

Pairs come from an explicit CSV (columns `ref,gen`), from file names (a generated image belongs to
the reference whose stem equals its stem, prefixes it as `<stem>_...`/`<stem>-...`, or names its
folder), from a single reference image (every generated image against it), or from `all_pairs`.
Descriptors of every image are computed once (bench.features.FeatureSet); the numbers are
deterministic: no sampling, fixed model, fp32 on CPU (fp16 on CUDA agrees to about 1e-2).
"""

from __future__ import annotations

import csv
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bench.features import METRIC_HELP, METRICS, FeatureSet
from .errors import NAME_ONLY, SimsearchError
from .images import iter_image_files
from .paths import normalize


def _images(path: Path, what: str) -> list[Path]:
    if not path.exists():
        raise SimsearchError(f"{path}: no such {what} file or folder")
    files = list(iter_image_files(path))
    if not files:
        raise SimsearchError(f"{path}: no images found")
    return files


def _matches(ref: Path, gen: Path) -> bool:
    s, g = ref.stem, gen.stem
    return g == s or g.startswith((s + "_", s + "-")) or gen.parent.name == s


def make_pairs(ref: str | Path, gen: str | Path, pairs_csv: str | Path | None = None,
               all_pairs: bool = False) -> tuple[list[tuple[str, str]], list[str]]:
    """-> ([(ref path, gen path), ...], unmatched generated paths)"""
    ref, gen = Path(ref).expanduser(), Path(gen).expanduser()
    if pairs_csv:
        pairs = []
        base_ref, base_gen = (ref if ref.is_dir() else ref.parent), (gen if gen.is_dir() else gen.parent)
        try:  # utf-8-sig: spreadsheets save "CSV UTF-8" with a byte-order mark
            with open(pairs_csv, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except OSError as e:
            raise SimsearchError(f"{pairs_csv}: {e.strerror or e}") from None
        except (UnicodeDecodeError, csv.Error) as e:
            raise SimsearchError(f"{pairs_csv}: not a readable UTF-8 CSV ({e})") from None
        if not rows or not {"ref", "gen"} <= set(rows[0]):
            raise SimsearchError(f"{pairs_csv}: expected a CSV with columns ref,gen and at least one row")
        for n, row in enumerate(rows, 2):
            if not row.get("ref") or not row.get("gen"):
                raise SimsearchError(f"{pairs_csv}: line {n}: needs a ref and a gen path")
            r, g = base_ref / row["ref"], base_gen / row["gen"]
            for p in (r, g):
                if not p.is_file():
                    raise SimsearchError(f"{pairs_csv}: line {n}: {p}: no such file")
            pairs.append((normalize(r), normalize(g)))
        return pairs, []
    refs, gens = _images(ref, "reference"), _images(gen, "generated")
    if all_pairs or ref.is_file():
        return [(normalize(r), normalize(g)) for r in refs for g in gens], []
    pairs, unmatched = [], []
    for g in gens:
        owners = [r for r in refs if _matches(r, g)]
        if len(owners) > 1:  # refs "dog" and "dog_2" both claim "dog_2_1": the longest name wins
            longest = max(len(r.stem) for r in owners)
            owners = [r for r in owners if len(r.stem) == longest]
        if not owners:
            unmatched.append(normalize(g))
        pairs += [(normalize(r), normalize(g)) for r in owners]
    if not pairs:
        raise SimsearchError(f"no generated image in {gen} matches a reference name in {ref}; "
                             "name them after the reference, pass {pairs} (a CSV of ref,gen), or {all_pairs}",
                             pairs=NAME_ONLY, all_pairs=True)
    return pairs, unmatched


def summarize(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "count": int(len(values))}


@dataclass
class ScoreReport:
    metrics: list[str]
    pairs: list[dict] = field(default_factory=list)  # {"ref", "gen", metric: score}
    per_reference: dict[str, dict] = field(default_factory=dict)  # ref -> metric -> summary
    overall: dict[str, dict] = field(default_factory=dict)  # metric -> summary
    unmatched: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"config": self.config, "metrics": {m: METRIC_HELP[m] for m in self.metrics},
                "overall": self.overall, "per_reference": self.per_reference, "pairs": self.pairs,
                "unmatched": self.unmatched, "failed": self.failed}

    def write(self, path: str | Path) -> Path:
        """JSON, or CSV of the per-pair scores when the name ends in .csv."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["ref", "gen", *self.metrics])
                w.writeheader()
                w.writerows(self.pairs)
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def score(ref: str | Path, gen: str | Path, pairs_csv: str | Path | None = None, all_pairs: bool = False,
          metrics: tuple[str, ...] = METRICS, features: FeatureSet | None = None, **feature_kw) -> tuple[ScoreReport, FeatureSet]:
    """Score every pair by every metric. -> (report, the FeatureSet, for thumbnails; close() it)."""
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise SimsearchError(f"unknown metric '{bad[0]}' (choose from {', '.join(METRICS)}, all)")
    pairs, unmatched = make_pairs(ref, gen, pairs_csv, all_pairs)
    fs = features or FeatureSet([p for pair in pairs for p in pair], **feature_kw)
    kept = [(r, g) for r, g in pairs if r in fs.pos and g in fs.pos]
    if not kept:
        raise SimsearchError("no pair has two readable images: " + "; ".join(f"{p}: {r}" for p, r in fs.report.failed[:3]))
    i = np.asarray([fs.pos[r] for r, _ in kept])
    j = np.asarray([fs.pos[g] for _, g in kept])
    scores = {m: fs.pair_scores(m, i, j) for m in metrics}
    report = ScoreReport(list(metrics), unmatched=unmatched, config=fs.config,
                         failed=[{"path": p, "reason": r} for p, r in fs.report.failed])
    report.pairs = [{"ref": r, "gen": g, **{m: float(scores[m][n]) for m in metrics}} for n, (r, g) in enumerate(kept)]
    refs = np.asarray([r for r, _ in kept])
    for r in dict.fromkeys(refs):
        sel = refs == r
        report.per_reference[r] = {m: summarize(scores[m][sel]) for m in metrics}
    report.overall = {m: summarize(scores[m]) for m in metrics}
    return report, fs


def write_score_html(report: ScoreReport, fs: FeatureSet, path: str | Path) -> Path:
    """Reference and generated thumbnails side by side with their scores."""
    from .store import path_key
    from .viz import image_data_uri, table_html, write_page

    thumbs = {r["key"]: r["thumb"] for r in fs.index.store.rows(
        [path_key(p) for p in {p for pair in report.pairs for p in (pair["ref"], pair["gen"])}], ["thumb"])}

    def img(p: str) -> str:
        data = thumbs.get(path_key(p))
        return f'<img alt="{html.escape(Path(p).name)}" src="{image_data_uri(data)}">' if data else ""

    rows = [[img(p["ref"]), img(p["gen"]), *[f"{p[m]:.4f}" for m in report.metrics],
             f'<span class="path">{html.escape(p["ref"])}<br>{html.escape(p["gen"])}</span>'] for p in report.pairs]
    overall = table_html(["metric", "mean", "std", "pairs", "what it measures"],
                         [[m, f"{s['mean']:.4f}", f"{s['std']:.4f}", str(s["count"]), html.escape(METRIC_HELP[m])]
                          for m, s in report.overall.items()], numeric={1, 2, 3})
    n_m = len(report.metrics)
    pairs = table_html(["reference", "generated", *report.metrics, "paths"], rows, numeric=set(range(2, 2 + n_m)))
    conf = f"<details><summary>configuration</summary><pre>{html.escape(json.dumps(report.config, indent=2))}</pre></details>"
    return write_page(path, "simsearch score", ["<h2>overall</h2>", overall, conf, "<h2>pairs</h2>", pairs])
