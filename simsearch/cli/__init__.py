"""The `simsearch` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import SimsearchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find images like this one (content) or in this style, on DINOv2 / DINO / SD descriptors.")
out = Console()
err = Console(stderr=True)

DbOption = Annotated[Path, typer.Option("--db", help="Database directory.", envvar="SIMSEARCH_DB")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DEFAULT_DB = Path("simsearch.db")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()


@app.command()
def index(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    db: DbOption = DEFAULT_DB,
    model: Annotated[Optional[str], typer.Option(help="Registry name, hub id or local directory.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    device: DeviceOption = "auto",
    prune: Annotated[bool, typer.Option(help="Remove rows of files under FOLDER that are gone.")] = False,
    image_size: Annotated[Optional[int], typer.Option(help="Model input side (new databases only).")] = None,
    dense_dtype: Annotated[Optional[str], typer.Option(help="float16 or int8 (new databases only).")] = None,
    content_layer: Annotated[Optional[int], typer.Option(help="Block whose normed input gives the content vector.")] = None,
    style_layer: Annotated[Optional[int], typer.Option(help="Block whose normed input gives the style statistics.")] = None,
    dense_layer: Annotated[Optional[int], typer.Option(help="Block whose input hidden state is stored for reranking.")] = None,
    commit_every: Annotated[int, typer.Option(min=1, help="Rows per LanceDB commit (what a kill can lose).")] = 256,
):
    """Embed every image under FOLDER into the database; incremental and resumable."""
    from ..errors import ImageError

    if not folder.exists():
        raise ImageError(folder, "no such file or directory")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..index import Index

    _quiet_libraries()
    overrides = {k: v for k, v in dict(image_size=image_size, dense_dtype=dense_dtype, content_layer=content_layer,
                                       style_layer=style_layer, dense_layer=dense_layer).items() if v is not None}
    idx = Index(db, model=model, device=device, **overrides)
    idx.ensure_table()  # loads the model and checks the configuration before the progress bar starts
    columns = [TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("index", total=None, rate="")

        def advance(n: int):
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:.1f} img/s" if speed else "")

        report = idx.add_folder(folder, batch_size=batch_size, prune=prune, write_rows=commit_every,
                                on_total=lambda n: progress.update(task, total=n), on_advance=advance)
    for path, reason in report.failed:
        err.print(f"[yellow]failed[/]: {path}: {reason}", highlight=False, soft_wrap=True)
    out.print(f"added {report.added} · updated {report.updated} · skipped {report.skipped} · "
              f"failed {len(report.failed)}" + (f" · pruned {report.pruned}" if prune else "") +
              f" · {report.images_per_s:.1f} img/s · {idx.count()} images in {db}", highlight=False, soft_wrap=True)


@app.command()
def query(
    image: Annotated[Path, typer.Argument(help="Query image.")],
    db: DbOption = DEFAULT_DB,
    mode: Annotated[str, typer.Option(help="content or style.")] = "content",
    k: Annotated[int, typer.Option("-k", "--top-k", help="Number of hits.")] = 10,
    where: Annotated[Optional[str], typer.Option(help="SQL filter, e.g. \"path LIKE '%/cats/%'\".")] = None,
    model: Annotated[Optional[str], typer.Option(help="Must match the database's model, if given.")] = None,
    device: DeviceOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    rerank: Annotated[Optional[str], typer.Option(help="Rerank with aas, matches or both.")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="First-stage hits to rerank.")] = 50,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained results page.")] = None,
):
    """Print the top-k images like IMAGE."""
    from ..errors import EmptyIndexError, ImageError

    if not image.is_file():
        raise ImageError(image, "no such file" if not image.exists() else "not a file")
    if not (Path(db) / "images.lance").exists():
        raise EmptyIndexError(f"{db}: no simsearch database here (run `simsearch index FOLDER --db {db}`)")
    from ..index import Index  # torch, lancedb: only once the cheap checks passed

    _quiet_libraries()
    idx = Index(db, model=model, device=device)
    hits = idx.search(image, k=k, mode=mode, where=where, rerank=rerank, candidates=candidates)
    if html_out:
        from ..report import write_results_html

        err.print(f"wrote {write_results_html(idx, image, hits, html_out, mode)}", highlight=False)
    if as_json:
        for hit in hits:
            print(json.dumps(hit.to_dict()))
        return
    table = Table(title=f"{mode} matches for {image}", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    extra = list(hits[0].scores) if hits and hits[0].scores else []
    for name in extra:
        table.add_column(name.replace("_", " "), justify="right")
    table.add_column("path", overflow="fold")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", *[f"{hit.scores[n]:.4f}" for n in extra], hit.path)
    out.print(table)


@app.command()
def info(db: DbOption = DEFAULT_DB,
         as_json: Annotated[bool, typer.Option("--json")] = False):
    """Rows, model and descriptor configuration, index state, bytes per image."""
    from ..index import Index

    data = Index(db).info()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, title=str(db), title_justify="left")
    table.add_row("images", str(data["rows"]))
    table.add_row("table version", str(data["table_version"]))
    for key, value in data["config"].items():
        table.add_row(key.replace("_", " "), str(value))
    table.add_row("weights fingerprint", data["weights"])
    d = data["dense"]
    table.add_row("dense tensor", f"{d['shape'][0]}x{d['shape'][1]} {d['dtype']}, {d['bytes_per_image']:,} B/image")
    table.add_row("on disk", f"{data['disk_bytes']:,} B ({data['disk_bytes_per_image']:,} B/image)")
    for column, state in data["ann"].items():
        table.add_row(f"faiss {column}", " ".join(f"{k}={v}" for k, v in state.items()))
    out.print(table)


@app.command()
def models(fetch: Annotated[bool, typer.Option(help="Download and convert the embedded default now.")] = False,
           as_json: Annotated[bool, typer.Option("--json")] = False):
    """Backbones simsearch knows, and whether their weights are present locally."""
    from ..backbones import DEFAULT_MODEL, MODELS, embedded, is_local

    if fetch:
        path = embedded.ensure_converted()
        err.print(f"embedded model ready in {path}", highlight=False)
    rows = [{"name": c.name, "family": c.family, "source": c.source, "local": is_local(c.name),
             "default": c.name == DEFAULT_MODEL, "description": c.description} for c in MODELS.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="models (any hub id or local checkpoint directory works too)", title_justify="left")
    for col in ("name", "family", "source", "local", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        table.add_row(name, r["family"], r["source"], "yes" if r["local"] else "no", r["description"])
    out.print(table)


def _floats(values: list[str], option: str) -> tuple[float, ...]:
    from ..errors import SimsearchError

    try:
        return tuple(float(v) for text in values for v in text.split(",") if v.strip())
    except ValueError:
        raise SimsearchError(f"{option} {' '.join(values)!r}: expected numbers such as 0.1,0.05") from None


def _parse_points(text: str) -> list[tuple[float, float]]:
    from ..errors import SimsearchError

    try:
        pts = [tuple(float(v) for v in p.split(",")) for p in text.replace(" ", "").split(";") if p]
    except ValueError:
        pts = []
    if not pts or any(len(p) != 2 for p in pts):
        raise SimsearchError(f"--points {text!r}: expected 'x,y;x,y;...' in pixels of image A")
    return pts


@app.command()
def match(
    image_a: Annotated[Path, typer.Argument(help="Image A.")],
    image_b: Annotated[Path, typer.Argument(help="Image B.")],
    points: Annotated[Optional[str], typer.Option(help="Points in A as 'x,y;x,y' (pixels).")] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="Number of best-buddy pairs.")] = 10,
    method: Annotated[str, typer.Option(help="nn or best-buddies (used without --points).")] = "best-buddies",
    model: Annotated[Optional[str], typer.Option(help="Registry name, hub id or local directory.")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Patch stride; must divide the patch size.")] = None,
    layer: Annotated[int, typer.Option(help="Block whose facet is used.")] = 9,
    facet_name: Annotated[str, typer.Option("--facet", help="key, query, value or token.")] = "key",
    log_bin: Annotated[bool, typer.Option(help="Log-binned descriptors.")] = True,
    image_size: Annotated[int, typer.Option(help="Model input side.")] = 224,
    out_png: Annotated[Optional[Path], typer.Option("--out", help="Side-by-side picture of the matches.")] = None,
    device: DeviceOption = "auto",
    as_json: Annotated[bool, typer.Option("--json")] = False,
):
    """Dense correspondences from A to B: given points, or the n best-buddy pairs."""
    from ..api import match_images

    _quiet_libraries()
    result = match_images(image_a, image_b, points=_parse_points(points) if points else None, n=n, method=method,
                          model=model, device=device, layer=layer, facet=facet_name, log_bin=log_bin,
                          image_size=image_size, stride=stride, out=out_png)
    if as_json:
        print(json.dumps({"a": str(image_a), "b": str(image_b), "matches": result.to_dicts()}))
    else:
        table = Table(title=f"{image_a} -> {image_b}", title_justify="left")
        for col in ("#", "A (x, y)", "B (x, y)", "confidence"):
            table.add_column(col, justify="right")
        for i, m in enumerate(result.to_dicts(), 1):
            table.add_row(str(i), f"{m['a'][0]:.1f}, {m['a'][1]:.1f}", f"{m['b'][0]:.1f}, {m['b'][1]:.1f}",
                          f"{m['confidence']:.3f}")
        out.print(table)
    if out_png:
        err.print(f"wrote {out_png}", highlight=False)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: keypoint PCK, grouped folders, Sref, IP.")
app.add_typer(bench_app, name="bench")


@bench_app.command("pck")
def bench_pck(
    root: Annotated[Path, typer.Argument(help="SPair-71k layout root.")],
    split: Annotated[str, typer.Option(help="trn, val or test.")] = "test",
    alpha: Annotated[list[str], typer.Option(help="PCK thresholds: --alpha 0.1,0.05 or repeated.")] = ["0.1"],
    categories: Annotated[Optional[list[str]], typer.Option("--category", help="Only these (repeatable).")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Patch stride, e.g. 14, 7, 2.")] = None,
    model: Annotated[Optional[str], typer.Option()] = None,
    layer: Annotated[int, typer.Option()] = 9,
    facet_name: Annotated[str, typer.Option("--facet")] = "key",
    log_bin: Annotated[bool, typer.Option(help="Log-binned descriptors.")] = True,
    image_size: Annotated[int, typer.Option()] = 224,
    device: DeviceOption = "auto",
    as_json: Annotated[bool, typer.Option("--json")] = False,
):
    """PCK@alpha of nearest-neighbour keypoint transfer, per category and mean."""
    from rich.progress import Progress

    from ..api import dense_matcher
    from ..bench.pck import evaluate_pck, read_pairs

    _quiet_libraries()
    pairs = read_pairs(root, split, categories)
    matcher = dense_matcher(model, device, layer=layer, facet=facet_name, log_bin=log_bin,
                            image_size=image_size, stride=stride)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("pairs", total=len(pairs))
        result = evaluate_pck(matcher, pairs, _floats(alpha, "--alpha"), on_advance=lambda k: progress.advance(task, k))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title=f"PCK on {root} ({split}, {result.pairs} pairs, {result.points} points)", title_justify="left")
    table.add_column("category")
    for a in result.alphas:
        table.add_column(f"PCK@{a}", justify="right")
    table.add_column("points", justify="right")
    for cat, r in result.per_category.items():
        table.add_row(cat, *[f"{100 * r[f'pck@{a}']:.1f}" for a in result.alphas], str(r["points"]))
    table.add_row("[bold]mean", *[f"[bold]{100 * result.mean[f'pck@{a}']:.1f}" for a in result.alphas], str(result.points))
    out.print(table)


MetricsOption = Annotated[str, typer.Option("--metric", help="aas, cosine, style, or all.")]
CacheOption = Annotated[Optional[Path], typer.Option(help="Keep descriptors in this database between runs.")]


def _metrics(metric: str) -> tuple[str, ...]:
    from ..bench.features import METRICS

    return METRICS if metric == "all" else tuple(m.strip() for m in metric.split(","))


def _progress_callbacks(progress, label: str):
    task = progress.add_task(label, total=None)
    return (lambda n: progress.update(task, total=n)), (lambda n: progress.advance(task, n))


@app.command()
def score(
    ref: Annotated[Path, typer.Option("--ref", help="Reference image or folder.")],
    gen: Annotated[Path, typer.Option("--gen", help="Folder (or image) of generated images.")],
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="CSV with columns ref,gen.")] = None,
    all_pairs: Annotated[bool, typer.Option(help="Every generated image against every reference.")] = False,
    metric: MetricsOption = "all",
    out_file: Annotated[Optional[Path], typer.Option("--out", help="report.json, or .csv for per-pair rows.")] = None,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="HTML report with thumbnails.")] = None,
    model: Annotated[Optional[str], typer.Option()] = None,
    cache: CacheOption = None,
    device: DeviceOption = "auto",
):
    """Score generated images against their references (content, style, AAS)."""
    from rich.progress import Progress

    from ..scoring import score as run_score, write_score_html

    _quiet_libraries()
    with Progress(console=err, transient=True) as progress:
        on_total, on_advance = _progress_callbacks(progress, "embedding")
        report, fs = run_score(ref, gen, pairs, all_pairs, _metrics(metric), cache=cache, model=model,
                               device=device, on_total=on_total, on_advance=on_advance)
    try:
        if out_file:
            err.print(f"wrote {report.write(out_file)}", highlight=False)
        if html_out:
            err.print(f"wrote {write_score_html(report, fs, html_out)}", highlight=False)
    finally:
        fs.close()
    for item in report.failed:
        err.print(f"[yellow]failed[/]: {item['path']}: {item['reason']}", highlight=False, soft_wrap=True)
    if report.unmatched:
        err.print(f"{len(report.unmatched)} generated images match no reference (first: {report.unmatched[0]})",
                  highlight=False)
    table = Table(title=f"{len(report.pairs)} pairs", title_justify="left")
    table.add_column("reference", overflow="fold")
    for m in report.metrics:
        table.add_column(f"{m} mean ± std", justify="right")
    table.add_column("n", justify="right")
    for r, summ in report.per_reference.items():
        shown = os.path.relpath(r, ref if ref.is_dir() else ref.parent)
        table.add_row(escape(shown), *[f"{summ[m]['mean']:.4f} ± {summ[m]['std']:.4f}" for m in report.metrics],
                      str(summ[report.metrics[0]]["count"]))
    table.add_row("[bold]overall", *[f"[bold]{report.overall[m]['mean']:.4f} ± {report.overall[m]['std']:.4f}"
                                     for m in report.metrics], str(len(report.pairs)))
    out.print(table)


def _print_bench(result, as_json: bool, out_file: Optional[Path]):
    if out_file:
        out_file.write_text(json.dumps(result.to_dict(), indent=2))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    for p, reason in result.failed:
        err.print(f"[yellow]failed[/]: {p}: {reason}", highlight=False, soft_wrap=True)
    stats = sorted({k for m in result.metrics.values() for k in m if k != "queries"},
                   key=lambda k: ("triplet" not in k and "ordering" not in k, k))
    table = Table(title=f"{result.protocol} on {result.root}: {result.images} images, {result.groups} groups",
                  title_justify="left")
    table.add_column("metric")
    for s in stats:
        table.add_column(s.replace("_", " "), justify="right")
    for m, values in result.metrics.items():
        cells = []
        for s in stats:
            v = values.get(s)
            if isinstance(v, dict):  # an estimate with its 95% interval
                cells.append(escape(f"{100 * v['value']:.1f} [{100 * v['ci95'][0]:.1f}, {100 * v['ci95'][1]:.1f}] n={v['n']}"))
            else:
                cells.append("" if v is None else f"{100 * v:.1f}")
        table.add_row(m, *cells)
    out.print(table)
    out.print("percent; \\[low, high] is the 95% Wilson interval", style="dim")


def _bench(fn, root: Path, as_json: bool, out_file: Optional[Path], **kw):
    from rich.progress import Progress

    _quiet_libraries()
    with Progress(console=err, transient=True) as progress:
        result = fn(root, progress=_progress_callbacks(progress, "embedding"), **kw)
    _print_bench(result, as_json, out_file)


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
OutOption = Annotated[Optional[Path], typer.Option("--out", help="Also write the JSON here.")]


@bench_app.command("groups")
def bench_groups(
    root: Annotated[Path, typer.Argument(help="ROOT/<group>/<image>.")],
    mode: Annotated[str, typer.Option(help="content or style.")] = "content",
    metric: MetricsOption = "all",
    triplets: Annotated[int, typer.Option(min=1, help="Seeded triplet sample size.")] = 2000,
    seed: int = 0,
    model: Annotated[Optional[str], typer.Option()] = None,
    cache: CacheOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    out_file: OutOption = None,
):
    """Triplet accuracy, leave-one-out mAP and recall@k of every metric on grouped folders."""
    from ..bench.suites import evaluate_groups

    _bench(evaluate_groups, root, as_json, out_file, mode=mode, metrics=_metrics(metric), triplets=triplets,
           seed=seed, model=model, cache=cache, device=device)


@bench_app.command("sref")
def bench_sref(
    root: Annotated[Path, typer.Argument(help="ROOT/<style>/<image>.")],
    metric: MetricsOption = "all",
    triplets: Annotated[int, typer.Option(min=1)] = 2000,
    seed: int = 0,
    model: Annotated[Optional[str], typer.Option()] = None,
    cache: CacheOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    out_file: OutOption = None,
):
    """The Sref protocol (style groups) on a folder in its layout."""
    from ..bench.suites import evaluate_sref

    _bench(evaluate_sref, root, as_json, out_file, metrics=_metrics(metric), triplets=triplets, seed=seed,
           model=model, cache=cache, device=device)


@bench_app.command("ip")
def bench_ip(
    root: Annotated[Path, typer.Argument(help="ROOT/<ip>/reference.<ext> and <weight>.<ext>.")],
    metric: MetricsOption = "all",
    model: Annotated[Optional[str], typer.Option()] = None,
    cache: CacheOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    out_file: OutOption = None,
):
    """The IP protocol: higher-weight variants must score closer to their reference."""
    from ..bench.suites import evaluate_ip

    _bench(evaluate_ip, root, as_json, out_file, metrics=_metrics(metric), model=model, cache=cache, device=device)


def main() -> None:
    try:
        app()
    except SimsearchError as e:
        err.print(f"[red]error[/]: {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted: what was committed is kept; run the same command again to resume")
        sys.exit(130)
