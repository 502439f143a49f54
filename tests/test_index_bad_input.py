"""Indexing folders full of awkward files with the tiny model: every file either indexes correctly
or is reported in report.failed with its path and a reason; the run goes on; rows already stored
survive unchanged."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, broken_files, cli_command, image_bytes, table_rows, tiny_cli_options
from simsearch.store import path_key


def build_zoo(root: Path) -> tuple[set[str], dict[str, str]]:
    """Awkward files under root. -> (paths that must index, {path: word expected in the failure reason})."""
    src = Image.open(EXAMPLES / "astronaut.jpg").convert("RGB").resize((96, 72))
    good, bad = set(), {}

    def put(rel, data, expect=None):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if expect is None:
            good.add(str(p))
        else:
            bad[str(p)] = expect

    # decodable, in every mode
    put("modes/gray.jpg", image_bytes(src.convert("L"), "JPEG"))
    put("modes/cmyk.jpg", image_bytes(src.convert("CMYK"), "JPEG"))
    ramp = (np.linspace(0, 65535, 72 * 96).reshape(72, 96)).astype(np.uint16)
    put("modes/sixteen.png", image_bytes(Image.fromarray(ramp), "PNG"))
    pal = src.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("modes/palette.png", image_bytes(pal, "PNG", transparency=0))
    rgba = src.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(src.size))
    put("modes/alpha.png", image_bytes(rgba, "PNG"))
    frames = [src.rotate(a) for a in (0, 90, 180)]
    put("modes/anim.gif", image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40))
    exif = Image.Exif()
    exif[0x0112] = 6
    put("modes/exif6.jpg", image_bytes(src, "JPEG", exif=exif.tobytes()))
    put("modes/huge.jpg", image_bytes(src.resize((6000, 4000)), "JPEG", quality=70))
    put("modes/photo.webp", image_bytes(src, "WEBP"))
    put("modes/photo.bmp", image_bytes(src, "BMP"))
    put("modes/photo.tif", image_bytes(src, "TIFF"))
    put("modes/UPPER.JPEG", image_bytes(src, "JPEG"))
    # unicode names
    put("unicodé/café ☕.png", image_bytes(src.rotate(45), "PNG"))
    put("unicodé/日本語の写真.jpg", image_bytes(src.rotate(30), "JPEG"))
    put("unicodé/it's \"quoted\".png", image_bytes(src.rotate(60), "PNG"))
    # a folder whose name looks like an image: walked into, not read as a file
    put("folder.jpg/inside.png", image_bytes(src.rotate(10), "PNG"))
    # broken
    for name, (data, word) in broken_files(src).items():
        put(f"broken/{name}", data, word)
    # unreadable: a dangling link, a link to itself, a file whose read fails with EIO
    os.symlink(root / "nowhere.jpg", root / "broken" / "dangling.jpg")
    bad[str(root / "broken" / "dangling.jpg")] = "No such file"
    os.symlink("selfref.png", root / "broken" / "selfref.png")
    bad[str(root / "broken" / "selfref.png")] = "symbolic links"
    if Path("/proc/self/mem").exists():
        os.symlink("/proc/self/mem", root / "broken" / "eio.jpg")
        bad[str(root / "broken" / "eio.jpg")] = "error"
    # a loop: a folder link pointing back at its parent (its files must not appear twice)
    os.symlink("..", root / "modes" / "loop")
    return good, bad


def test_zoo_indexes_or_reports_each_file(tmp_path, new_index):
    root = tmp_path / "zoo"
    good, bad = build_zoo(root)
    idx = new_index(tmp_path / "db")
    report = idx.add_folder(root, batch_size=4)

    failed = dict(report.failed)
    assert set(failed) == set(bad), f"failed: {failed}"
    for path, word in bad.items():
        assert word.lower() in failed[path].lower(), (path, failed[path])
    assert report.added == len(good) and report.updated == 0
    rows = table_rows(tmp_path / "db")
    assert {r["path"] for r in rows} == good
    assert len(rows) == len(good)  # the loop did not index anything twice
    assert idx.count() == len(good)
    for r in rows:
        assert r["key"] == path_key(r["path"])
        assert r["width"] > 0 and r["height"] > 0
    by_name = {Path(r["path"]).name: r for r in rows}
    assert (by_name["huge.jpg"]["width"], by_name["huge.jpg"]["height"]) == (6000, 4000)
    assert (by_name["exif6.jpg"]["width"], by_name["exif6.jpg"]["height"]) == (72, 96)  # displayed size
    assert (by_name["sixteen.png"]["width"], by_name["sixteen.png"]["height"]) == (96, 72)

    # every indexed file finds itself first, under its exact (unicode) path
    for name in ["café ☕.png", "日本語の写真.jpg", "it's \"quoted\".png", "sixteen.png", "anim.gif"]:
        path = by_name[name]["path"]
        hit = idx.search(path, k=1)[0]
        assert hit.path == path and hit.score == pytest.approx(1.0, abs=1e-4)
    hits = idx.search(by_name["café ☕.png"]["path"], k=3, where="path LIKE '%unicodé%'")
    assert {Path(h.path).parent.name for h in hits} == {"unicodé"}

    # a second run: nothing new, the same failures, nothing lost
    again = idx.add_folder(root)
    assert (again.added, again.updated, again.skipped) == (0, 0, len(good))
    assert dict(again.failed).keys() == failed.keys()
    assert table_rows(tmp_path / "db") == rows


def test_bad_files_never_cost_stored_rows(tmp_path, new_index, photos):
    idx = new_index(tmp_path / "db")
    first = idx.add_folder(photos)
    assert first.added == 12 and not first.failed
    before = {r["path"]: r for r in table_rows(tmp_path / "db")}

    _, bad = build_zoo(photos / "later")
    for name in ["chelsea.jpg", "coffee.jpg"]:  # two already-indexed files become garbage
        (photos / name).write_bytes(b"\xff\xd8\xff garbage")
        bad[str(photos / name)] = "cannot"
    report = idx.add_folder(photos)
    assert set(dict(report.failed)) == set(bad)
    after = {r["path"]: r for r in table_rows(tmp_path / "db")}
    for path, row in before.items():  # every earlier row is still there, with the same content id
        assert after[path]["id"] == row["id"] and after[path]["key"] == row["key"]
    assert len(after) == 12 + report.added


def test_exif_rotated_embeds_like_the_rotated_pixels(tmp_path, new_index):
    """Orientation 6 in a PNG (lossless): the embedding equals that of the physically rotated image."""
    folder = tmp_path / "exif"
    folder.mkdir()
    stored = Image.open(EXAMPLES / "astronaut.jpg").convert("RGB").resize((84, 56))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "tagged.png", exif=exif.tobytes())
    stored.transpose(Image.Transpose.ROTATE_270).save(folder / "upright.png")
    stored.save(folder / "stored.png")  # the same pixels, no tag
    stored.save(folder / "tagged.jpg", exif=exif.tobytes(), quality=95)
    # the JPEG's own decoded pixels, rotated by hand and stored losslessly
    Image.open(folder / "tagged.jpg").transpose(Image.Transpose.ROTATE_270).save(folder / "jpeg_upright.png")
    idx = new_index(tmp_path / "db")
    assert idx.add_folder(folder).added == 5
    keys, vecs = idx.store.vectors("content")
    v = {k: vec for k, vec in zip(keys, vecs)}
    tagged, upright, plain = (v[path_key(str(folder / n))] for n in ("tagged.png", "upright.png", "stored.png"))
    assert np.allclose(tagged, upright, atol=1e-5)
    assert not np.allclose(tagged, plain, atol=1e-3)  # the model does see the rotation
    jpeg, jpeg_upright = (v[path_key(str(folder / n))] for n in ("tagged.jpg", "jpeg_upright.png"))
    assert np.allclose(jpeg, jpeg_upright, atol=1e-5)
    hits = idx.search(folder / "tagged.png", k=3)
    assert {hits[0].path, hits[1].path} == {str(folder / "tagged.png"), str(folder / "upright.png")}
    rows = {Path(r["path"]).name: (r["width"], r["height"]) for r in table_rows(tmp_path / "db")}
    assert rows == {"tagged.png": (56, 84), "upright.png": (56, 84), "stored.png": (84, 56),
                    "tagged.jpg": (56, 84), "jpeg_upright.png": (56, 84)}


def test_sixteen_bit_png_embeds_like_its_8bit_version(tmp_path, new_index):
    folder = tmp_path / "bits"
    folder.mkdir()
    rng = np.random.default_rng(0)
    eight = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8), dtype=np.uint8)).resize((64, 48)))
    Image.fromarray(eight.astype(np.uint16) * 257).save(folder / "sixteen.png")
    Image.fromarray(eight).save(folder / "eight.png")
    Image.fromarray(np.minimum(eight.astype(np.uint16) * 257, 255).astype(np.uint8)).save(folder / "clipped.png")
    idx = new_index(tmp_path / "db")
    idx.add_folder(folder)
    keys, vecs = idx.store.vectors("content")
    v = {k: vec for k, vec in zip(keys, vecs)}
    sixteen, eight_v = v[path_key(str(folder / "sixteen.png"))], v[path_key(str(folder / "eight.png"))]
    assert np.allclose(sixteen, eight_v, atol=1e-5)


def test_fifo_named_jpg_does_not_hang(tmp_path, new_index, photos):
    """A named pipe with an image extension must be reported, not read (reading blocks forever)."""
    fifo = photos / "pipe.jpg"
    os.mkfifo(fifo)
    idx = new_index(tmp_path / "db")
    result = {}
    worker = threading.Thread(target=lambda: result.update(report=idx.add_folder(photos)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    hung = worker.is_alive()
    if hung:  # unblock the reader so that the test process can exit
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(timeout=30)
    assert not hung, "indexing blocked on reading a FIFO"
    report = result["report"]
    assert report.added == 12
    assert [p for p, _ in report.failed] == [str(fifo)]


def test_non_utf8_file_name(tmp_path, new_index, photos):
    """A file name that is not valid UTF-8 (e.g. latin-1 from an old archive) must not abort the run."""
    raw = os.fsencode(photos) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write((EXAMPLES / "coffee.jpg").read_bytes())
    idx = new_index(tmp_path / "db")
    report = idx.add_folder(photos)  # must not raise
    # the table stores UTF-8 text: the file is reported (by its name as the OS spells it), the rest indexed
    assert report.failed == [(os.fsdecode(raw), "file name is not valid UTF-8")]
    assert report.added == 12 and idx.count() == 12


def test_unreadable_file_mode_000(tmp_path, tiny_model, photos):
    """A file the indexer may not read is reported `Permission denied` and the run goes on. Root reads
    any file, so as root (CI) the real CLI runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    (util-linux `setpriv`), where mode 000 means what it says; as any other user it runs as is."""
    locked = photos / "locked.jpg"
    locked.write_bytes((EXAMPLES / "rocket.jpg").read_bytes())
    locked.chmod(0)
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    try:
        proc = subprocess.run([*drop, *cli_command(), "index", str(photos), "--db", str(tmp_path / "db"),
                               *tiny_cli_options(tiny_model)], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, COLUMNS="300"))
    finally:
        locked.chmod(0o644)
    assert proc.returncode == 0, proc.stderr
    assert f"failed: {locked}: Permission denied" in proc.stderr
    assert "added 12 · " in proc.stdout and "failed 1" in proc.stdout
