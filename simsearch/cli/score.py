"""`simsearch score`: generated images against their references."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import (EmbeddingOptions, MetricsOption, cell, err, note, out, parse_metrics, progress_callbacks,
                      quiet_libraries, warn_failed, with_option_blocks)


@with_option_blocks
def score(
    ref: Annotated[Path, typer.Option("--ref", help="Reference image or folder.")],
    gen: Annotated[Path, typer.Option("--gen", help="Folder (or image) of generated images.")],
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="CSV with columns ref,gen.")] = None,
    all_pairs: Annotated[bool, typer.Option(help="Every generated image against every reference.")] = False,
    metric: MetricsOption = "all",
    out_file: Annotated[Optional[Path], typer.Option("--out", help="report.json, or .csv for per-pair rows.")] = None,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="HTML report with thumbnails.")] = None,
    embedding: EmbeddingOptions = EmbeddingOptions(),
):
    """Score generated images against their references (content, style, AAS)."""
    from rich.progress import Progress

    from ..paths import normalize
    from ..scoring import score as run_score, write_score_html

    quiet_libraries()
    with Progress(console=err, transient=True) as progress:
        on_total, on_advance = progress_callbacks(progress, "embedding")
        report, fs = run_score(ref, gen, pairs, all_pairs, parse_metrics(metric), on_total=on_total,
                               on_advance=on_advance, **embedding.kwargs())
    try:
        if out_file:
            note(f"wrote {report.write(out_file)}")
        if html_out:
            note(f"wrote {write_score_html(report, fs, html_out)}")
    finally:
        fs.close()
    warn_failed((item["path"], item["reason"]) for item in report.failed)
    if report.unmatched:
        note(f"{len(report.unmatched)} generated images match no reference (first: {report.unmatched[0]})")
    table = Table(title=f"{len(report.pairs)} pairs", title_justify="left")
    table.add_column("reference", overflow="fold")
    for m in report.metrics:
        table.add_column(f"{m} mean ± std", justify="right")
    table.add_column("n", justify="right")
    base = normalize(ref if ref.is_dir() else ref.parent)
    for r, summ in report.per_reference.items():
        table.add_row(cell(os.path.relpath(r, base)), *[f"{summ[m]['mean']:.4f} ± {summ[m]['std']:.4f}" for m in report.metrics],
                      str(summ[report.metrics[0]]["count"]))
    table.add_row("[bold]overall", *[f"[bold]{report.overall[m]['mean']:.4f} ± {report.overall[m]['std']:.4f}"
                                     for m in report.metrics], str(len(report.pairs)))
    out.print(table)
