"""`simsearch query`: the top-k images like a query image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import DEFAULT_DB, DbOption, DeviceOption, RuntimeOption, cell, esc, note, out, quiet_libraries


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1 else f"{value:.4f}"


def query(
    image: Annotated[Path, typer.Argument(help="Query image.")],
    db: DbOption = DEFAULT_DB,
    mode: Annotated[str, typer.Option(help="content or style.")] = "content",
    k: Annotated[int, typer.Option("-k", "--top-k", help="Number of hits.")] = 10,
    where: Annotated[Optional[str], typer.Option(help="SQL filter, e.g. \"path LIKE '%/cats/%'\".")] = None,
    model: Annotated[Optional[str], typer.Option(help="Must match the database's model, if given.")] = None,
    device: DeviceOption = "auto",
    runtime: RuntimeOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    rerank: Annotated[Optional[str], typer.Option(help="Rerank the first-stage hits: verified (the default when no name is given: geometric verification of patch correspondences), aas, matches or both.")] = None,
    candidates: Annotated[Optional[int], typer.Option(min=1, help="First-stage hits to rerank (default 50; 100 with --box).")] = None,
    box: Annotated[Optional[str], typer.Option(
        help="x0,y0,x1,y1: find the images that contain this region of IMAGE (pixels); reranked by verified unless --rerank names another.")] = None,
    nprobe: Annotated[Optional[int], typer.Option(min=1, help="IVF lists probed (large databases): more is slower and closer to exact.")] = None,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained results page.")] = None,
    coseg_dir: Annotated[Optional[Path], typer.Option(
        "--coseg", help="Co-segment the query with its hits into this folder (masks, overlays, coseg.html).")] = None,
):
    """Print the top-k images like IMAGE."""
    from ..errors import EmptyIndexError, ImageError
    from ..paths import database_exists

    # cheap checks before torch and LanceDB load (0.5 s instead of several)
    if not image.is_file():
        raise ImageError(image, "no such file" if not image.exists() else "not a file")
    if not database_exists(db):
        raise EmptyIndexError(f"{db}: no simsearch database here", db=db)
    from ..index import Index

    quiet_libraries()
    idx = Index(db, model=model, device=device, runtime=runtime, **({"nprobe": nprobe} if nprobe else {}))
    hits = idx.search(image, k=k, mode=mode, where=where, rerank=rerank, candidates=candidates,
                      box=box)
    if html_out:
        from ..report import write_results_html

        note(f"wrote {write_results_html(idx, image, hits, html_out, mode)}")
    if coseg_dir:
        from ..coseg import QUERY_CONFIG, query_set
        from .coseg import run

        run(query_set(image, hits), coseg_dir, QUERY_CONFIG, coseg_dir / "coseg.html",
            title=f"co-segmentation of {image.name} and its hits", backbone=idx.embedder.backbone)
    if as_json:
        for hit in hits:
            print(json.dumps(hit.to_dict()))
        return
    table = Table(title=f"{mode} matches for {esc(image)}", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    extra = list(hits[0].scores) if hits and hits[0].scores else []
    for name in extra:
        table.add_column(name.replace("_", " "), justify="right")
    table.add_column("path", overflow="fold")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", *[_number(hit.scores[n]) for n in extra], cell(hit.path))
    out.print(table)
