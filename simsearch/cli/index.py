"""`simsearch index` and `simsearch info`: building a database and describing it."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import (DEFAULT_DB, DbOption, DeviceOption, IpAdapterOption, ModelOption, NoiseSeedOption, RuntimeOption,
                      TimestepOption, cell, err, esc, note, out, quiet_libraries, warn_failed)


def index(
    folder: Annotated[str, typer.Argument(help="Folder of images (searched recursively); with --engine ray also a URI (s3://bucket/prefix).")],
    db: DbOption = DEFAULT_DB,
    model: ModelOption = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    device: DeviceOption = "auto",
    runtime: RuntimeOption = "auto",
    prune: Annotated[bool, typer.Option(help="Remove rows of files under FOLDER that are gone.")] = False,
    image_size: Annotated[Optional[int], typer.Option(help="Model input side (new databases only).")] = None,
    dense_dtype: Annotated[Optional[str], typer.Option(help="float16 or int8, for --dense-codec raw (new databases only).")] = None,
    dense_codec: Annotated[Optional[str], typer.Option(help="raw (--dense-dtype) or pca (learned, <= 64 KB/image): how dense tensors are stored (new databases only).")] = None,
    content_layer: Annotated[Optional[str], typer.Option(help="Layer (ViT block or UNet module) giving the content vector.")] = None,
    style_layer: Annotated[Optional[str], typer.Option(help="Layer whose features give the style statistics; several joined by + (3+4+5).")] = None,
    style_pooling: Annotated[Optional[str], typer.Option(help="Style statistics: meanstd, cov, cov<k> (k random directions), or several joined by + (new databases only).")] = None,
    dense_layer: Annotated[Optional[str], typer.Option(help="Attention layer whose source is stored for reranking.")] = None,
    timestep: TimestepOption = None,
    noise_seed: NoiseSeedOption = None,
    ip_adapter: IpAdapterOption = None,
    commit_every: Annotated[int, typer.Option(min=1, help="Rows per LanceDB commit (what a kill can lose).")] = 256,
    engine: Annotated[str, typer.Option(help="local, or ray: embed on a Ray cluster (an actor pool, one model each).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join (auto, ray://host:10001); default: a local one.")] = None,
):
    """Embed every image under FOLDER into the database; incremental and resumable."""
    from ..indexers import check_source

    check_source(folder, engine)  # before the model and the table load
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..index import Index
    from ..embedder import parse_layer

    quiet_libraries()
    overrides = {k: v for k, v in dict(image_size=image_size, dense_dtype=dense_dtype, content_layer=parse_layer(content_layer),
                                       style_layer=parse_layer(style_layer), style_pooling=style_pooling,
                                       dense_layer=parse_layer(dense_layer),
                                       timestep=timestep, noise_seed=noise_seed, ip_adapter=ip_adapter).items() if v is not None}
    from ..backbones.runtime import recorded_choice

    idx = Index(db, model=model, device=device, dense_codec=dense_codec, runtime=runtime, **overrides)
    if runtime == "auto" and recorded_choice() is None:
        note("measuring which runtime is fastest on this machine (once) ...")
    ran = idx.embedder.runtime_for(batch_size)
    idx.ensure_table()  # loads the model and checks the configuration before the progress bar starts
    columns = [TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("index", total=None, rate="")

        def advance(n: int):
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:.1f} img/s" if speed else "")

        report = idx.add_folder(folder, batch_size=batch_size, prune=prune, write_rows=commit_every, engine=engine,
                                on_total=lambda n: progress.update(task, total=n), on_advance=advance,
                                **({"address": address} if engine == "ray" else {}))
    warn_failed(report.failed)
    out.print(f"added {report.added} · updated {report.updated} · skipped {report.skipped} · "
              f"failed {len(report.failed)}" + (f" · pruned {report.pruned}" if prune else "") +
              f" · {report.images_per_s:.1f} img/s · runtime {ran}{' (auto)' if runtime == 'auto' else ''}"
              f" · {idx.count()} images in {esc(db)}", highlight=False, soft_wrap=True)


def info(db: DbOption = DEFAULT_DB, as_json: Annotated[bool, typer.Option("--json")] = False):
    """Rows, model and descriptor configuration, index state, bytes per image."""
    from ..index import Index

    data = Index(db).info()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, title=esc(db), title_justify="left")
    table.add_row("images", str(data["rows"]))
    table.add_row("table version", str(data["table_version"]))
    for key, value in data["config"].items():
        table.add_row(key.replace("_", " "), cell(value))
    table.add_row("weights fingerprint", data["weights"])
    d = data["dense"]
    table.add_row("dense tensor", f"{d['shape'][0]}x{d['shape'][1]} {d['dtype']}, {d['bytes_per_image']:,} B/image")
    table.add_row("on disk", f"{data['disk_bytes']:,} B ({data['disk_bytes_per_image']:,} B/image)")
    for column, state in data["ann"].items():
        table.add_row(f"faiss {column}", " ".join(f"{k}={v}" for k, v in state.items()))
    table.add_row("runtime auto (this machine)", cell(data["runtime"]["auto_on_this_machine"]))
    out.print(table)
