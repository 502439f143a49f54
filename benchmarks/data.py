"""Real grouped-folder benchmark data, built from Debian packages (no network beyond apt).

    python benchmarks/data.py [--root DIR]        # default $SIMSEARCH_DATA or ~/.cache/simsearch-data

Each dataset is a folder ROOT/<dataset>/<group>/<image> (the grouped-folder format of DESIGN.md):

    tuxpaint-categories  stamps by category (animals-birds, food-fruit, ...), from tuxpaint-stamps-default
    tuxpaint-style       photo vs cartoon stamps of the same categories
    card-decks           13 cards (one per rank) from each of the 16 KDE decks; group = deck (style)
    card-ranks           the same images; group = card (content)

Packages are fetched with `apt-get download` (no install) into ROOT/debs and unpacked with `dpkg -x`
into ROOT/pkgs. Dataset folders hold relative symlinks into ROOT/pkgs (tuxpaint) or ROOT/rendered
(cards). A dataset folder appears only when complete, so re-running skips finished work; delete a
folder to rebuild it.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from common import data_root
from simsearch.bench.fixtures import debian_package, spread  # noqa: F401 (spread: for the datasets)

MIN_GROUP = 5  # groups with fewer images are skipped
CARD_HEIGHT = 200  # rendered card height in pixels
# One card per rank, suits cycled, so a rank group is never one suit's pips only.
CARDS = [f"{rank}_{suit}" for rank, suit in zip(
    ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "jack", "queen", "king"],
    ["spade", "heart", "diamond", "club"] * 4)]
STAMPS = "usr/share/tuxpaint/stamps"
DECKS = "usr/share/carddecks"


def fetch(root: Path, package: str) -> Path:
    """The unpacked tree of a Debian package under `root`, downloaded if need be."""
    return debian_package(package, root)


# ---- datasets: each returns {group: [image paths]} ------------------------------------------------

def _stamps(root: Path) -> list[tuple[tuple[str, ...], Path]]:
    """(folders below stamps/, png) for every stamp except the pre-mirrored copies (`*_mirror.png`)."""
    base = fetch(root, "tuxpaint-stamps-default") / STAMPS
    return [(p.relative_to(base).parent.parts, p) for p in base.rglob("*.png") if not p.stem.endswith("_mirror")]


def tuxpaint_categories(root: Path) -> dict[str, list[Path]]:
    """Group = the first two folders below stamps/ (`animals-birds`), `cartoon/` folders ignored;
    stamps lying directly in a top folder group under it (`sports`)."""
    groups: dict[str, list[Path]] = {}
    for folders, p in _stamps(root):
        groups.setdefault("-".join([d for d in folders if d != "cartoon"][:2]), []).append(p)
    return groups


def tuxpaint_style(root: Path) -> dict[str, list[Path]]:
    """`cartoon/` folders hold drawings; the stamps beside a `cartoon/` folder are (mostly) cut-out
    photos of the same subjects, so style is not confounded with category."""
    groups: dict[str, list[Path]] = {"cartoon": [], "photo": []}
    for folders, p in _stamps(root):
        if folders[-1:] == ("cartoon",):
            groups["cartoon"].append(p)
        elif (p.parent / "cartoon").is_dir():
            groups["photo"].append(p)
    return groups


def _rsvg(root: Path) -> str:
    """rsvg-convert from PATH, else from the unpacked Debian package librsvg2-bin."""
    exe = shutil.which("rsvg-convert") or str(fetch(root, "librsvg2-bin") / "usr/bin/rsvg-convert")
    try:
        run([exe, "--version"])
    except (subprocess.CalledProcessError, OSError) as e:
        sys.exit(f"rsvg-convert does not run ({e}); install it: apt-get install librsvg2-bin")
    return exe


def _render(rsvg: str, svg: Path, node: ET.Element, out: Path) -> None:
    """One card to a PNG CARD_HEIGHT pixels high, cropped to its visible pixels."""
    href = node.get("{http://www.w3.org/1999/xlink}href") or node.get("href") or ""
    if node.tag.endswith("image") and href.startswith("data:"):
        # Raster decks (konqi-modern, xskat-french) embed one PNG per card; rsvg cannot export those.
        img = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))).convert("RGBA")
    else:
        # rsvg's export box is often much larger than the card (filters, stray geometry): render at
        # zoom 1 to find the card's opaque box, then again at the zoom that makes it CARD_HEIGHT high.
        def draw(zoom: float) -> Image.Image:
            png = subprocess.run([rsvg, "-i", node.get("id"), "-z", f"{zoom:.4f}", str(svg)],
                                 check=True, capture_output=True).stdout
            img = Image.open(io.BytesIO(png)).convert("RGBA")
            if (box := img.getchannel("A").getbbox()) is None:
                sys.exit(f"{svg}: card '{node.get('id')}' renders empty")
            return img.crop(box)
        img = draw(CARD_HEIGHT / draw(1.0).height)
    img = img.resize((round(img.width * CARD_HEIGHT / img.height), CARD_HEIGHT), Image.Resampling.LANCZOS)
    img.save(tmp := out.with_suffix(".part.png"))
    tmp.rename(out)  # a crash never leaves a half-written card that a re-run would skip


def _cards(root: Path) -> list[tuple[str, str, Path]]:
    """(deck, card, png) for every deck and every card in CARDS, rendering what is missing."""
    decks = fetch(root, "kdegames-card-data-kf5") / DECKS
    rendered, rsvg, out = root / "rendered" / "cards", None, []
    for svg in sorted(decks.glob("*/*.svgz")):
        deck = svg.parent.name.removeprefix("svg-")
        (rendered / deck).mkdir(parents=True, exist_ok=True)
        todo = [c for c in CARDS if not (rendered / deck / f"{c}.png").exists()]
        if todo:
            print(f"rendering {deck}: {len(todo)} cards", file=sys.stderr)
            rsvg = rsvg or _rsvg(root)
            with gzip.open(svg) as f:
                nodes = {n.get("id"): n for n in ET.parse(f).iter() if n.get("id") in todo}
            for card in todo:
                if card not in nodes:
                    sys.exit(f"{svg}: no element with id '{card}'")
                _render(rsvg, svg, nodes[card], rendered / deck / f"{card}.png")
        out += [(deck, c, rendered / deck / f"{c}.png") for c in CARDS]
    return out


def card_decks(root: Path) -> dict[str, list[Path]]:
    return _group_by(_cards(root), 0)


def card_ranks(root: Path) -> dict[str, list[Path]]:
    return _group_by(_cards(root), 1)


def _group_by(rows: list[tuple], key: int) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row[-1])
    return groups


# name -> (builder, cap per group, what a group is). Caps keep the benchmark to minutes on 2 CPU cores.
DATASETS = {
    "tuxpaint-categories": (tuxpaint_categories, 30, "content"),
    "tuxpaint-style": (tuxpaint_style, 60, "style"),
    "card-decks": (card_decks, 13, "style"),
    "card-ranks": (card_ranks, 16, "content"),
}


def build(root: Path, name: str) -> Path:
    """Materialise ROOT/<name>/<group>/<image> as relative symlinks; skipped when it exists."""
    dest = root / name
    if dest.is_dir():
        return dest
    builder, cap, _ = DATASETS[name]
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    for group, paths in sorted(builder(root).items()):
        if len(paths) < MIN_GROUP:
            continue
        for src in spread(paths, cap):
            # File name from the source path's tail (`fruit__cartoon__apple.png`, `cards__oxygen__1_spade.png`):
            # says where the image came from; a collision fails loudly in symlink_to.
            link = tmp / group / "__".join(src.parts[-3:])
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(os.path.relpath(src, dest / group))
    tmp.chmod(0o755)  # mkdtemp makes it private
    tmp.rename(dest)
    return dest


def summary(folder: Path) -> str:
    sizes = [len(list(g.iterdir())) for g in folder.iterdir() if g.is_dir()]
    return f"{folder}: {len(sizes)} groups, {sum(sizes)} images (per group {min(sizes)}..{max(sizes)})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=data_root())
    ap.add_argument("datasets", nargs="*", default=list(DATASETS), help="default: all")
    args = ap.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        print(summary(build(args.root.resolve(), name)))


if __name__ == "__main__":
    main()
