"""simsearch.images: decoding every kind of file to RGB, or failing with ImageError(path, reason)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, broken_files, image_bytes, png_header
from simsearch import images
from simsearch.errors import ImageError
from simsearch.images import iter_image_files, open_image


@pytest.fixture(scope="module")
def chelsea():
    return Image.open(EXAMPLES / "chelsea.jpg").convert("RGB")


def fails(data, *words):
    with pytest.raises(ImageError) as info:
        open_image(data, max_side=56, name="/x/bad.img")
    assert info.value.path == "/x/bad.img"
    for w in words:
        assert w in info.value.reason
    return info.value.reason


# -- broken files ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(broken_files(Image.new("RGB", (8, 8)))))
def test_broken_files_are_image_errors(chelsea, name):
    """Every file of the zoo fails as an ImageError naming the file and the reason (a corrupt TIFF
    raises TypeError inside Pillow, not OSError)."""
    data, word = broken_files(chelsea.resize((96, 72)))[name]
    fails(data, word)


def test_zero_byte_and_text():
    assert fails(b"") == "empty file"
    assert fails(b"this is a text file, not a JPEG\n" * 20) == "not an image Pillow can read"


def test_decompression_bomb_header():
    fails(png_header(20_000, 12_000), "decompression bomb")  # 240 Mpx


def test_bomb_limit_is_max_pixels(monkeypatch, chelsea):
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    reason = fails(image_bytes(chelsea.resize((101, 100)), "PNG"), "exceeds", "decompression bomb")
    assert "101x100" in reason
    assert open_image(image_bytes(chelsea.resize((100, 100)), "PNG")).width == 100


def test_image_below_max_pixels_is_not_called_a_bomb():
    """MAX_PIXELS (120 Mpx) is the documented limit; Pillow's own warning threshold (89 Mpx) must not
    silently lower it. The file is only a header, so it must fail as truncated, not as a bomb."""
    assert 10_000 * 10_000 < images.MAX_PIXELS
    reason = fails(png_header(10_000, 10_000))
    assert "bomb" not in reason, reason


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF", "WEBP", "JPEG"])
def test_fuzzed_files_raise_only_image_error(fmt, chelsea):
    rng = np.random.default_rng(0)
    img = chelsea.resize((48, 32))
    base = image_bytes(img.convert("P") if fmt == "GIF" else img, fmt)
    for _ in range(150):
        data = bytearray(base)
        for pos in rng.integers(0, len(data), rng.integers(1, 6)):
            data[pos] = rng.integers(0, 256)
        if rng.random() < 0.3:
            data = data[: rng.integers(1, len(data))]
        try:
            out = open_image(bytes(data), max_side=56)
        except ImageError:
            continue
        assert out.image.mode == "RGB"


def test_missing_file_path():
    with pytest.raises(ImageError, match="No such file"):
        open_image("/nonexistent/dir/x.jpg")


# -- modes and formats -------------------------------------------------------------------------
def test_grayscale(chelsea):
    out = open_image(image_bytes(chelsea.convert("L"), "JPEG"))
    a = np.asarray(out.image)
    assert out.image.mode == "RGB" and a.shape == (chelsea.height, chelsea.width, 3)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])


def test_cmyk_jpeg(chelsea):
    out = open_image(image_bytes(chelsea.convert("CMYK"), "JPEG", quality=95))
    assert out.image.mode == "RGB" and (out.width, out.height) == chelsea.size
    diff = np.abs(np.asarray(out.image, int) - np.asarray(chelsea, int)).mean()
    assert diff < 8  # colours survive (not inverted, not garbage)


def test_16bit_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    out = open_image(image_bytes(img, "PNG"))
    a = np.asarray(out.image).astype(int)
    assert out.image.mode == "RGB"
    expected = ramp / 65535 * 255
    assert np.abs(a[..., 0] - expected).max() <= 1.0
    assert a.min() == 0 and a.max() == 255
    assert len(np.unique(a)) > 200  # a full ramp, not a clipped plateau at 255


def test_16bit_dark_png_stays_dark():
    dark = np.full((16, 16), 200, np.uint16)  # 200 / 65535: almost black, not 200 / 255
    out = open_image(image_bytes(Image.fromarray(dark), "PNG"))
    assert np.asarray(out.image).max() <= 1


def test_palette_with_transparency_composited_on_white():
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 10, 20))  # left half: index 1, declared transparent
    out = open_image(image_bytes(pal, "PNG", transparency=1))
    assert out.image.getpixel((5, 5)) == (255, 255, 255)
    assert out.image.getpixel((15, 5)) == (255, 0, 0)


def test_rgba_composited_on_white():
    a = np.zeros((10, 20, 4), np.uint8)
    a[..., 2] = 255  # blue
    a[:, 10:, 3] = 255  # right half opaque, left half fully transparent
    a[:, 5, 3] = 128
    out = np.asarray(open_image(image_bytes(Image.fromarray(a, "RGBA"), "PNG")).image).astype(int)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 15]) == (0, 0, 255)
    assert abs(out[0, 5, 0] - 127) <= 2 and out[0, 5, 2] == 255


def test_la_and_float_modes():
    la = Image.fromarray(np.dstack([np.full((8, 8), 0, np.uint8), np.zeros((8, 8), np.uint8)]), "LA")
    assert open_image(image_bytes(la, "PNG")).image.getpixel((1, 1)) == (255, 255, 255)
    f = Image.fromarray(np.full((8, 8), 128.0, np.float32), "F")
    assert open_image(image_bytes(f, "TIFF")).image.getpixel((1, 1)) == (128, 128, 128)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (40, 30), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(__import__("io").BytesIO(data)).n_frames == 3
    out = open_image(data)
    assert out.image.mode == "RGB" and out.image.getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_6(chelsea, fmt):
    stored = chelsea.resize((90, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = open_image(image_bytes(stored, fmt, exif=exif.tobytes(), quality=95), max_side=56)
    assert (out.width, out.height) == (60, 90)  # the size as displayed, not as stored
    assert out.image.size == (60, 90)
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    if fmt == "PNG":
        assert np.array_equal(np.asarray(out.image), np.asarray(upright))
    else:
        assert np.abs(np.asarray(out.image, int) - np.asarray(upright, int)).mean() < 6


def test_huge_jpeg_decodes_small(chelsea):
    big = chelsea.resize((6000, 4000))
    out = open_image(image_bytes(big, "JPEG", quality=80), max_side=56)
    assert (out.width, out.height) == (6000, 4000)  # the original size is reported
    assert max(out.image.size) <= 2 * 56  # but the pixels are reduced for the model


def test_iter_image_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for p in ["z.JPG", "b/y.png", "a/deep/x.webp", "a/w.TIFF", "notes.txt", "a/noext", "a/v.gif"]:
        (tmp_path / p).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert found == ["z.JPG", "a/v.gif", "a/w.TIFF", "a/deep/x.webp", "b/y.png"]
    assert list(iter_image_files(tmp_path / "z.JPG")) == [tmp_path / "z.JPG"]


def test_iter_symlink_loop_and_dangling(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "sub" / "b.png").write_bytes(b"x")
    os.symlink("..", tmp_path / "sub" / "loop")  # points back at the root
    os.symlink(tmp_path / "sub", tmp_path / "sub2")  # a second way to the same folder
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    os.symlink("self.png", tmp_path / "self.png")  # a link to itself
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert sorted(found) == ["a.png", "dangling.png", "self.png", "sub/b.png"]  # each real file once
