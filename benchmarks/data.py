"""Real grouped-folder benchmark data, built from Debian packages (no network beyond apt).

    python benchmarks/data.py [--root DIR]        # default $SIMSEARCH_DATA or ~/.cache/simsearch-data

Each dataset is a folder ROOT/<dataset>/<group>/<image> (the grouped-folder format of DESIGN.md):

    tuxpaint-categories  stamps by category (animals-birds, food-fruit, ...), from tuxpaint-stamps-default
    tuxpaint-style       photo vs cartoon stamps of the same categories
    card-decks           13 cards (one per rank) from each of the 16 KDE decks; group = deck (style)
    card-ranks           the same images; group = card (content)
    font-styles          12 words rendered in each of 24 fonts from 14 Debian font packages; group = font (style)
    font-words           the same images; group = word (instance across styles)
    icon-themes          28 standard icon names drawn by each of 9 Debian icon themes; group = theme (style)
    icon-names           the same images; group = icon name (instance across styles)

    python benchmarks/data.py suite               # all of them, capped, as ROOT/suite/<set> + suite.json

`suite` is the proxy suite of `simsearch bench suite` (benchmarks/quality_suite.py): every dataset,
capped to a few hundred images so that a set embeds in minutes on 2 CPU cores, with a manifest
ROOT/suite/suite.json naming each set's mode (style or content), what a group is, its source
packages, their licenses and its size. Sources and licenses (from each package's copyright file):

    tuxpaint-stamps-default  GPL-2                                   ~300 of 507 stamps (9 per category)
    kdegames-card-data-kf5   GPL-2+ / LGPL-2                         208 cards (16 decks x 13 ranks)
    fonts-dejavu-core (Bitstream Vera), fonts-urw-base35 (AGPL-3 with font exception), fonts-humor-sans, fonts-blankenburg,
    fonts-lobster, fonts-dancingscript, fonts-comic-neue, fonts-cantarell, fonts-ebgaramond, fonts-jura
    (OFL-1.1), fonts-inconsolata, fonts-breip (OFL-1.0), fonts-isabella (LGPL-2+), fonts-linuxlibertine
    (GPL-2+ with font exception / OFL-1.1)                           288 renderings (24 fonts x 12 words)
    adwaita-icon-theme (CC-BY-SA-3.0 or LGPL-3), tango-icon-theme (public domain), gnome-icon-theme
    (GPL-2+), oxygen-icon-theme, breeze-icon-theme (LGPL-3+),
    papirus-icon-theme (GPL-3), elementary-xfce-icon-theme (GPL-2+), faenza-icon-theme (GPL-3+),
    moka-icon-theme (CC-BY-SA-4.0 or GPL-3+)                         252 icons (9 themes x 28 names)

Packages are fetched with `apt-get download` (no install) into ROOT/debs and unpacked with `dpkg -x`
into ROOT/pkgs. Dataset folders hold relative symlinks into ROOT/pkgs (tuxpaint) or ROOT/rendered
(cards, fonts, icons). A dataset folder appears only when complete, so re-running skips finished work; delete a
folder to rebuild it.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from debian_data import data_root, debian_package
from simsearch.bench.fixtures import spread  # noqa: F401 (spread: for the datasets)

MIN_GROUP = 5  # groups with fewer images are skipped
CARD_HEIGHT = 200  # rendered card height in pixels
# One card per rank, suits cycled, so a rank group is never one suit's pips only.
CARDS = [f"{rank}_{suit}" for rank, suit in zip(
    ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "jack", "queen", "king"],
    ["spade", "heart", "diamond", "club"] * 4)]
STAMPS = "usr/share/tuxpaint/stamps"
DECKS = "usr/share/carddecks"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def run_bytes(cmd: list[str]) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True).stdout


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
            png = run_bytes([rsvg, "-i", node.get("id"), "-z", f"{zoom:.4f}", str(svg)])
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


# ---- fonts: the same words rendered in many fonts (font = style, word = instance) ------------------

# (Debian package, font file under usr/share/fonts, name): one face per design; metric clones of one
# design (Liberation / FreeFont vs URW's Times, Helvetica and Courier) are left out, they would be two
# groups of one style.
FONTS = [
    ("fonts-dejavu-core", "truetype/dejavu/DejaVuSans.ttf", "dejavu-sans"),
    ("fonts-dejavu-core", "truetype/dejavu/DejaVuSerif.ttf", "dejavu-serif"),
    ("fonts-dejavu-core", "truetype/dejavu/DejaVuSansMono.ttf", "dejavu-sans-mono"),
    ("fonts-urw-base35", "opentype/urw-base35/NimbusRoman-Regular.otf", "nimbus-roman"),
    ("fonts-urw-base35", "opentype/urw-base35/NimbusSans-Regular.otf", "nimbus-sans"),
    ("fonts-urw-base35", "opentype/urw-base35/NimbusMonoPS-Regular.otf", "nimbus-mono"),
    ("fonts-urw-base35", "opentype/urw-base35/C059-Roman.otf", "c059"),
    ("fonts-urw-base35", "opentype/urw-base35/P052-Roman.otf", "p052"),
    ("fonts-urw-base35", "opentype/urw-base35/URWBookman-Light.otf", "urw-bookman"),
    ("fonts-urw-base35", "opentype/urw-base35/URWGothic-Book.otf", "urw-gothic"),
    ("fonts-urw-base35", "opentype/urw-base35/Z003-MediumItalic.otf", "z003"),
    ("fonts-humor-sans", "truetype/humor-sans/Humor-Sans.ttf", "humor-sans"),
    ("fonts-blankenburg", "truetype/blankenburg/Blankenburg_UNZ1A.ttf", "blankenburg"),
    ("fonts-breip", "truetype/breip/Breip.ttf", "breip"),
    ("fonts-lobster", "opentype/lobster/lobster.otf", "lobster"),
    ("fonts-dancingscript", "opentype/dancingscript/DancingScript-Regular.otf", "dancing-script"),
    ("fonts-comic-neue", "opentype/comic-neue/ComicNeue-Regular.otf", "comic-neue"),
    ("fonts-cantarell", "opentype/cantarell/Cantarell-Regular.otf", "cantarell"),
    ("fonts-ebgaramond", "opentype/ebgaramond/EBGaramond12-Regular.otf", "eb-garamond"),
    ("fonts-isabella", "truetype/isabella/Isabella.ttf", "isabella"),
    ("fonts-jura", "opentype/jura/Jura-Regular.otf", "jura"),
    ("fonts-inconsolata", "truetype/inconsolata/Inconsolata.otf", "inconsolata"),
    ("fonts-linuxlibertine", "opentype/linux-libertine/LinLibertine_R.otf", "linux-libertine"),
    ("fonts-linuxlibertine", "opentype/linux-libertine/LinBiolinum_R.otf", "linux-biolinum"),
]
# Mixed case, ascenders and descenders, most of the alphabet between them.
WORDS = ["Quartz", "glyph", "Bakery", "jumps", "Waves", "fox", "Hydra", "vivid", "Kettle", "zombie", "Mix", "Dwelling"]
SIDE = 224  # rendered fonts and icons are SIDE x SIDE


def _render_word(font_file: Path, word: str, out: Path) -> None:
    """Black `word` on white, as large as fits 85% of the width and half the height, centred."""
    from PIL import ImageDraw, ImageFont

    size, box = 8, None
    for s in range(8, SIDE):
        b = ImageFont.truetype(str(font_file), s).getbbox(word)
        if b[2] - b[0] > 0.85 * SIDE or b[3] - b[1] > 0.5 * SIDE:
            break
        size, box = s, b
    img = Image.new("RGB", (SIDE, SIDE), "white")
    x, y = (SIDE - (box[2] - box[0])) / 2 - box[0], (SIDE - (box[3] - box[1])) / 2 - box[1]
    ImageDraw.Draw(img).text((x, y), word, font=ImageFont.truetype(str(font_file), size), fill="black")
    img.save(tmp := out.with_suffix(".part.png"))
    tmp.rename(out)


def _fonts(root: Path) -> list[tuple[str, str, Path]]:
    """(font, word, png) for every font of FONTS and word of WORDS, rendering what is missing."""
    rendered, out = root / "rendered" / "fonts", []
    for package, file, name in FONTS:
        (rendered / name).mkdir(parents=True, exist_ok=True)
        for word in WORDS:
            png = rendered / name / f"{word}.png"
            if not png.exists():
                _render_word(fetch(root, package) / "usr/share/fonts" / file, word, png)
            out.append((name, word, png))
    return out


def font_styles(root: Path) -> dict[str, list[Path]]:
    return _group_by(_fonts(root), 0)


def font_words(root: Path) -> dict[str, list[Path]]:
    return _group_by(_fonts(root), 1)


# ---- icons: the same standard icon names drawn by many themes (theme = style, name = instance) ----

# Debian package -> theme folder under usr/share/icons, one variant per package. mate-icon-theme is left
# out: it draws these names exactly as gnome-icon-theme does (a fork), which would make two groups of one style.
ICON_THEMES = {
    "adwaita-icon-theme": "Adwaita", "tango-icon-theme": "Tango", "gnome-icon-theme": "gnome", "oxygen-icon-theme": "oxygen", "breeze-icon-theme": "breeze",
    "papirus-icon-theme": "Papirus", "elementary-xfce-icon-theme": "elementary-xfce",
    "faenza-icon-theme": "Faenza", "moka-icon-theme": "Moka",
}
# Names every theme above draws in colour at 48 px or more, less those that are the same file as
# another listed name in some theme (video-display = computer, network-server = folder-remote, ...).
ICON_NAMES = [
    "accessories-calculator", "accessories-character-map", "accessories-text-editor", "application-x-executable",
    "audio-card", "camera-photo", "computer", "dialog-error", "dialog-information", "dialog-warning",
    "drive-harddisk", "drive-optical", "drive-removable-media", "folder-remote", "help-browser", "input-keyboard",
    "input-mouse", "multimedia-player", "preferences-system", "printer", "system-file-manager",
    "system-software-update", "user-desktop", "user-trash", "user-trash-full", "utilities-terminal",
    "x-office-address-book", "x-office-calendar",
]


def _icon_size(path: Path) -> int:
    """Pixel size from the icon's folder (`256x256/`, `/48/`); scalable SVGs count as largest."""
    import re

    m = re.search(r"/(\d+)x\d+/|/(\d+)/", str(path))
    return int(m.group(1) or m.group(2)) if m else 1 << 16


def _icon_sources(tree: Path) -> dict[str, Path]:
    """{name: file} of ICON_NAMES in one theme: the largest colour PNG or SVG (no `-symbolic`)."""
    best: dict[str, Path] = {}
    for p in sorted(tree.rglob("*")):
        if p.stem in ICON_NAMES and p.suffix in (".png", ".svg") and p.exists() and _icon_size(p) >= 48:
            if p.stem not in best or _icon_size(p) > _icon_size(best[p.stem]):
                best[p.stem] = p
    return best


def _icons(root: Path) -> list[tuple[str, str, Path]]:
    """(theme, name, png) for every theme and name, SIDE px high, rendering what is missing."""
    rendered, out, rsvg = root / "rendered" / "icons", [], None
    for package, theme in ICON_THEMES.items():
        (rendered / theme).mkdir(parents=True, exist_ok=True)
        todo = [n for n in ICON_NAMES if not (rendered / theme / f"{n}.png").exists()]
        sources = _icon_sources(fetch(root, package) / "usr/share/icons" / theme) if todo else {}
        for name in todo:
            if name not in sources:
                sys.exit(f"{package}: no icon '{name}' of 48 px or more")
            src, png = sources[name], rendered / theme / f"{name}.png"
            if src.suffix == ".svg":
                rsvg = rsvg or _rsvg(root)
                img = Image.open(io.BytesIO(run_bytes([rsvg, "-w", str(SIDE), "-h", str(SIDE), "-a", str(src)])))
            else:
                img = Image.open(src)
            img = img.convert("RGBA")
            img.resize((round(img.width * SIDE / img.height), SIDE), Image.Resampling.LANCZOS).save(tmp := png.with_suffix(".part.png"))
            tmp.rename(png)
        out += [(theme, n, rendered / theme / f"{n}.png") for n in ICON_NAMES]
    return out


def icon_themes(root: Path) -> dict[str, list[Path]]:
    return _group_by(_icons(root), 0)


def icon_names(root: Path) -> dict[str, list[Path]]:
    return _group_by(_icons(root), 1)


# name -> (builder, cap per group, what a group is). Caps keep the benchmark to minutes on 2 CPU cores.
DATASETS = {
    "tuxpaint-categories": (tuxpaint_categories, 30, "content"),
    "tuxpaint-style": (tuxpaint_style, 60, "style"),
    "card-decks": (card_decks, 13, "style"),
    "card-ranks": (card_ranks, 16, "content"),
    "font-styles": (font_styles, 12, "style"),
    "font-words": (font_words, 24, "content"),
    "icon-themes": (icon_themes, 28, "style"),
    "icon-names": (icon_names, 9, "content"),
}
_FONT_PACKAGES = ", ".join(dict.fromkeys(p for p, _, _ in FONTS))
_ICON_PACKAGES = ", ".join(ICON_THEMES)
# The proxy suite: name -> (cap per group in the suite, what a group is, Debian packages, their licenses).
SUITE = {
    "tuxpaint-categories": (9, "stamp category (animals-birds, food-fruit, ...)", "tuxpaint-stamps-default", "GPL-2"),
    "tuxpaint-style": (60, "photo vs cartoon stamps of the same subjects", "tuxpaint-stamps-default", "GPL-2"),
    "card-decks": (13, "card deck (13 ranks each)", "kdegames-card-data-kf5", "GPL-2+ / LGPL-2"),
    "card-ranks": (16, "card rank across 16 decks", "kdegames-card-data-kf5", "GPL-2+ / LGPL-2"),
    "font-styles": (12, "font (12 words each)", _FONT_PACKAGES, "OFL-1.1, OFL-1.0, Bitstream Vera, AGPL-3 / GPL-2+ with "
                    "font exception, LGPL-2+"),
    "font-words": (24, "word across 24 fonts", _FONT_PACKAGES, "as font-styles"),
    "icon-themes": (28, "icon theme (28 standard icon names each)", _ICON_PACKAGES,
                    "LGPL-3(+), GPL-2+, GPL-3(+), CC-BY-SA, public domain (Tango)"),
    "icon-names": (9, "standard icon name across 9 themes", _ICON_PACKAGES, "as icon-themes"),
}


def build(root: Path, name: str, dest: Path | None = None, cap: int | None = None) -> Path:
    """Materialise `dest` (default ROOT/<name>)/<group>/<image> as relative symlinks, at most `cap`
    (default the dataset's) images a group; skipped when it exists."""
    dest = dest or root / name
    if dest.is_dir():
        return dest
    builder, default_cap, _ = DATASETS[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    for group, paths in sorted(builder(root).items()):
        if len(paths) < MIN_GROUP:
            continue
        for src in spread(paths, cap or default_cap):
            # File name from the source path's tail (`fruit__cartoon__apple.png`, `cards__oxygen__1_spade.png`):
            # says where the image came from; a collision fails loudly in symlink_to.
            link = tmp / group / "__".join(src.parts[-3:])
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(os.path.relpath(src, dest / group))
    tmp.chmod(0o755)  # mkdtemp makes it private
    tmp.rename(dest)
    return dest


def build_suite(root: Path) -> Path:
    """ROOT/suite/<set> for every set of SUITE, and the manifest ROOT/suite/suite.json."""
    suite = root / "suite"
    sets = {}
    for name, (cap, group, packages, licenses) in SUITE.items():
        folder = build(root, name, suite / name, cap)
        sizes = [len(list(g.iterdir())) for g in folder.iterdir() if g.is_dir()]
        sets[name] = {"mode": DATASETS[name][2], "group": group, "packages": packages, "licenses": licenses,
                      "groups": len(sizes), "images": sum(sizes)}
    (suite / "suite.json").write_text(json.dumps({"sets": sets}, indent=2) + "\n")
    return suite


def summary(folder: Path) -> str:
    sizes = [len(list(g.iterdir())) for g in folder.iterdir() if g.is_dir()]
    return f"{folder}: {len(sizes)} groups, {sum(sizes)} images (per group {min(sizes)}..{max(sizes)})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=data_root())
    ap.add_argument("datasets", nargs="*", default=list(DATASETS), help="default: all; `suite`: the proxy suite")
    args = ap.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    root = args.root.resolve()
    for name in args.datasets:
        if name == "suite":
            suite = build_suite(root)
            for s in SUITE:
                print(summary(suite / s))
            print(suite / "suite.json")
        else:
            print(summary(build(root, name)))


if __name__ == "__main__":
    main()
