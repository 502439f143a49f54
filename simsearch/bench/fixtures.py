"""Small keypoint-correspondence fixtures in the SPair-71k layout, with exact ground truth, built from
your own images, for `simsearch bench pck` (simsearch.bench.pck):

    ROOT/JPEGImages/<category>/<image>.jpg
    ROOT/ImageAnnotation/<category>/<image>.json
    ROOT/PairAnnotation/<split>/<pair>.json   {src_imname, trg_imname, category, src_kps, trg_kps,
                                               src_bndbox, trg_bndbox, ...}

- `build_translation`: two overlapping crops of each image with a known offset; keypoints on a grid
  inside the overlap, so a keypoint's target is the source point minus the offset. Category = the
  image's stem. `example_offsets` gives the pairs the project's tests and benchmarks use on its
  examples/images photos.
- `build_graf`: opencv-doc's graf1.png -> graf3.png (a planar graffiti wall seen from two viewpoints,
  about 40 degrees apart) with its ground-truth homography H1to3p.xml; keypoints on a grid in graf1
  mapped by the homography into graf3, from the folder that holds those files (the Debian package
  opencv-doc: benchmarks/debian_data.find_graf_data finds or extracts them).

    from simsearch.bench.fixtures import build_translation
    build_translation("pck-fixture", {"photos/cat.jpg": [(40, 24), (-31, 45)]})   # then: simsearch bench pck pck-fixture

Co-segmentation sets (`composite_set`): cut-out images with an alpha channel pasted on crops of photos,
each with its exact mask.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import SimsearchError

GRID = 5  # keypoints per side of a translation pair's overlap grid
CROP = 0.75  # crop side as a fraction of the image side
# (dx, dy) in pixels of crop B relative to crop A, per examples/images photo: the fixture of the tests
# and of benchmarks/dense.py (its measured PCK is in benchmarks/results/dense.md).
EXAMPLE_OFFSETS = {
    "astronaut": [(40, 24), (-31, 45)],
    "chelsea": [(37, -18), (-45, 11)],
    "coffee": [(52, 19), (-23, -29)],
    "horse": [(-41, 27), (29, 33)],
}


def example_offsets(folder: str | Path, names: Sequence[str] | None = None) -> dict[Path, list[tuple[int, int]]]:
    """{folder/<name>.jpg: offsets} of EXAMPLE_OFFSETS (all, or `names`): the argument of
    `build_translation` that rebuilds the project's own fixture from its examples/images folder."""
    return {Path(folder) / f"{n}.jpg": offsets for n, offsets in EXAMPLE_OFFSETS.items() if names is None or n in names}


def build_translation(root: str | Path, images: Mapping[str | Path, Sequence[tuple[int, int]]], crop: float = CROP,
                      grid: int = GRID, margin: int = 10, split: str = "test") -> Path:
    """One pair per (image, offset): crop A and crop B, each `crop` of the image's sides, B shifted by
    (dx, dy) pixels; grid x grid keypoints inside the overlap, `margin` pixels from its edges. -> root"""
    root = Path(root)
    for path, offsets in images.items():
        path = Path(path)
        img = Image.open(path).convert("RGB")
        w, h = img.size
        cw, ch = round(w * crop), round(h * crop)
        for i, (dx, dy) in enumerate(offsets):
            # A's origin chosen so that both crops fit: A at (ax, ay), B at (ax + dx, ay + dy).
            ax, ay = max(0, -dx), max(0, -dy)
            bx, by = ax + dx, ay + dy
            # Overlap in A's coordinates: x in [max(0, dx), min(cw, cw + dx)), same for y.
            x0, x1 = max(0, dx) + margin, min(cw, cw + dx) - margin
            y0, y1 = max(0, dy) + margin, min(ch, ch + dy) - margin
            if max(ax, bx) + cw > w or max(ay, by) + ch > h or x0 >= x1 or y0 >= y1:
                raise SimsearchError(f"{path}: offset ({dx}, {dy}) leaves no room for two {cw}x{ch} crops "
                                     f"overlapping by more than {margin} px in a {w}x{h} image")
            gx, gy = np.meshgrid(np.linspace(x0, x1, grid), np.linspace(y0, y1, grid))
            src_kps = np.c_[gx.ravel(), gy.ravel()]
            trg_kps = src_kps - [dx, dy]
            name = path.stem
            src, trg = f"{name}_{i}a.jpg", f"{name}_{i}b.jpg"
            _write_image(root, name, src, img.crop((ax, ay, ax + cw, ay + ch)), src_kps)
            _write_image(root, name, trg, img.crop((bx, by, bx + cw, by + ch)), trg_kps)
            _write_pair(root, split, f"{name}-{i}", name, src, trg, src_kps, trg_kps, (cw, ch), (cw, ch))
    return root


def build_graf(root: str | Path, graf_dir: str | Path, grid: int = 8, margin: int = 40, split: str = "test") -> Path:
    """graf1 -> graf3: keypoints on a grid in graf1 mapped by H1to3p; only points landing inside graf3
    with `margin` pixels to spare are kept. The target bounding box is the whole image. -> root"""
    root, graf_dir = Path(root), Path(graf_dir)
    h13 = read_opencv_matrix(graf_dir / "H1to3p.xml")
    img1 = Image.open(graf_dir / "graf1.png").convert("RGB")
    img3 = Image.open(graf_dir / "graf3.png").convert("RGB")
    (w1, h1), (w3, h3) = img1.size, img3.size
    gx, gy = np.meshgrid(np.linspace(margin, w1 - margin, grid), np.linspace(margin, h1 - margin, grid))
    src = np.c_[gx.ravel(), gy.ravel()]
    trg = apply_homography(h13, src)
    inside = (trg[:, 0] >= margin) & (trg[:, 0] <= w3 - margin) & (trg[:, 1] >= margin) & (trg[:, 1] <= h3 - margin)
    src, trg = src[inside], trg[inside]
    _write_image(root, "graf", "graf1.jpg", img1, src)
    _write_image(root, "graf", "graf3.jpg", img3, trg)
    _write_pair(root, split, "graf-1-3", "graf", "graf1.jpg", "graf3.jpg", src, trg, (w1, h1), (w3, h3))
    return root


def read_opencv_matrix(path: str | Path) -> np.ndarray:
    """The first matrix of an OpenCV FileStorage XML file (rows, cols, data)."""
    text = Path(path).read_text()
    try:
        rows = int(re.search(r"<rows>\s*(\d+)\s*</rows>", text).group(1))
        cols = int(re.search(r"<cols>\s*(\d+)\s*</cols>", text).group(1))
        data = re.search(r"<data>(.*?)</data>", text, re.S).group(1).split()
        return np.array([float(v) for v in data], dtype=np.float64).reshape(rows, cols)
    except (AttributeError, ValueError) as e:
        raise SimsearchError(f"{path}: not an OpenCV matrix file ({e})") from None


def apply_homography(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N, 2) points mapped by the 3x3 homography `h`."""
    p = np.c_[xy, np.ones(len(xy))] @ h.T
    return p[:, :2] / p[:, 2:3]


def spread(items, cap: int) -> list:
    """A deterministic subset of at most `cap` items, evenly spaced over the sorted list."""
    items = sorted(items)
    return items if len(items) <= cap else [items[i * len(items) // cap] for i in range(cap)]


# -- writing the layout ------------------------------------------------------------------------------
def _write_image(root: Path, category: str, name: str, img: Image.Image, kps: np.ndarray) -> None:
    (root / "JPEGImages" / category).mkdir(parents=True, exist_ok=True)
    img.save(root / "JPEGImages" / category / name, quality=95)
    (root / "ImageAnnotation" / category).mkdir(parents=True, exist_ok=True)
    w, h = img.size
    (root / "ImageAnnotation" / category / f"{Path(name).stem}.json").write_text(json.dumps(
        {"filename": name, "category": category, "image_width": w, "image_height": h, "bndbox": [0, 0, w - 1, h - 1],
         "kps": {str(k): p for k, p in enumerate(np.round(kps, 2).tolist())}}))


def _write_pair(root: Path, split: str, pair_id: str, category: str, src: str, trg: str, src_kps: np.ndarray,
                trg_kps: np.ndarray, src_size: tuple[int, int], trg_size: tuple[int, int]) -> None:
    """One pair annotation; each bounding box is its whole image."""
    d = root / "PairAnnotation" / split
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{pair_id}.json").write_text(json.dumps({
        "pair_id": pair_id, "category": category, "src_imname": src, "trg_imname": trg,
        "src_imsize": [*src_size, 3], "trg_imsize": [*trg_size, 3],
        "src_bndbox": [0, 0, *src_size], "trg_bndbox": [0, 0, *trg_size],
        "src_kps": np.round(src_kps, 2).tolist(), "trg_kps": np.round(trg_kps, 2).tolist(),
        "kps_ids": [str(i) for i in range(len(src_kps))],
        "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0,
    }))


# -- co-segmentation sets -------------------------------------------------------------------------------
# Cut-out photos with an alpha channel (Debian's tuxpaint stamps, in the benchmarks and tests) pasted onto
# crops of real photos: exact ground-truth masks.
def stamp_paths(stamps: Path, category: str, n: int) -> list[Path]:
    """n stamps of a category folder, evenly spread over its sorted list (pre-mirrored copies skipped)."""
    paths = [p for p in (stamps / category).glob("*.png") if not p.stem.endswith("_mirror")]
    return spread(paths, n)


def composite(stamp: Image.Image, photo: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """The stamp, its longer side scaled to 40-65% of the canvas's shorter side, pasted at a random place
    on a random crop of `photo` of random size (256-352 px a side).
    -> RGB image, its ground-truth mask (alpha >= 128)"""
    w, h = (int(v) for v in rng.integers(256, 353, size=2))
    side = rng.uniform(0.55, 0.9) * min(photo.size)
    cw, ch = (side, side * h / w) if w >= h else (side * w / h, side)
    x0, y0 = rng.uniform(0, photo.width - cw), rng.uniform(0, photo.height - ch)
    canvas = photo.convert("RGB").resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    stamp = stamp.convert("RGBA")
    scale = rng.uniform(0.4, 0.65) * min(w, h) / max(stamp.size)
    stamp = stamp.resize((max(1, round(stamp.width * scale)), max(1, round(stamp.height * scale))),
                         Image.Resampling.LANCZOS)
    x, y = int(rng.integers(0, w - stamp.width + 1)), int(rng.integers(0, h - stamp.height + 1))
    canvas.paste(stamp, (x, y), stamp)
    mask = np.zeros((h, w), dtype=bool)
    mask[y:y + stamp.height, x:x + stamp.width] = np.asarray(stamp.getchannel("A")) >= 128
    return canvas, mask


def composite_set(stamps: Path, category: str, n: int, photos_dir: str | Path, seed: int = 0
                  ) -> tuple[list[Image.Image], list[np.ndarray]]:
    """n stamps of `category`, each on a crop of a different photo of `photos_dir` (seeded)."""
    rng = np.random.default_rng(seed)
    photos = sorted(Path(photos_dir).glob("*.jpg"))
    order = rng.permutation(len(photos))
    images, masks = [], []
    for i, path in enumerate(stamp_paths(stamps, category, n)):
        with Image.open(path) as stamp, Image.open(photos[order[i % len(photos)]]) as photo:
            img, mask = composite(stamp, photo, rng)
        images.append(img)
        masks.append(mask)
    return images, masks
