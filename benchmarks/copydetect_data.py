"""Copy-detection proxy (issue 18, "Measure"): real photographs and drawings from Debian packages,
each original edited the ways copy-detection benchmarks edit, plus region queries and a dedup set.

    python benchmarks/copydetect_data.py [--root DIR] [--originals 200] [--distractors 850] [--seed 0]
    python benchmarks/copydetect_data.py --from-folder examples/images --out DIR --originals 4 ...  # tiny, no apt

Built once into ROOT/copydetect-v2 (ROOT: $SIMSEARCH_DATA or ~/.cache/simsearch-data), never committed;
the folder appears whole (built in a temporary folder, renamed at the end), so a re-run skips it.

    pool/originals/     the originals (indexed)               } pool: what the retrieval benchmark indexes
    pool/distractors/   unrelated pictures (indexed)          } (the hosts of `paste` copies are distractors)
    pool/composites/    a paste source pasted into a host      }
    queries/<edit>/     one copy of each original per edit (EDITS); target: the original
    regions/<kind>-<n>/ region queries: a crop covering 1/n of an original's area (kind `original`, target:
                        the original) or 1/n of a paste source's area (kind `pasted`, target: its composite),
                        as `<name>.crop.<ext>` and pasted into an unrelated distractor as `<name>.<ext>` with
                        its box, so `search(scene, box=box)` replays it and a method ignoring the box fails
    dedup/              symlinked folders: originals + distractors + the MILD copies (the dedup pool)
    manifest.json       every file with its role, original, edit, split; queries, regions, dedup truth

Sources (photos vs drawings; licenses in each package's copyright file): wallpapers of gnome-backgrounds,
mate-backgrounds, ukui-wallpapers and plasma-workspace-wallpapers; the photos bundled with scikit-image
(python3-skimage) and OpenCV's samples (opencv-doc examples/data); tuxpaint-stamps-default (photo stamps and
cartoon/ drawings); openclipart-png drawings; distractors also from opencv-doc's documentation figures.
Near-identical sources (same picture in two packages or resolutions, or the same layout with other labels:
grey 32 x 32 thumbnails correlated at LAYOUT_CORRELATION or more) are dropped by a difference hash and that
correlation before anything is chosen, so no two pool members are copies unless the manifest says so.

Originals are split by a seeded hash of their name: HELDOUT_PERCENT of them are held out (report them
separately, never tune on them).

    from copydetect_data import load_manifest; m = load_manifest(ROOT / "copydetect-v2")
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from common import EXAMPLES, data_root
from data import fetch
from simsearch.bench.fixtures import spread

# bump when the recipe changes: benchmarks key their cached databases by it. v2: near-identical layouts
# (LAYOUT_CORRELATION) dropped as well; in v1, 276 pairs of templated documentation diagrams (Doxygen class
# graphs: the same boxes and arrows, other labels) passed the difference hash and counted as false duplicates.
DATA_VERSION = "copydetect-v2"
LAYOUT_SIDE, LAYOUT_CORRELATION = 32, 0.9  # grey thumbnails this alike are one picture for the proxy
HELDOUT_PERCENT = 40
MAX_SIDE = 512  # stored pictures are at most this many pixels on their long side
ORIGINAL_MIN_SIDE = 200  # originals and paste sources are real pictures, not icons
DISTRACTOR_MIN_SIDE = 96
HOST_MIN_SIDE = 256  # pictures others are pasted into
MIN_CROP_STD = 24.0  # grey-level spread (0-255) a crop needs to show something
REGION_AREAS = (4, 9, 16)  # region boxes cover 1/n of the target picture's area
MILD = ("crop50", "mirror_colour", "rotate_jpeg", "small_grey", "text")  # copies that count as duplicates
OPENCLIPART_CAP = 1500  # openclipart-png holds ~8,000 drawings: an evenly spread subset is read
WORDS = ("SAMPLE", "copy", "Holiday 2019", "(c) studio", "MEME", "look at this", "sale -50%", "best", "news",
         "Photo by me", "www.example.org", "LOL")


@dataclass(order=True)
class Source:
    name: str  # unique, stable: the split hash and the file names come from it
    path: Path
    package: str
    kind: str  # "photo" or "drawing"; "figure" (documentation figures) only ever a distractor
    size: tuple[int, int] = (0, 0)


# ---- sources ---------------------------------------------------------------------------------------
PICTURE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# Calibration sequences (left01..left14: one chessboard moved around one room) are copies of one another.
SKIP = re.compile(r"(left|right)\d\d|_mirror$|-d$|chessboard|mask|gradient|logo", re.I)


def _pictures(tree: Path, pattern: str = "**/*") -> list[Path]:
    return sorted(p for p in tree.glob(pattern) if p.suffix.lower() in PICTURE_SUFFIXES and p.is_file()
                  and not SKIP.search(p.stem))


def _largest_per_folder(paths: list[Path], levels: int) -> list[Path]:
    """One picture per wallpaper (a folder `levels` up holds one design in several resolutions)."""
    best: dict[Path, Path] = {}
    for p in paths:
        key = p.parents[levels - 1]
        if key not in best or p.stat().st_size > best[key].stat().st_size:
            best[key] = p
    return sorted(best.values())


def debian_sources(root: Path) -> list[Source]:
    """Every candidate picture of the packages above, as (name, path, package, kind)."""
    out: list[Source] = []

    names: set[str] = set()

    def add(package: str, short: str, kind: str, paths: list[Path], base: Path) -> None:
        for p in paths:
            name = f"{short}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(p.relative_to(base).with_suffix("").parts))
            if name in names:  # x.png beside x.jpg
                name += "-" + p.suffix.lstrip(".").lower()
            names.add(name)
            out.append(Source(name, p, package, kind))

    for package, short, sub in [("gnome-backgrounds", "gnome", "usr/share/backgrounds"),
                                ("mate-backgrounds", "mate", "usr/share/backgrounds"),
                                ("ukui-wallpapers", "ukui", "usr/share/backgrounds"),
                                ("python3-skimage", "skimage", "usr/lib/python3/dist-packages/skimage/data"),
                                ("opencv-doc", "opencv", "usr/share/doc/opencv-doc/examples/data")]:
        base = fetch(root, package) / sub
        add(package, short, "photo", _pictures(base, "*" if short in ("skimage", "opencv") else "**/*"), base)
    base = fetch(root, "plasma-workspace-wallpapers") / "usr/share/wallpapers"
    add("plasma-workspace-wallpapers", "plasma", "photo", _largest_per_folder(_pictures(base), 3), base)
    base = fetch(root, "tuxpaint-stamps-default") / "usr/share/tuxpaint/stamps"
    stamps = _pictures(base)
    add("tuxpaint-stamps-default", "tux", "drawing", [p for p in stamps if p.parent.name == "cartoon"], base)
    add("tuxpaint-stamps-default", "tux", "photo", [p for p in stamps if p.parent.name != "cartoon"], base)
    base = fetch(root, "openclipart-png") / "usr/share/openclipart/png"
    add("openclipart-png", "clip", "drawing", spread(_pictures(base), OPENCLIPART_CAP), base)
    base = fetch(root, "opencv-doc") / "usr/share/doc/opencv-doc/opencv4/html"
    add("opencv-doc", "cvdoc", "figure", _pictures(base), base)
    return out


def folder_sources(folder: Path) -> list[Source]:
    """Every picture of a plain folder as a photo (the tiny set of the smoke test)."""
    return [Source(f"ex-{p.stem}", p, "folder", "photo") for p in _pictures(folder)]


# ---- pictures --------------------------------------------------------------------------------------
def load(src: Source) -> Image.Image:
    """RGB, transparency on white, at most MAX_SIDE on its long side."""
    img = Image.open(src.path)
    img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    img = img.convert("RGB")
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return img


def dhash(img: Image.Image, side: int = 8) -> int:
    """Difference hash: signs of horizontal grey gradients on a (side+1) x side thumbnail."""
    a = np.asarray(img.convert("L").resize((side + 1, side), Image.Resampling.BILINEAR), dtype=np.int16)
    return int("".join("1" if b else "0" for b in (a[:, 1:] > a[:, :-1]).ravel()), 2)


def layout(img: Image.Image, side: int = LAYOUT_SIDE) -> np.ndarray:
    """A grey side x side thumbnail, zero mean and unit norm: its dot product with another's is their
    correlation (1: the same layout of light and dark, whatever the labels or the compression)."""
    a = np.asarray(img.convert("L").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
    a -= a.mean()
    return a / max(float(np.linalg.norm(a)), 1e-6)


def _flat(img: Image.Image) -> bool:
    """Nearly one colour (an empty figure, a blank stamp): useless as a picture."""
    return float(np.asarray(img.convert("L").resize((32, 32)), dtype=np.float32).std()) < 6.0


def save(img: Image.Image, path: Path, quality: int = 92) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=quality) if path.suffix == ".jpg" else img.save(path)


# ---- edits: each (picture, rng, host) -> the copy ---------------------------------------------------
def crop_box(img: Image.Image, area: float, rng: random.Random, tries: int = 10) -> tuple[int, int, int, int]:
    """A box of the picture's aspect covering `area` of it at a random place that shows something: the
    first of `tries` random boxes whose grey values vary (std >= MIN_CROP_STD), else the most varied one
    (a crop of a drawing's white margin would be no copy of anything)."""
    w, h = img.size
    cw, ch = max(1, round(w * area ** 0.5)), max(1, round(h * area ** 0.5))
    grey = np.asarray(img.convert("L"), dtype=np.float32)
    best, best_std = None, -1.0
    for _ in range(tries):
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        std = float(grey[y:y + ch, x:x + cw].std())
        if std > best_std:
            best, best_std = (x, y, x + cw, y + ch), std
        if std >= MIN_CROP_STD:
            break
    return best


def crop(area: float):
    return lambda img, rng, host: img.crop(crop_box(img, area, rng))


def mirror_colour(img, rng, host):
    hsv = np.asarray(ImageOps.mirror(img).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + rng.choice([-1, 1]) * rng.randint(25, 70)) % 256
    out = Image.fromarray(hsv, "HSV").convert("RGB")
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.5))
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Contrast(out).enhance(rng.uniform(0.7, 1.3))


def rotate_jpeg(img, rng, host):
    import io

    out = img.rotate(rng.choice([-1, 1]) * rng.uniform(10, 30), Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=rng.randint(8, 15))
    return Image.open(buf).convert("RGB")


def small_grey(img, rng, host):
    out = ImageOps.grayscale(img).convert("RGB")
    out.thumbnail((96, 96), Image.Resampling.LANCZOS)
    return out


def paste_into(img: Image.Image, host: Image.Image, scale: float, rng: random.Random):
    """`img` scaled to `scale` of the host's width (or height, whichever binds) at a random place.
    -> (composite, box of img in it)"""
    hw, hh = host.size
    f = scale * min(hw / img.width, hh / img.height)
    small = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS)
    x, y = rng.randint(0, hw - small.width), rng.randint(0, hh - small.height)
    out = host.copy()
    out.paste(small, (x, y))
    return out, (x, y, x + small.width, y + small.height)


def paste(img, rng, host):
    return paste_into(img, host, rng.uniform(0.35, 0.5), rng)[0]


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), size) if FONT.is_file() else ImageFont.load_default(size)


def text(img, rng, host):
    out = img.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    for _ in range(rng.randint(2, 4)):
        font = _font(max(10, round(h * rng.uniform(0.09, 0.16))))
        word = rng.choice(WORDS)
        x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
        x, y = rng.randint(0, max(0, w - (x1 - x0))) - x0, rng.randint(0, max(0, h - (y1 - y0))) - y0
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        draw.text((x, y), word, font=font, fill=colour, stroke_width=max(1, font.size // 12), stroke_fill=(0, 0, 0))
    return out


EDITS = {  # name -> (edit, needs a host picture); the copy of each original is one query
    "crop50": (crop(0.5), False),
    "crop25": (crop(0.25), False),
    "mirror_colour": (mirror_colour, False),
    "rotate_jpeg": (rotate_jpeg, False),
    "small_grey": (small_grey, False),
    "paste": (paste, True),
    "text": (text, False),
}
FONT: Path = Path()  # DejaVu Sans Bold, set by build (from fonts-dejavu-core, or a font on this machine)


# ---- the data set ----------------------------------------------------------------------------------
def split_of(name: str, seed: int) -> str:
    h = int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "tune"


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random(f"{seed}:" + ":".join(parts))


def select(sources: list[Source], n_originals: int, n_paste: int, n_distractors: int, n_hosts: int,
           seed: int) -> tuple[dict[str, list[Source]], dict[str, Image.Image]]:
    """Roles for distinct pictures: originals and paste sources (half photos, half drawings where
    there are enough), composite hosts, distractors. -> ({role: sources}, {name: loaded picture})"""
    rng = _rng(seed, "select")
    order = sorted(sources, key=lambda s: s.name)
    rng.shuffle(order)
    seen: list[int] = []
    layouts = np.zeros((0, LAYOUT_SIDE * LAYOUT_SIDE), np.float32)
    kept: list[Source] = []
    pictures: dict[str, Image.Image] = {}
    for s in order:
        try:
            with Image.open(s.path) as im:
                s.size = im.size
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if min(s.size) < DISTRACTOR_MIN_SIDE:
            continue
        img = load(s)
        if _flat(img):
            continue
        h, lay = dhash(img), layout(img)
        if any(bin(h ^ o).count("1") <= 6 for o in seen) or (layouts @ lay >= LAYOUT_CORRELATION).any():
            continue  # near-identical to a picture already kept
        seen.append(h)
        layouts = np.vstack([layouts, lay])
        kept.append(s)
        pictures[s.name] = img
    big = [s for s in kept if min(s.size) >= ORIGINAL_MIN_SIDE and s.kind != "figure"]
    photos, drawings = [s for s in big if s.kind == "photo"], [s for s in big if s.kind == "drawing"]
    want = n_originals + n_paste
    n_photo = min(len(photos), want // 2 + want % 2) if drawings else min(len(photos), want)
    chosen = photos[:n_photo] + drawings[:want - n_photo]
    if len(chosen) < want:
        sys.exit(f"only {len(chosen)} pictures of {ORIGINAL_MIN_SIDE} px or more for {want} originals and paste sources")
    # alternate photos and drawings so both roles get both kinds
    inter = [s for pair in zip(chosen[:n_photo], chosen[n_photo:]) for s in pair]
    inter += [s for s in chosen if s not in inter]
    roles = {"original": inter[:n_originals], "paste-source": inter[n_originals:]}
    used = {s.name for s in chosen}
    rest = [s for s in kept if s.name not in used]
    # hosts: photos, drawings and figures in turn, so composites are not all of one kind
    by_kind = [[s for s in rest if min(s.size) >= HOST_MIN_SIDE and s.kind == k] for k in ("photo", "drawing", "figure")]
    hosts = [s for turn in itertools.zip_longest(*by_kind) for s in turn if s is not None][:n_hosts]
    roles["host"] = hosts
    rest = [s for s in rest if s not in hosts]
    if len(hosts) < n_hosts or len(rest) < n_distractors:
        sys.exit(f"not enough pictures: {len(hosts)} hosts of {n_hosts}, {len(rest)} distractors of {n_distractors}")
    roles["distractor"] = rest[:n_distractors]
    return roles, pictures


def build(out: Path, sources: list[Source], n_originals: int = 200, n_paste: int = 60, n_distractors: int = 850,
          n_region: int = 100, seed: int = 0, font: Path | None = None) -> Path:
    """The whole data set into `out` (skipped when it exists). n_region originals get region queries;
    every paste source gets a composite and pasted-region queries."""
    if (out / "manifest.json").is_file():
        return out
    global FONT
    FONT = font or Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
    roles, pictures = select(sources, n_originals, n_paste, n_distractors, n_paste, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    files: list[dict] = []
    ext = lambda s: ".jpg" if s.kind == "photo" else ".png"  # noqa: E731  (drawings stay lossless)

    def record(path: Path, role: str, **kw) -> str:
        rel = str(path.relative_to(tmp))
        files.append({"file": rel, "role": role, **kw})
        return rel

    def put(img: Image.Image, rel: str, role: str, **kw) -> str:
        if (tmp / rel).exists():
            raise FileExistsError(tmp / rel)  # two sources with one name: a bug here, never overwrite
        save(img, tmp / rel)
        return record(tmp / rel, role, **kw)

    target: dict[str, str] = {}
    for role, folder in [("original", "originals"), ("distractor", "distractors")]:
        for s in roles[role]:
            split = split_of(s.name, seed) if role == "original" else None
            target[s.name] = put(pictures[s.name], f"pool/{folder}/{s.name}{ext(s)}", role, original=s.name if split else None,
                                 split=split, kind=s.kind, source=f"{s.package}:{s.path.name}")
    for role in ("paste-source", "host"):  # not indexed: only their composites are
        for s in roles[role]:
            paste_source = role == "paste-source"
            put(pictures[s.name], f"sources/{s.name}{ext(s)}", role, original=s.name if paste_source else None,
                split=split_of(s.name, seed) if paste_source else None, kind=s.kind, source=f"{s.package}:{s.path.name}")
    distractors = roles["distractor"]
    big_distractors = [s for s in distractors if min(pictures[s.name].size) >= HOST_MIN_SIDE] or distractors

    queries = []
    for s in roles["original"]:
        split = split_of(s.name, seed)
        for edit, (fn, needs_host) in EDITS.items():
            rng = _rng(seed, s.name, edit)
            host = rng.choice(big_distractors) if needs_host else None
            copy = fn(pictures[s.name], rng, pictures[host.name] if host else None)
            suffix = ".jpg" if edit in ("rotate_jpeg", "paste") or s.kind == "photo" else ".png"
            rel = put(copy, f"queries/{edit}/{s.name}{suffix}", "query", original=s.name, edit=edit, split=split,
                      target=target[s.name], host=target[host.name] if host else None)
            queries.append({"file": rel, "original": s.name, "edit": edit, "split": split, "target": target[s.name]})

    regions = []

    def region_queries(s: Source, kind: str, tgt: str, placed: tuple[int, int, int, int] | None) -> None:
        """Crops of 1/n of s's area; `placed`: where s lies in the target (pasted), in target pixels."""
        img = pictures[s.name]
        for n in REGION_AREAS:
            rng = _rng(seed, s.name, "region", kind, str(n))
            box = crop_box(img, 1 / n, rng)
            region = img.crop(box)
            bg = pictures[rng.choice(distractors).name]
            # the scene: an unrelated distractor twice the region's size, the region unscaled at a random place
            scene, sbox = paste_into(region, bg.resize((2 * region.width, 2 * region.height)), 0.5, rng)
            folder = f"regions/{kind}-{n}"
            crop_rel = put(region, f"{folder}/{s.name}.crop{ext(s)}", "region-crop", original=s.name, edit=f"{kind}-{n}",
                           split=split_of(s.name, seed), target=tgt)
            scene_rel = put(scene, f"{folder}/{s.name}{ext(s)}", "region-query", original=s.name, edit=f"{kind}-{n}",
                            split=split_of(s.name, seed), target=tgt, box=list(sbox))
            if placed is None:
                tbox, frac = list(box), 1 / n
            else:  # the crop's box mapped into the composite
                f = (placed[2] - placed[0]) / img.width
                tbox = [round(placed[0] + f * box[0]), round(placed[1] + f * box[1]),
                        round(placed[0] + f * box[2]), round(placed[1] + f * box[3])]
                tw, th = pictures_size[tgt]
                frac = (tbox[2] - tbox[0]) * (tbox[3] - tbox[1]) / (tw * th)
            regions.append({"image": scene_rel, "box": list(sbox), "crop": crop_rel, "kind": kind, "area": f"1/{n}",
                            "original": s.name, "split": split_of(s.name, seed), "target": tgt, "target_box": tbox,
                            "target_area_fraction": round(frac, 4)})

    pictures_size: dict[str, tuple[int, int]] = {}
    for s in spread(roles["original"], n_region):
        region_queries(s, "original", target[s.name], None)
    for s, host in zip(roles["paste-source"], roles["host"]):
        rng = _rng(seed, s.name, "composite")
        comp, placed = paste_into(pictures[s.name], pictures[host.name], rng.uniform(0.45, 0.6), rng)
        rel = put(comp, f"pool/composites/{s.name}.jpg", "composite", original=s.name, split=split_of(s.name, seed),
                  host=f"sources/{host.name}{ext(host)}", box=list(placed))
        pictures_size[rel] = comp.size
        region_queries(s, "pasted", rel, placed)

    # the dedup pool: originals + distractors + mild copies, as symlinked folders (indexed once more)
    (tmp / "dedup").mkdir()
    for name, to in [("originals", "pool/originals"), ("distractors", "pool/distractors"),
                     *[(f"copy-{e}", f"queries/{e}") for e in MILD]]:
        (tmp / "dedup" / name).symlink_to(os.path.relpath(tmp / to, tmp / "dedup"))
    members = [f["file"] for f in files if f["role"] in ("original", "distractor")
               or (f["role"] == "query" and f["edit"] in MILD)]
    by_original: dict[str, int] = {}
    for f in files:
        if f["file"] in set(members) and f.get("original"):
            by_original[f["original"]] = by_original.get(f["original"], 0) + 1
    manifest = {
        "version": DATA_VERSION, "seed": seed, "heldout_percent": HELDOUT_PERCENT, "max_side": MAX_SIDE,
        "edits": list(EDITS), "mild_edits": list(MILD), "region_areas": [f"1/{n}" for n in REGION_AREAS],
        "packages": sorted({s.package for r in roles.values() for s in r}),
        "counts": {"originals": len(roles["original"]), "distractors": len(distractors),
                   "composites": len(roles["paste-source"]), "pool": len(roles["original"]) + len(distractors) + len(roles["paste-source"]),
                   "queries": len(queries), "region_queries": len(regions), "dedup_pool": len(members),
                   "dedup_true_pairs": sum(k * (k - 1) // 2 for k in by_original.values()),
                   **{f"originals_{sp}": sum(split_of(s.name, seed) == sp for s in roles["original"]) for sp in ("tune", "heldout")},
                   **{f"originals_{k}": sum(s.kind == k for s in roles["original"]) for k in ("photo", "drawing")}},
        "pool": "pool", "dedup": {"folder": "dedup", "members": members,
                                  "truth": "two members are a true pair when they have the same `original`"},
        "queries": queries, "regions": regions, "files": files,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.chmod(0o755)
    tmp.rename(out)
    return out


def load_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


# the tiny set of the smoke test (`copydetect.py --quick`): examples/images holds 12 photos
EXAMPLES_ARGS = {"n_originals": 4, "n_paste": 2, "n_distractors": 4, "n_region": 2}


def build_from_folder(out: Path, sizes: dict, folder: Path = EXAMPLES, seed: int = 0) -> Path:
    return build(out, folder_sources(folder), seed=seed, **sizes)


def build_from_debian(root: Path, out: Path | None = None, seed: int = 0, **sizes) -> Path:
    """ROOT/DATA_VERSION (or `out`) from the Debian packages, fetched into ROOT if need be."""
    out = out or root / DATA_VERSION
    if (out / "manifest.json").is_file():
        return out
    font = fetch(root, "fonts-dejavu-core") / "usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
    return build(out, debian_sources(root), seed=seed, font=font, **sizes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=data_root(), help="data root (Debian packages are kept here)")
    ap.add_argument("--out", type=Path, default=None, help=f"default ROOT/{DATA_VERSION}")
    ap.add_argument("--from-folder", type=Path, default=None, help="pictures of this folder instead of Debian packages")
    ap.add_argument("--originals", type=int, default=200)
    ap.add_argument("--paste-sources", type=int, default=60)
    ap.add_argument("--distractors", type=int, default=850)
    ap.add_argument("--region-originals", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = args.root.expanduser().resolve()
    sizes = {"n_originals": args.originals, "n_paste": args.paste_sources, "n_distractors": args.distractors,
             "n_region": args.region_originals}
    if args.from_folder:
        out = build_from_folder(args.out or root / f"{DATA_VERSION}-{args.from_folder.name}", sizes, args.from_folder, args.seed)
    else:
        out = build_from_debian(root, args.out, args.seed, **sizes)
    m = load_manifest(out)
    print(json.dumps(m["counts"]))
    print(out / "manifest.json")


if __name__ == "__main__":
    main()
