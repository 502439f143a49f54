"""Small SPair-71k-layout fixtures built from real images with exact ground truth.

    ROOT/JPEGImages/<category>/<image>.jpg
    ROOT/ImageAnnotation/<category>/<image>.json
    ROOT/PairAnnotation/test/<pair>.json   {src_imname, trg_imname, category, src_kps, trg_kps,
                                            src_bndbox, trg_bndbox, ...}

Two kinds of pairs:

- `translation`: two overlapping crops of one photo (examples/images/, CC0/public domain) with a known
  offset; keypoints on a grid inside the overlap, so the target keypoint is the source one minus the
  offset. One category per photo. Always available.
- `graf`: opencv-doc's graf1.png / graf3.png (a planar graffiti wall seen from two viewpoints) with its
  ground-truth homography H1to3p.xml: keypoints on a grid in graf1 mapped by H into graf3; the target
  bounding box is the whole image. Needs the Debian package opencv-doc (see `find_graf_data`).

Used by the tests (loaded by file path) and by benchmarks/make_spair_fixture.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "images"
GRAF_FILES = ("graf1.png", "graf3.png", "H1to3p.xml")
GRAF_SUBDIR = Path("usr/share/doc/opencv-doc/examples/data")

# (photo, crop size as a fraction of the image side, offsets (dx, dy) in pixels of B's crop relative to A's)
TRANSLATION_PAIRS = [
    ("astronaut", 0.75, [(40, 24), (-31, 45)]),
    ("chelsea", 0.75, [(37, -18), (-45, 11)]),
    ("coffee", 0.75, [(52, 19), (-23, -29)]),
    ("horse", 0.75, [(-41, 27), (29, 33)]),
]
GRID = 5  # keypoints per side of the overlap grid


def data_root() -> Path:
    """Where benchmarks/data.py keeps Debian packages: $SIMSEARCH_DATA or ~/.cache/simsearch-data."""
    return Path(os.environ.get("SIMSEARCH_DATA") or Path.home() / ".cache" / "simsearch-data")


def _graf_dir_candidates() -> list[Path]:
    dirs = []
    if env := os.environ.get("SIMSEARCH_GRAF_DIR"):
        dirs.append(Path(env))
    dirs += [data_root() / "pkgs" / "opencv-doc" / GRAF_SUBDIR, Path("/") / GRAF_SUBDIR]
    return dirs


def find_graf_data(extract_to: Path | None = None) -> Path | None:
    """The folder holding graf1.png, graf3.png and H1to3p.xml, or None.

    Looks in $SIMSEARCH_GRAF_DIR, the unpacked package of benchmarks/data.py
    (<data root>/pkgs/opencv-doc/...) and an installed opencv-doc (/usr/share/doc/...). Failing
    those, if `extract_to` is given and a downloaded opencv-doc_*.deb sits in <data root>/debs, only
    the three files are extracted from it into `extract_to` (no network, a few seconds).
    """
    for d in _graf_dir_candidates():
        if all((d / f).is_file() for f in GRAF_FILES):
            return d
    if extract_to is None:
        return None
    debs = sorted((data_root() / "debs").glob("opencv-doc_*.deb"))
    if not debs or not shutil.which("dpkg-deb") or not shutil.which("tar"):
        return None
    extract_to.mkdir(parents=True, exist_ok=True)
    members = [f"./{GRAF_SUBDIR / f}" for f in GRAF_FILES]
    deb = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(extract_to), *members], stdin=deb.stdout, capture_output=True)
    deb.stdout.close()
    deb.wait()
    d = extract_to / GRAF_SUBDIR
    if tar.returncode or not all((d / f).is_file() for f in GRAF_FILES):
        return None
    return d


def graf_missing_reason() -> str:
    looked = ", ".join(str(d) for d in _graf_dir_candidates())
    return (f"opencv-doc's graf1.png/graf3.png/H1to3p.xml not found (looked in {looked} and for "
            f"{data_root() / 'debs'}/opencv-doc_*.deb); run `python benchmarks/make_spair_fixture.py` "
            f"(fetches opencv-doc with apt-get download) or set SIMSEARCH_GRAF_DIR")


def read_opencv_matrix(path: Path) -> np.ndarray:
    """The first matrix of an OpenCV FileStorage XML file (rows, cols, data)."""
    text = Path(path).read_text()
    rows = int(re.search(r"<rows>\s*(\d+)\s*</rows>", text).group(1))
    cols = int(re.search(r"<cols>\s*(\d+)\s*</cols>", text).group(1))
    data = re.search(r"<data>(.*?)</data>", text, re.S).group(1).split()
    return np.array([float(v) for v in data], dtype=np.float64).reshape(rows, cols)


def apply_homography(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    p = np.c_[xy, np.ones(len(xy))] @ h.T
    return p[:, :2] / p[:, 2:3]


def _write_pair(root: Path, split: str, pair_id: str, category: str, src: str, trg: str,
                src_kps: np.ndarray, trg_kps: np.ndarray, src_size: tuple[int, int], trg_size: tuple[int, int],
                src_bbox: list[float], trg_bbox: list[float]) -> None:
    d = root / "PairAnnotation" / split
    d.mkdir(parents=True, exist_ok=True)
    ann = {
        "pair_id": pair_id, "category": category, "src_imname": src, "trg_imname": trg,
        "src_imsize": [src_size[0], src_size[1], 3], "trg_imsize": [trg_size[0], trg_size[1], 3],
        "src_bndbox": [round(float(v), 2) for v in src_bbox], "trg_bndbox": [round(float(v), 2) for v in trg_bbox],
        "src_kps": np.round(src_kps, 2).tolist(), "trg_kps": np.round(trg_kps, 2).tolist(),
        "kps_ids": [str(i) for i in range(len(src_kps))],
        "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0,
    }
    (d / f"{pair_id}.json").write_text(json.dumps(ann))


def _write_image(root: Path, category: str, name: str, img: Image.Image, kps: dict[str, list[float]]) -> None:
    (root / "JPEGImages" / category).mkdir(parents=True, exist_ok=True)
    img.convert("RGB").save(root / "JPEGImages" / category / name, quality=95)
    (root / "ImageAnnotation" / category).mkdir(parents=True, exist_ok=True)
    w, h = img.size
    (root / "ImageAnnotation" / category / f"{Path(name).stem}.json").write_text(json.dumps(
        {"filename": name, "category": category, "image_width": w, "image_height": h, "bndbox": [0, 0, w - 1, h - 1],
         "kps": kps}))


def build_translation(root: Path, split: str = "test", photos: list[str] | None = None,
                      examples: Path = EXAMPLES) -> Path:
    """Pure-translation crop pairs of examples/images photos. Returns root."""
    root = Path(root)
    for photo, frac, offsets in TRANSLATION_PAIRS:
        if photos and photo not in photos:
            continue
        img = Image.open(examples / f"{photo}.jpg").convert("RGB")
        w, h = img.size
        cw, ch = round(w * frac), round(h * frac)
        for i, (dx, dy) in enumerate(offsets):
            # A's crop origin chosen so that both crops fit: A at (ax, ay), B at (ax + dx, ay + dy).
            ax, ay = max(0, -dx), max(0, -dy)
            bx, by = ax + dx, ay + dy
            assert bx + cw <= w and by + ch <= h and ax + cw <= w and ay + ch <= h, (photo, dx, dy)
            crop_a = img.crop((ax, ay, ax + cw, ay + ch))
            crop_b = img.crop((bx, by, bx + cw, by + ch))
            # Overlap in A's coordinates: x in [max(0, dx), min(cw, cw + dx)), same for y.
            margin = 10
            x0, x1 = max(0, dx) + margin, min(cw, cw + dx) - margin
            y0, y1 = max(0, dy) + margin, min(ch, ch + dy) - margin
            gx, gy = np.meshgrid(np.linspace(x0, x1, GRID), np.linspace(y0, y1, GRID))
            src_kps = np.c_[gx.ravel(), gy.ravel()]
            trg_kps = src_kps - [dx, dy]
            src, trg = f"{photo}_{i}a.jpg", f"{photo}_{i}b.jpg"
            _write_image(root, photo, src, crop_a, {str(k): p for k, p in enumerate(np.round(src_kps, 2).tolist())})
            _write_image(root, photo, trg, crop_b, {str(k): p for k, p in enumerate(np.round(trg_kps, 2).tolist())})
            _write_pair(root, split, f"{photo}-{i}", photo, src, trg, src_kps, trg_kps, (cw, ch), (cw, ch),
                        [0, 0, cw, ch], [0, 0, cw, ch])
    return root


def build_graf(root: Path, graf_dir: Path, split: str = "test", grid: int = 8, margin: int = 40) -> Path:
    """graf1 -> graf3 with keypoints on a grid in graf1 mapped by H1to3p; only points that land inside
    graf3 (with `margin` pixels to spare) are kept. The target bounding box is the whole image."""
    root = Path(root)
    graf_dir = Path(graf_dir)
    h13 = read_opencv_matrix(graf_dir / "H1to3p.xml")
    img1 = Image.open(graf_dir / "graf1.png").convert("RGB")
    img3 = Image.open(graf_dir / "graf3.png").convert("RGB")
    (w1, h1), (w3, h3) = img1.size, img3.size
    gx, gy = np.meshgrid(np.linspace(margin, w1 - margin, grid), np.linspace(margin, h1 - margin, grid))
    src = np.c_[gx.ravel(), gy.ravel()]
    trg = apply_homography(h13, src)
    inside = (trg[:, 0] >= margin) & (trg[:, 0] <= w3 - margin) & (trg[:, 1] >= margin) & (trg[:, 1] <= h3 - margin)
    src, trg = src[inside], trg[inside]
    _write_image(root, "graf", "graf1.jpg", img1, {str(k): p for k, p in enumerate(np.round(src, 2).tolist())})
    _write_image(root, "graf", "graf3.jpg", img3, {str(k): p for k, p in enumerate(np.round(trg, 2).tolist())})
    _write_pair(root, split, "graf-1-3", "graf", "graf1.jpg", "graf3.jpg", src, trg, (w1, h1), (w3, h3),
                [0, 0, w1, h1], [0, 0, w3, h3])
    return root


def build_all(root: Path, graf_dir: Path | None = None, split: str = "test") -> dict[str, Path]:
    """Both fixtures as separate SPair roots: {"translation": root/translation, "graf": root/graf}.
    The graf one only when `graf_dir` is given."""
    root = Path(root)
    out = {"translation": build_translation(root / "translation", split)}
    if graf_dir is not None:
        out["graf"] = build_graf(root / "graf", graf_dir, split)
    return out


def temporary_graf_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="simsearch-graf-"))
