"""The `simsearch` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
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
):
    """Embed every image under FOLDER into the database; incremental and resumable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..index import Index

    _quiet_libraries()
    overrides = {k: v for k, v in {"image_size": image_size, "dense_dtype": dense_dtype}.items() if v is not None}
    idx = Index(db, model=model, device=device, **overrides)
    columns = [TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("index", total=None, rate="")

        def advance(n: int):
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:.1f} img/s" if speed else "")

        report = idx.add_folder(folder, batch_size=batch_size, prune=prune,
                                on_total=lambda n: progress.update(task, total=n), on_advance=advance)
    for path, reason in report.failed:
        err.print(f"[yellow]failed[/]: {path}: {reason}", highlight=False, soft_wrap=True)
    out.print(f"added {report.added} · updated {report.updated} · skipped {report.skipped} · "
              f"failed {len(report.failed)}" + (f" · pruned {report.pruned}" if prune else "") +
              f" · {report.images_per_s:.1f} img/s · {idx.count()} images in {db}", highlight=False)


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
):
    """Print the top-k images like IMAGE."""
    from ..errors import EmptyIndexError, ImageError
    from ..index import Index

    if not image.is_file():
        raise ImageError(image, "no such file" if not image.exists() else "not a file")
    if not (Path(db) / "images.lance").exists():
        raise EmptyIndexError(f"{db}: no simsearch database here (run `simsearch index FOLDER --db {db}`)")
    _quiet_libraries()
    hits = Index(db, model=model, device=device).search(image, k=k, mode=mode, where=where)
    if as_json:
        for hit in hits:
            print(json.dumps(hit.to_dict()))
        return
    table = Table(title=f"{mode} matches for {image}", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("path", overflow="fold")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.path)
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


def main() -> None:
    try:
        app()
    except SimsearchError as e:
        err.print(f"[red]error[/]: {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted: what was committed is kept; run the same command again to resume")
        sys.exit(130)
