"""Reading image files safely (model input is each backbone's `preprocess`).

Every failure becomes an `ImageError(path, reason)`: the indexer reports it and moves on.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Beyond this many pixels a file is treated as a decompression bomb (Pillow's own default is ~89 Mpx
# and only warns up to twice that; we make the limit a hard error).
MAX_PIXELS = 120_000_000
THUMB_SIZE = 128

ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class LoadedImage:
    path: str
    image: Image.Image  # RGB, EXIF orientation applied, downscaled for the model
    width: int  # original size, after EXIF rotation
    height: int


def iter_image_files(root: str | Path) -> Iterator[Path]:
    """Image files under `root`, recursively and in sorted order.

    Symlinked folders are followed once (a loop is visited once); symlinked files are yielded
    as they are, so a broken link is reported by the loader rather than silently dropped.
    """
    root = Path(root)
    if root.is_file():
        yield root
        return
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale to the 8-bit range instead of clipping.
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" or img.mode == "LA" or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def open_image(source: str | Path | bytes, max_side: int | None = None, name: str | None = None) -> LoadedImage:
    """Decode a file (or its bytes) to RGB. `max_side` lets JPEG decode at reduced size (draft mode)."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as e:
        raise ImageError(label, e.strerror or str(e)) from None
    with fp, warnings.catch_warnings():
        # Pillow warns from ~89 Mpx: MAX_PIXELS is the limit (Pillow still refuses > ~179 Mpx itself).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageError(label, f"{width}x{height} pixels exceeds the {MAX_PIXELS:,}-pixel limit (decompression bomb?)")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated: the first frame stands for the file
            orientation = img.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            if max_side and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(label, f"decompression bomb: {e}") from None
        except UnidentifiedImageError:
            reason = "empty file" if _is_empty(source) else "not an image Pillow can read"
            raise ImageError(label, reason) from None
        except Exception as e:  # noqa: BLE001 - corrupt files also raise TypeError, KeyError, struct.error
            raise ImageError(label, f"cannot decode: {e or type(e).__name__}") from None
    return LoadedImage(path=label, image=preshrink(img, max_side, in_place=True), width=width, height=height)


def preshrink(img: Image.Image, max_side: int | None, in_place: bool = False) -> Image.Image:
    """An image over twice `max_side` box-filtered down to it (cheap, and the model's resize then
    starts near its input size); others as they are. `img` itself changes only `in_place` (an image
    just decoded: no copy of the full-size pixels)."""
    if not max_side or max(img.size) <= 2 * max_side:
        return img
    img = img if in_place else img.copy()
    img.thumbnail((2 * max_side, 2 * max_side), Image.Resampling.BOX)
    return img


def _is_empty(source) -> bool:
    if isinstance(source, bytes):
        return len(source) == 0
    try:
        return os.path.getsize(source) == 0
    except OSError:
        return False


# Grey levels (0-255) below which a cell shows no texture: blank canvas (a rotated copy's black
# corners), sky, an empty page. JPEG's noise on such areas of a thumbnail stays under 1.
FLAT_STD = 3.0
FLAT_CELL_PX = 8  # pixels per cell side at which flatness is judged


def grey_thumbnail(img: Image.Image | bytes) -> np.ndarray | None:
    """The stored thumbnail's grey pixels (H, W) uint8, of an image or of a thumbnail's JPEG bytes
    (None for none: rows written without one). One source for queries and stored rows alike."""
    data = thumbnail_jpeg(img) if isinstance(img, Image.Image) else img
    if not data:
        return None
    with Image.open(io.BytesIO(data)) as thumb:
        return np.asarray(thumb.convert("L"))


def flat_cells(grey: np.ndarray, grid: tuple[int, int], max_std: float = FLAT_STD) -> np.ndarray:
    """Cells of a (h, w) grid over a grey image (H, W), resized whole onto it as the model sees it,
    whose pixels are all but constant (standard deviation under `max_std`) -> (h * w,) bool."""
    h, w = grid
    s = FLAT_CELL_PX
    x = np.asarray(Image.fromarray(grey).resize((w * s, h * s), Image.Resampling.BOX), np.float32)
    return (x.reshape(h, s, w, s).std(axis=(1, 3)) < max_std).reshape(-1)


def thumbnail_jpeg(img: Image.Image, size: int = THUMB_SIZE) -> bytes:
    thumb = img.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=80)
    return buf.getvalue()
