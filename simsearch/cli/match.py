"""`simsearch match`: dense correspondences between two images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import FeaturesOption, MatcherOptions, err, esc, note, out, quiet_libraries, with_option_blocks


def parse_points(text: str) -> list[tuple[float, float]]:
    from ..errors import SimsearchError

    try:
        pts = [tuple(float(v) for v in p.split(",")) for p in text.replace(" ", "").split(";") if p]
    except ValueError:
        pts = []
    if not pts or any(len(p) != 2 for p in pts):
        raise SimsearchError(f"--points {text!r}: expected 'x,y;x,y;...' in pixels of image A")
    return pts


@with_option_blocks
def match(
    image_a: Annotated[Path, typer.Argument(help="Image A.")],
    image_b: Annotated[Path, typer.Argument(help="Image B.")],
    points: Annotated[Optional[str], typer.Option(help="Points in A as 'x,y;x,y' (pixels).")] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="Number of best-buddy pairs.")] = 10,
    method: Annotated[str, typer.Option(help="nn or best-buddies (without --points), or ldm (Hedlin et al.; needs --points and an SD --model).")] = "best-buddies",
    features: FeaturesOption = "dino",
    matching: MatcherOptions = MatcherOptions(),
    steps: Annotated[Optional[int], typer.Option(min=1, help="ldm: optimisation steps per repeat (100).")] = None,
    repeats: Annotated[Optional[int], typer.Option(min=1, help="ldm: optimised prompts averaged per point (5).")] = None,
    seed: Annotated[int, typer.Option(help="ldm: seed of every random draw.")] = 0,
    out_png: Annotated[Optional[Path], typer.Option("--out", help="Side-by-side picture of the matches.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
):
    """Dense correspondences from A to B: given points, or the n best-buddy pairs."""
    from rich.progress import Progress

    from ..api import match_images

    quiet_libraries()
    pts = parse_points(points) if points else None
    with Progress(console=err, transient=True, disable=method != "ldm") as progress:
        task = progress.add_task("points", total=len(pts or []))
        result = match_images(image_a, image_b, points=pts, n=n, method=method, features=features, out=out_png,
                              on_point=lambda k: progress.advance(task, k), **matching.kwargs(),
                              ldm={"steps": steps, "repeats": repeats, "seed": seed, "image_size": matching.image_size})
    if as_json:
        print(json.dumps({"a": str(image_a), "b": str(image_b), "matches": result.to_dicts()}))
    else:
        table = Table(title=f"{esc(image_a)} -> {esc(image_b)}", title_justify="left")
        for col in ("#", "A (x, y)", "B (x, y)", "confidence"):
            table.add_column(col, justify="right")
        for i, m in enumerate(result.to_dicts(), 1):
            table.add_row(str(i), f"{m['a'][0]:.1f}, {m['a'][1]:.1f}", f"{m['b'][0]:.1f}, {m['b'][1]:.1f}",
                          f"{m['confidence']:.3f}")
        out.print(table)
    if out_png:
        note(f"wrote {out_png}")
