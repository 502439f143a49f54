"""`simsearch coseg`: co-segmentation (and part co-segmentation) of an image set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import (
    DeviceOption,
    ImageSizeOption,
    ModelOption,
    StrideOption,
    cell,
    note,
    out,
    quiet_libraries,
    warn_failed,
)

OutDirOption = Annotated[Path, typer.Option("--out", help="Folder for the masks and overlays.")]
PartsOption = Annotated[Optional[int], typer.Option(min=1, help="Also split the common object into N parts.")]


def coseg(
    inputs: Annotated[list[Path], typer.Argument(help="Images, or folders of images.")],
    out_dir: OutDirOption,
    parts: PartsOption = None,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained page.")] = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    image_size: ImageSizeOption = None,
    stride: StrideOption = None,
    layer: Annotated[Optional[int], typer.Option(help="ViT block (default: the last).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Saliency threshold of the vote (0.065).")] = None,
    elbow: Annotated[Optional[float], typer.Option(help="Elbow coefficient for k (0.975).")] = None,
    votes: Annotated[Optional[float], typer.Option(help="Share of images a cluster must be salient in (0.75).")] = None,
    outliers: Annotated[Optional[float], typer.Option(
        "--outlier-threshold", help="Drop images whose CLS has a cosine below this to the mean (theirs: 0.7).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
):
    """Co-segment the common object of a set of images: one mask per image (+ parts with --parts)."""
    from ..coseg import CosegConfig
    from ..errors import ImageError, SimsearchError
    from ..images import iter_image_files

    paths = []
    for p in inputs:
        if not p.exists():
            raise ImageError(p, "no such file or folder")
        paths += list(iter_image_files(p))
    if not paths:
        raise SimsearchError(f"{', '.join(map(str, inputs))}: no image files")
    settings = dict(image_size=image_size, stride=stride, layer=layer, saliency_threshold=threshold, elbow=elbow,
                    votes=votes, outlier_threshold=outliers, parts=parts)
    conf = CosegConfig(**{k: v for k, v in settings.items() if v is not None})
    quiet_libraries()
    report = run(paths, out_dir, conf, html_out, model=model, device=device)
    if as_json:
        for row in report.to_dicts():
            print(json.dumps(row))
    else:
        print_report(report)


def run(paths, out_dir: Path, conf, html_out: Path | None, title: str = "simsearch co-segmentation", **kw):
    """Co-segment with a progress bar on stderr; report unreadable files and what was written."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..coseg import cosegment_files
    from ._common import err

    with Progress(TextColumn("co-segment"), BarColumn(), MofNCompleteColumn(), console=err, transient=True) as progress:
        task = progress.add_task("coseg", total=len(paths))
        report = cosegment_files(paths, out_dir, conf, html_path=html_out, title=title,
                                 on_image=lambda: progress.advance(task), **kw)
    warn_failed(report.failed)
    for path, kept in zip(report.paths, report.result.inliers):
        if not kept:
            note(f"outlier (CLS far from the set's mean), left out: {path}")
    note(f"wrote {len(report.files)} masks and overlays to {out_dir}" + (f", and {report.html}" if report.html else ""))
    return report


def print_report(report) -> None:
    r = report.result
    table = Table(title=f"co-segmentation: k = {r.clusters} clusters, {len(r.foreground)} foreground",
                  title_justify="left")
    table.add_column("foreground", justify="right")
    if r.parts is not None:
        table.add_column("parts", justify="right")
    table.add_column("image", overflow="fold")
    for row in report.to_dicts():
        share = f"{100 * row['foreground']:.1f}%" if row["inlier"] else "outlier"
        part_cells = [" ".join(f"{100 * s:.0f}%" for s in row["part_shares"])] if r.parts is not None else []
        table.add_row(share, *part_cells, cell(row["path"]))
    out.print(table)
    if not len(r.foreground):
        note("no cluster was salient in enough images: the masks are empty (try a lower --threshold or --votes)")
