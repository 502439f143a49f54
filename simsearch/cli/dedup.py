"""`simsearch dedup`: exact and near-duplicate groups, or one set's copies in another. Never deletes."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import DEFAULT_DB, DbOption, DeviceOption, ModelOption, cell, err, esc, note, out, quiet_libraries, warn_failed


def dedup(
    folder: Annotated[Optional[Path], typer.Argument(help="Index this folder first (incrementally), then look only at the images under it. Default: the whole database.")] = None,
    db: DbOption = DEFAULT_DB,
    threshold: Annotated[Optional[float], typer.Option(help="Verified score a near-duplicate pair needs; re-groups from the stored pair scores (nothing is embedded or verified again).")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(help="Block correlation of the two thumbnails, aligned by the verified transform, a near-duplicate pair needs beside --threshold; re-groups from the stored pair scores.")] = None,
    min_cosine: Annotated[Optional[float], typer.Option(help="Content cosine a content neighbour needs to be verified (each image's style neighbours, simsearch.dedup.STYLE_K of them at style cosine >= MIN_STYLE, are verified besides).")] = None,
    k: Annotated[Optional[int], typer.Option("-k", min=1, help="Content neighbours searched per image (besides its style neighbours).")] = None,
    against: Annotated[Optional[Path], typer.Option(help="A folder or database: list the images of this set that have a copy there (train/test leakage).")] = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV: group, member, role, score, inliers, agreement, bytes_reclaimable.")] = False,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained gallery of the groups.")] = None,
):
    """Exact duplicates (same content hash) and near-duplicate groups verified by geometric matching and
    by their pixels, each around the image to keep: the largest resolution of what the copies share,
    then the most verified copies, then a lossless format, then the larger file, then the oldest. Read-only: never deletes or moves a file."""
    from ..errors import EmptyIndexError, ImageError
    from ..paths import database_exists

    if folder is not None and not folder.expanduser().exists():
        raise ImageError(folder, "no such file or directory")
    if folder is None and not database_exists(db):
        raise EmptyIndexError(f"{db}: no simsearch database here (run `simsearch index FOLDER --db {db}` or give a FOLDER)")
    if against is not None and not against.expanduser().exists():
        raise ImageError(against, "no such file or directory")
    from rich.progress import Progress

    from .. import dedup as lib
    from ..index import Index
    from ._common import progress_callbacks

    quiet_libraries()
    idx = Index(db, model=model, device=device)
    failed = []
    with Progress(console=err, transient=True) as progress:
        if folder is not None:
            total, advance = progress_callbacks(progress, "indexing")
            report = idx.add_folder(folder, on_total=total, on_advance=advance)
            failed += report.failed
        other = None
        if against is not None:
            total, advance = progress_callbacks(progress, "indexing the reference")
            other, ref_report = lib.open_reference(idx, against, on_total=total, on_advance=advance)
            failed += ref_report.failed if ref_report else []
        _, advance = progress_callbacks(progress, "verifying pairs")
        options = dict(under=str(folder) if folder is not None else None, threshold=threshold, k=k,
                       min_cosine=min_cosine, min_agreement=min_agreement, on_advance=advance)
        result = lib.find_copies_in(idx, other, **options) if other is not None else lib.find_duplicates(idx, **options)
    result.failed = failed
    warn_failed(failed)
    if html_out:
        from ..report import write_dedup_html

        note(f"wrote {write_dedup_html(idx, result, html_out, other)}")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    if as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=lib.CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(result.rows())
        return
    what = f"copies in {esc(against)}" if against is not None else "duplicates"
    table = Table(title=f"{what} among {result.images} images of {esc(db)}", title_justify="left")
    for name, justify in (("group", "right"), ("role", "left"), ("score", "right"), ("inliers", "right"),
                          ("agreement", "right"), ("bytes", "right"), ("path", "left")):
        table.add_column(name, justify=justify, overflow="fold" if name == "path" else None)
    for g in result.groups:
        for m in g.members:
            table.add_row(str(g.group), m.role + (" (ref)" if m.set == "ref" else ""), f"{m.score:.3f}",
                          str(m.inliers), f"{m.agreement:.2f}", f"{m.bytes:,}", cell(m.path), end_section=m is g.members[-1])
    if result.groups:
        out.print(table)
    out.print(f"{len(result.groups)} groups · {result.reclaimable_bytes:,} bytes reclaimable · "
              f"{result.pairs_verified} verified pairs ({result.new_pairs_verified} verified now) · "
              f"threshold {result.threshold:g}, agreement {result.min_agreement:g} · nothing was deleted or moved", highlight=False, soft_wrap=True)
