"""Real source vectors for the scale benchmark: >= 10,000 distinct images from Debian icon themes and
tuxpaint stamps, embedded once with the embedded DINOv2-S/14 and cached outside the repository.

    python benchmarks/scale_data.py [--root DIR] [--n 12000]
    python benchmarks/scale_data.py --root DIR --images FOLDER --model M   # other sources (the smoke test)

Steps (each skipped when its output exists; safe to interrupt and re-run):
  sources  `apt-get download` + `dpkg -x` the packages below into ROOT/pkgs; one file per icon name and
           theme (the largest PNG, or the SVG rendered to 224 px by rsvg-convert); deduplicated by the
           blake2b of the decoded pixels; written as PNGs under ROOT/rendered/scale-icons/<theme>/.
  embed    content and style vectors of every source into ROOT/scale-embeddings/part-NNN.npz (1,000
           images a part), and the float32 dense tensors of the first DENSE_SAMPLE tuxpaint stamps
           and icons into ROOT/scale-embeddings/dense.npz (the compact codec's rank agreement).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data import _rsvg, fetch
from debian_data import data_root as default_root
from simsearch.backbones import DEFAULT_MODEL
from simsearch.bench.fixtures import spread

PNG_THEMES = ["oxygen-icon-theme", "elementary-xfce-icon-theme", "faenza-icon-theme", "moka-icon-theme",
              "tuxpaint-stamps-default"]
SVG_THEMES = ["papirus-icon-theme", "breeze-icon-theme"]
SIDE = 224
PART = 1000
DENSE_SAMPLE = 600


def _size(path: Path) -> int:
    """Icon size from its folder (`256x256/`, `/48/`), 0 when not named."""
    m = re.search(r"/(\d+)x\d+(?:@\d+x)?/|/(\d+)/", str(path))
    return int(m.group(1) or m.group(2)) if m else 0


def candidates(root: Path) -> list[tuple[str, Path]]:
    """(theme, file) with one file per icon name and theme: the largest PNG, or one SVG."""
    out = []
    for theme in PNG_THEMES + SVG_THEMES:
        tree = fetch(root, theme)
        best: dict[str, Path] = {}
        pattern = "*.png" if theme in PNG_THEMES else "*.svg"
        for p in sorted(tree.rglob(pattern)):
            if p.is_symlink() or p.stem.endswith("_mirror"):
                continue
            if p.stem not in best or _size(p) > _size(best[p.stem]):
                best[p.stem] = p
        out += [(theme, best[k]) for k in sorted(best)]
    return out


def sources(root: Path, n: int) -> list[Path]:
    """The first `n` distinct rendered sources (cached list in ROOT/rendered/scale-icons/list.txt)."""
    folder = root / "rendered" / "scale-icons"
    listing = folder / "list.txt"
    if listing.exists():
        paths = [Path(line) for line in listing.read_text().splitlines()]
        if len(paths) >= n:
            return paths[:n]
    rsvg, seen, paths = _rsvg(root), set(), []
    cands = candidates(root)
    pngs = [c for c in cands if c[0] in PNG_THEMES]
    svgs = spread([c for c in cands if c[0] in SVG_THEMES], max(0, int(1.15 * n) - len(pngs)))
    for i, (theme, src) in enumerate(pngs + svgs):
        out = folder / theme / f"{src.stem}.png"
        if not out.exists():
            try:
                if src.suffix == ".svg":
                    data = subprocess.run([rsvg, "-w", str(SIDE), "-h", str(SIDE), "-a", str(src)],
                                          check=True, capture_output=True, timeout=60).stdout
                    img = Image.open(io.BytesIO(data))
                else:
                    img = Image.open(src)
                img.load()
            except (subprocess.SubprocessError, OSError) as e:
                print(f"skip {src}: {e}", file=sys.stderr)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            img.convert("RGBA").save(tmp := out.with_suffix(".part.png"))
            tmp.rename(out)
        digest = hashlib.blake2b(np.asarray(Image.open(out).convert("RGBA")).tobytes(), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            paths.append(out)
        if i % 1000 == 0:
            print(f"sources: {i}/{len(pngs) + len(svgs)} -> {len(paths)} distinct", file=sys.stderr)
    listing.write_text("".join(f"{p}\n" for p in paths))
    if len(paths) < n:
        sys.exit(f"only {len(paths)} distinct sources (wanted {n})")
    return paths[:n]


def embed(root: Path, paths: list[Path], model: str) -> Path:
    from simsearch.embedder import DescriptorConfig, Embedder
    from simsearch.images import open_image

    out = root / "scale-embeddings"
    out.mkdir(parents=True, exist_ok=True)
    emb = Embedder(DescriptorConfig.for_model(model), "cpu")
    tux = [p for p in paths if "tuxpaint" in str(p)]
    dense_paths = set(spread(tux, DENSE_SAMPLE // 2) + spread([p for p in paths if p not in set(tux)], DENSE_SAMPLE // 2))
    dense: dict[str, np.ndarray] = {}
    dense_file = out / "dense.npz"
    for start in range(0, len(paths), PART):
        part = out / f"part-{start // PART:03d}.npz"
        chunk = paths[start:start + PART]
        if part.exists() and (dense_file.exists() or not dense_paths & set(chunk)):
            continue
        content, style = [], []
        for b in range(0, len(chunk), 32):
            batch = chunk[b:b + 32]
            pixels = np.stack([emb.preprocess(open_image(p.read_bytes(), max_side=emb.conf.image_size, name=str(p)).image)
                                  for p in batch])
            e = emb.embed(pixels)
            content.append(e.content)
            style.append(e.style)
            dense.update({str(p): d for p, d in zip(batch, e.dense) if p in dense_paths})
        np.savez(part, paths=np.array([str(p) for p in chunk]), content=np.concatenate(content),
                 style=np.concatenate(style))
        print(f"embed: {start + len(chunk)}/{len(paths)}", file=sys.stderr)
    if dense and not dense_file.exists():
        names = sorted(dense)
        np.savez(dense_file, paths=np.array(names), dense=np.stack([dense[k] for k in names]))
    return out


def load(root: Path | None = None) -> dict[str, np.ndarray]:
    """{paths, content, style} of every embedded part, in source order."""
    parts = sorted((Path(root or default_root()) / "scale-embeddings").glob("part-*.npz"))
    if not parts:
        sys.exit("no cached embeddings: run `python benchmarks/scale_data.py` first")
    loaded = [np.load(p) for p in parts]
    return {k: np.concatenate([x[k] for x in loaded]) for k in ("paths", "content", "style")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--n", type=int, default=12000)
    ap.add_argument("--images", type=Path, default=None, help="the images of this folder as the sources")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    args = ap.parse_args(argv)
    root = args.root or default_root()
    paths = sorted(p for p in args.images.iterdir() if p.is_file())[:args.n] if args.images else sources(root, args.n)
    print(f"{len(paths)} distinct sources", file=sys.stderr)
    print(embed(root, paths, args.model))


if __name__ == "__main__":
    main()
