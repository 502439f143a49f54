"""`simsearch query --html results.html`: a self-contained results page (query, hits, thumbnails, scores,
correspondences), parsed here and rendered in a real browser (headless Chromium from Debian) when one is
installed."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import QUERIES, require

pytestmark = pytest.mark.slow

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
NO_CHROMIUM = "headless Chromium not installed (Debian: `apt-get install -y chromium`)"


@pytest.fixture
def chromium():
    return require(CHROMIUM, NO_CHROMIUM)


class Page(HTMLParser):
    """Rows of the results table's tbody (each a list of its <img> src), and every <img> src."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self.headers: list[str] = []
        self.external: list[str] = []
        self._in_body = self._in_th = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "th":
            self._in_th = True
        elif tag == "img":
            self.images.append(a.get("src", ""))
            if self._in_body and self.rows:
                self.rows[-1].append(a.get("src", ""))
        if tag in ("script", "link", "iframe") or (tag == "img" and not a.get("src", "").startswith("data:")):
            self.external.append(f"<{tag} {a}>")

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th and data.strip():
            self.headers.append(data.strip())


def decode_data_uri(uri: str) -> Image.Image:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:image/") and head.endswith(";base64"), head[:40]
    img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    img.load()
    return img


@pytest.fixture(scope="module")
def page(tmp_path_factory, embedded_db):
    """The page written by `simsearch query --rerank both -k 4 --html` (through the CLI's main)."""
    import sys

    from simsearch.cli import main

    db, _ = embedded_db
    out = tmp_path_factory.mktemp("html") / "results.html"
    argv = sys.argv
    sys.argv = ["simsearch", "query", str(QUERIES / "cat_crop.jpg"), "--db", str(db), "--rerank", "both",
                "--candidates", "12", "-k", "4", "--html", str(out), "--json"]
    try:
        main()
    except SystemExit as e:  # click's standalone mode exits 0 on success
        if e.code not in (0, None):
            pytest.fail(f"simsearch query --html exited with {e.code}")
    finally:
        sys.argv = argv
    return out


def test_html_page_is_self_contained(page):
    text = page.read_text(encoding="utf-8")
    p = Page(text)
    assert len(p.rows) == 4  # one row per hit
    assert all(len(r) == 2 for r in p.rows)  # the hit's thumbnail and its correspondences picture
    assert len(p.images) == 1 + 2 * 4  # plus the query
    assert p.external == []  # nothing to fetch: every image inlined
    for uri in p.images:
        img = decode_data_uri(uri)
        assert img.width > 16 and img.height > 16
    for h in ("rank", "score", "aas", "matches", "path"):
        assert h in p.headers, p.headers
    assert "cat_crop.jpg" in text and "chelsea.jpg" in text


def _chromium(*args, timeout=120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                               "--disable-component-update", "--disable-sync", "--no-first-run",
                               f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout)


def test_html_dom_in_chromium(page, chromium):
    r = _chromium("--dump-dom", page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    dom = Page(r.stdout)
    assert len(dom.rows) == 4
    assert len(dom.images) == 9
    for uri in dom.images:
        decode_data_uri(uri)


def test_html_screenshot_in_chromium(page, tmp_path, chromium):
    shot = tmp_path / "results.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2000)
    px = np.asarray(img, dtype=np.int16)
    top = px[:1100]  # header, query and the four rows
    non_white = (top < 235).any(-1).mean()
    colourful = ((top.max(-1) - top.min(-1)) > 40).mean()  # photos and match lines, not grey text
    assert non_white > 0.15, non_white
    assert colourful > 0.05, colourful
    assert (px[-200:] > 245).all(-1).mean() > 0.95  # the page ends above the bottom: no runaway layout
    # Keep a copy next to the page for a person to look at.
    shutil.copy(shot, Path(page).with_suffix(".png"))
