"""Co-segmentation sets with exact ground truth: Debian's tuxpaint stamps (cut-out photos with an
alpha channel) pasted onto crops of the example photos (examples/images, CC0 / public domain).

    stamps = stamps_dir()                                  # None when the package is missing
    images, masks = composite_set(stamps, "food/fruit", n=6, seed=0)

The stamps come from the data root of benchmarks/data.py ($SIMSEARCH_DATA or
~/.cache/simsearch-data): `pkgs/tuxpaint-stamps-default`, unpacked from `debs/` with its `fetch` when
only the downloaded .deb is there (`make test-deps` downloads it). Used by tests/test_coseg.py and
benchmarks/coseg.py (loaded by file path).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "images"
PACKAGE = "tuxpaint-stamps-default"
STAMPS = Path("usr/share/tuxpaint/stamps")
# Folders of cut-out photos (drawings live in `cartoon/` subfolders, which are not read).
CATEGORIES = ["animals/birds", "animals/fish", "animals/insects", "animals/mammals", "animals/mammals/bovines",
              "food/fruit", "food/vegetables", "household/tools", "plants/flowers", "space/planets"]


def _data_module():
    spec = importlib.util.spec_from_file_location("simsearch_bench_data", REPO / "benchmarks" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stamps_dir() -> Path | None:
    """The unpacked stamps folder, unpacking a downloaded .deb if that is all there is; None when
    neither is there (this never downloads)."""
    data = _data_module()
    root = data.default_root()
    tree = root / "pkgs" / PACKAGE / STAMPS
    if not tree.is_dir() and list((root / "debs").glob(f"{PACKAGE}_*.deb")):
        data.fetch(root, PACKAGE)
    return tree if tree.is_dir() else None


def stamp_paths(stamps: Path, category: str, n: int) -> list[Path]:
    """n stamps of a category folder, evenly spread over its sorted list (pre-mirrored copies skipped)."""
    paths = [p for p in (stamps / category).glob("*.png") if not p.stem.endswith("_mirror")]
    return _data_module().spread(paths, n)


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


def composite_set(stamps: Path, category: str, n: int, seed: int = 0) -> tuple[list[Image.Image], list[np.ndarray]]:
    """n stamps of `category`, each on a crop of a different example photo (seeded)."""
    rng = np.random.default_rng(seed)
    photos = sorted(EXAMPLES.glob("*.jpg"))
    order = rng.permutation(len(photos))
    images, masks = [], []
    for i, path in enumerate(stamp_paths(stamps, category, n)):
        with Image.open(path) as stamp, Image.open(photos[order[i % len(photos)]]) as photo:
            img, mask = composite(stamp, photo, rng)
        images.append(img)
        masks.append(mask)
    return images, masks
