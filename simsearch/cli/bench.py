"""`simsearch bench`: keypoint PCK, grouped folders, Sref, IP and the proxy suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import (DeviceOption, EmbeddingOptions, ImageSizeOption, JsonOption, MatcherOptions, MetricsOption,
                      ModelOption, OutOption, RuntimeOption, cell, err, esc, out, parse_floats, parse_metrics,
                      progress_callbacks, quiet_libraries, warn_failed, with_option_blocks)

app = typer.Typer(no_args_is_help=True, help="Benchmarks: keypoint PCK, grouped folders, Sref, IP, the proxy suite.")
TripletsOption = Annotated[int, typer.Option(min=1, help="Seeded triplet sample size.")]
CandidatesOption = Annotated[Optional[int], typer.Option(
    min=0, help="AAS / combined mAP and recall@k rerank each query's first N by the mode's vector (default 50); "
                "0: every pair (exact, N^2).")]


@app.command("pck")
@with_option_blocks
def pck(
    root: Annotated[Path, typer.Argument(help="SPair-71k layout root.")],
    split: Annotated[str, typer.Option(help="trn, val or test.")] = "test",
    alpha: Annotated[list[str], typer.Option(help="PCK thresholds: --alpha 0.1,0.05 or repeated.")] = ["0.1"],
    categories: Annotated[Optional[list[str]], typer.Option("--category", help="Only these (repeatable).")] = None,
    features: Annotated[list[str], typer.Option(help="dino, sd, sd+dino: repeat or comma-separate to compare them on the same pairs.")] = ["dino"],
    matching: MatcherOptions = MatcherOptions(),
    as_json: JsonOption = False,
):
    """PCK@alpha of nearest-neighbour keypoint transfer, per category and mean, for each feature set."""
    from rich.progress import Progress

    from ..api import make_matchers
    from ..bench.pck import evaluate_pck, read_pairs

    quiet_libraries()
    pairs = read_pairs(root, split, categories)
    names = [f.strip() for text in features for f in text.split(",") if f.strip()]
    matchers = make_matchers(names, **matching.kwargs())
    alphas = parse_floats(alpha, "--alpha")
    results = {}
    with Progress(console=err, transient=True) as progress:
        for name, matcher in matchers.items():
            task = progress.add_task(name, total=len(pairs))
            results[name] = evaluate_pck(matcher, pairs, alphas, on_advance=lambda k, t=task: progress.advance(t, k))
    if as_json:
        print(json.dumps({name: r.to_dict() for name, r in results.items()} if len(results) > 1
                         else next(iter(results.values())).to_dict(), indent=2))
        return
    first = next(iter(results.values()))
    table = Table(title=f"PCK on {esc(root)} ({esc(split)}, {first.pairs} pairs, {first.points} points)", title_justify="left")
    table.add_column("category")
    for name in results:
        for a in first.alphas:
            table.add_column(f"{esc(name)} PCK@{a}", justify="right")
    table.add_column("points", justify="right")
    for cat in first.per_category:
        table.add_row(cell(cat), *[f"{100 * r.per_category[cat][f'pck@{a}']:.1f}" for r in results.values() for a in first.alphas],
                      str(first.per_category[cat]["points"]))
    table.add_row("[bold]mean", *[f"[bold]{100 * r.mean[f'pck@{a}']:.1f}" for r in results.values() for a in first.alphas],
                  str(first.points))
    out.print(table)


def _print(result, as_json: bool, out_file: Optional[Path]):
    if out_file:
        out_file.write_text(json.dumps(result.to_dict(), indent=2))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    warn_failed(result.failed)
    stats = sorted({k for m in result.metrics.values() for k in m if k != "queries"},
                   key=lambda k: ("triplet" not in k and "ordering" not in k, k))
    table = Table(title=f"{result.protocol} on {esc(result.root)}: {result.images} images, {result.groups} groups",
                  title_justify="left")
    table.add_column("metric")
    for s in stats:
        table.add_column(s.replace("_", " "), justify="right")
    for m, values in result.metrics.items():
        cells = []
        for s in stats:
            v = values.get(s)
            if isinstance(v, dict):  # an estimate with its 95% interval
                cells.append(cell(f"{100 * v['value']:.1f} [{100 * v['ci95'][0]:.1f}, {100 * v['ci95'][1]:.1f}] n={v['n']}"))
            else:
                cells.append("" if v is None else f"{100 * v:.1f}")
        table.add_row(m, *cells)
    out.print(table)
    out.print("percent; \\[low, high] is the 95% Wilson interval", style="dim")
    for m, text in result.config.get("definitions", {}).items():
        out.print(cell(f"{m}: {text}"), style="dim")


def _given(**options) -> dict:
    """The options the user set; the others keep the library's defaults."""
    return {k: v for k, v in options.items() if v is not None}


def _run(fn, root: Path, as_json: bool, out_file: Optional[Path], **kw):
    from rich.progress import Progress

    quiet_libraries()
    with Progress(console=err, transient=True) as progress:
        result = fn(root, progress=progress_callbacks(progress, "embedding"), **kw)
    _print(result, as_json, out_file)


@app.command("groups")
@with_option_blocks
def groups(
    root: Annotated[Path, typer.Argument(help="ROOT/<group>/<image>.")],
    mode: Annotated[str, typer.Option(help="content or style.")] = "content",
    metric: MetricsOption = "all",
    triplets: TripletsOption = 2000,
    seed: int = 0,
    candidates: CandidatesOption = None,
    embedding: EmbeddingOptions = EmbeddingOptions(),
    as_json: JsonOption = False,
    out_file: OutOption = None,
):
    """Triplet accuracy, leave-one-out mAP and recall@k of every metric on grouped folders."""
    from ..bench.suites import evaluate_groups

    _run(evaluate_groups, root, as_json, out_file, mode=mode, metrics=parse_metrics(metric), triplets=triplets,
         seed=seed, **_given(candidates=candidates), **embedding.kwargs())


@app.command("sref")
@with_option_blocks
def sref(
    root: Annotated[Path, typer.Argument(help="ROOT/<style>/<image>.")],
    metric: MetricsOption = "all",
    triplets: TripletsOption = 2000,
    seed: int = 0,
    candidates: CandidatesOption = None,
    embedding: EmbeddingOptions = EmbeddingOptions(),
    as_json: JsonOption = False,
    out_file: OutOption = None,
):
    """The Sref protocol (style groups) on a folder in its layout."""
    from ..bench.suites import evaluate_sref

    _run(evaluate_sref, root, as_json, out_file, metrics=parse_metrics(metric), triplets=triplets, seed=seed,
         **_given(candidates=candidates), **embedding.kwargs())


@app.command("ip")
@with_option_blocks
def ip(
    root: Annotated[Path, typer.Argument(help="ROOT/<ip>/reference.<ext> and <weight>.<ext>.")],
    metric: MetricsOption = "all",
    embedding: EmbeddingOptions = EmbeddingOptions(),
    as_json: JsonOption = False,
    out_file: OutOption = None,
):
    """The IP protocol: higher-weight variants must score closer to their reference."""
    from ..bench.suites import evaluate_ip

    _run(evaluate_ip, root, as_json, out_file, metrics=parse_metrics(metric), **embedding.kwargs())


@app.command("suite")
def suite(
    root: Annotated[Path, typer.Argument(help="A suite: ROOT/suite.json and ROOT/<set>/<group>/<image> (python benchmarks/data.py suite).")],
    variant: Annotated[Optional[list[str]], typer.Option(
        help="Descriptor choice to compare, repeatable: NAME or NAME:field=value,... (e.g. old:style_layer=4). Default: the model's defaults.")] = None,
    metric: MetricsOption = "all",
    triplets: TripletsOption = 2000,
    seed: int = 0,
    candidates: CandidatesOption = None,
    model: ModelOption = None,
    image_size: ImageSizeOption = None,
    cache: Annotated[Optional[Path], typer.Option(help="Keep each variant's descriptors in a database under this folder.")] = None,
    device: DeviceOption = "auto",
    runtime: RuntimeOption = "auto",
    as_json: JsonOption = False,
    out_file: OutOption = None,
):
    """Every protocol on every set of a proxy suite: one table, rows = descriptor choice and metric,
    columns = sets (triplet accuracy / mAP), and each row's mean rank over the style, content and all sets."""
    from rich.progress import Progress

    from ..bench.suites import evaluate_suite
    from ..embedder import DescriptorConfig

    quiet_libraries()
    variants = dict(DescriptorConfig.parse_variant(v) for v in variant) if variant else None
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("suite", total=None)
        result = evaluate_suite(root, variants, metrics=parse_metrics(metric), triplets=triplets, seed=seed,
                                **_given(candidates=candidates), cache=cache, model=model, device=device, runtime=runtime,
                                image_size=image_size, progress=progress_callbacks(progress, "embedding"),
                                on_set=lambda v, s: progress.update(task, description=f"{v}: {s}"))
    data = result.to_dict()
    if out_file:
        out_file.write_text(json.dumps(data, indent=2))
    if as_json:
        print(json.dumps(data, indent=2))
        return
    warn_failed(result.failed)
    sets = list(result.sets)
    table = Table(title=f"suite {esc(root)}: triplet accuracy % / mAP %", title_justify="left")
    table.add_column("descriptor: metric")
    for s in sets:
        table.add_column(f"{esc(s)} ({result.sets[s]['mode']})", justify="right")
    groups = [g for g in ("style", "content", "all") if any(g in r for r in result.ranks.values())]
    for g in groups:
        table.add_column(f"mean rank {g}", justify="right")
    for row in sorted(result.rows, key=lambda r: result.ranks.get(r, {}).get("all", float("inf"))):
        cells = [f"{100 * st['triplet_accuracy']['value']:.1f} / {100 * st['mAP']:.1f}" if (st := result.rows[row].get(s)) else ""
                 for s in sets]
        table.add_row(cell(row), *cells, *[f"{result.ranks[row][g]:.1f}" if g in result.ranks.get(row, {}) else ""
                                            for g in groups])
    out.print(table)
    for m, text in result.config["definitions"]["suite"].items():
        out.print(cell(f"{m}: {text}"), style="dim")
    out.print("rank: per set by triplet accuracy (1 = best), averaged; 95% intervals are in --json", style="dim")
