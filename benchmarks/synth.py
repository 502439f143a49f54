"""Deterministic synthetic image folders for the speed benchmarks (benchmarks/speed.py imports it).

Images are random crops of the bundled samples (examples/images/*.jpg), flipped or not, resized so
that the long side is in [min_side, max_side] and saved as JPEG (quality 85-95). Same seed, same
bytes: a re-run indexes exactly the same files.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from common import EXAMPLES


def make_folder(out: str | Path, n: int, seed: int = 0, min_side: int = 400, max_side: int = 800,
                square: bool = False, per_dir: int = 1000, sources: Path = EXAMPLES) -> list[Path]:
    """Write `n` JPEGs under `out` (subfolders of `per_dir` files) and return their paths.

    Files already present with the expected name are kept (generation is deterministic), so a
    second call on the same folder is cheap.
    """
    out = Path(out)
    srcs = [Image.open(p).convert("RGB") for p in sorted(sources.glob("*.jpg"))]
    if not srcs:
        raise SystemExit(f"no sample images in {sources}")
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        # Draw every random number even when the file exists, so the sequence never shifts.
        src = srcs[rng.randrange(len(srcs))]
        w, h = src.size
        frac = rng.uniform(0.4, 1.0)
        cw, ch = max(16, int(w * frac * rng.uniform(0.8, 1.0))), max(16, int(h * frac * rng.uniform(0.8, 1.0)))
        x0, y0 = rng.randrange(0, w - cw + 1), rng.randrange(0, h - ch + 1)
        flip = rng.random() < 0.5
        side = rng.randint(min_side, max_side)
        quality = rng.randint(85, 95)
        path = out / f"{i // per_dir:03d}" / f"img_{i:06d}.jpg"
        paths.append(path)
        if path.is_file():
            continue
        img = src.crop((x0, y0, x0 + cw, y0 + ch))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if square:
            size = (side, side)
        else:
            scale = side / max(cw, ch)
            size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=quality)
    return paths
