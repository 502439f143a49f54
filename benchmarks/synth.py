"""Deterministic synthetic image folders for the speed benchmarks.

Images are random crops of the bundled samples (examples/images/*.jpg), flipped or not, resized so
that the long side is in [min_side, max_side] and saved as JPEG (quality 85-95). Same seed, same
bytes: a re-run indexes exactly the same files.

    python benchmarks/synth.py OUT_DIR -n 512                        # "real-ish" 400-800 px
    python benchmarks/synth.py OUT_DIR -n 10000 --min-side 160 --max-side 160 --square
"""

from __future__ import annotations

import argparse
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("-n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=400)
    ap.add_argument("--max-side", type=int, default=800)
    ap.add_argument("--square", action="store_true", help="exactly side x side instead of keeping the crop's aspect")
    args = ap.parse_args(argv)
    paths = make_folder(args.out, args.n, args.seed, args.min_side, args.max_side, args.square)
    print(f"{len(paths)} images under {args.out}")


if __name__ == "__main__":
    main()
