"""The `simsearch serve` page in headless Chromium from Debian, driven by Playwright against a real
uvicorn server on loopback (the embedded model, real LanceDB and FAISS). Screenshots are kept under
test-artifacts/ at the repository root."""

from __future__ import annotations

import base64
import importlib.util
import os
import re
from pathlib import Path

import httpx
import pytest

from conftest import QUERIES, REPO, require
from live_server import live_server

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
CAT = QUERIES / "cat_crop.jpg"
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def server(embedded_db):
    from simsearch.server import create_app

    with live_server(create_app(embedded_db[0])) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    require(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not installed (Debian: `apt-get install -y chromium`)")
    require(importlib.util.find_spec("playwright"), "playwright not installed (pip install -e '.[test]')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Debian's Chromium, never a browser Playwright downloads.
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server, request):
    """A fresh page at the app; fails the test on any uncaught script error."""
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **getattr(request, "param", {})})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    from playwright.sync_api import expect

    expect(page.locator("#db-summary")).to_contain_text("12 images")
    yield page
    context.close()
    assert errors == []


def shot(page, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"serve-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def hit_names(page) -> list[str]:
    return [os.path.basename(p) for p in page.locator(".hit").evaluate_all("els => els.map(e => e.dataset.path)")]


def wait_for_search(page, mode: str):
    from playwright.sync_api import expect

    expect(page.locator("body")).not_to_have_class(re.compile("busy"), timeout=60_000)
    expect(page.locator("#status")).to_contain_text(f"{mode} hits")


def api_hits(server, mode: str) -> list[str]:
    r = httpx.post(f"{server}/api/search", files={"image": (CAT.name, CAT.read_bytes(), "image/jpeg")},
                   data={"mode": mode, "k": "12"}, timeout=60)
    return [os.path.basename(h["path"]) for h in r.json()["hits"]]


def test_upload_switch_to_style_and_open_a_match(page, server):
    from playwright.sync_api import expect

    page.set_input_files("#file", str(CAT))
    wait_for_search(page, "content")
    assert hit_names(page) == api_hits(server, "content")
    assert hit_names(page)[0] == "chelsea.jpg" and len(hit_names(page)) == 12
    thumbs = page.locator(".hit img")
    page.wait_for_load_state("networkidle")
    assert all(w > 0 for w in thumbs.evaluate_all("els => els.map(e => e.naturalWidth)"))  # every thumbnail loaded
    shot(page, "desktop-content")

    page.check("input[name=mode][value=style]")
    wait_for_search(page, "style")
    assert hit_names(page) == api_hits(server, "style")
    assert hit_names(page)[0] == "chelsea.jpg"

    page.locator(".hit .open").nth(1).click()
    dialog = page.locator("#match")
    expect(dialog).to_be_visible()
    expect(page.locator("#match-path")).to_have_text(page.locator(".hit").nth(1).get_attribute("data-path"))
    picture = page.locator("#match-picture")
    expect(picture).to_have_js_property("complete", True)
    width, height = picture.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert height == 256 and width > 1.5 * height
    shot(page, "desktop-match", full_page=False)

    # Search from the hit: the query becomes that indexed image, which then ranks first.
    hit = page.locator(".hit").nth(1).get_attribute("data-path")
    page.click("#match-search")
    expect(dialog).to_be_hidden()
    expect(page.locator("#status")).to_contain_text("style hits")
    expect(page.locator(".hit").first).to_have_attribute("data-path", hit)
    assert "/api/thumb/" in page.locator("#query-preview").get_attribute("src")


def drop_file_script(event: str) -> str:
    """JS that dispatches a drop or paste carrying the given base64 image as a file."""
    return f"""([b64, name]) => {{
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {{type: "image/jpeg"}}));
        const target = {'document.getElementById("drop")' if event == "drop" else "document"};
        const e = {'new DragEvent("drop", {bubbles: true, cancelable: true, dataTransfer: data})' if event == "drop"
                   else 'new ClipboardEvent("paste", {bubbles: true, cancelable: true, clipboardData: data})'};
        target.dispatchEvent(e);
    }}"""


@pytest.mark.parametrize("event", ["drop", "paste"])
def test_drop_or_paste_an_image(page, event):
    page.evaluate(drop_file_script(event), [base64.b64encode(CAT.read_bytes()).decode(), "dropped.jpg"])
    wait_for_search(page, "content")
    assert hit_names(page)[0] == "chelsea.jpg"
    assert page.locator("#query-preview").get_attribute("src").startswith("blob:")


def test_controls_k_rerank_and_filter(page):
    from playwright.sync_api import expect

    page.set_input_files("#file", str(CAT))
    wait_for_search(page, "content")
    page.fill("#k", "3")
    page.locator("#k").dispatch_event("change")
    expect(page.locator(".hit")).to_have_count(3)
    page.select_option("#rerank", "both")
    expect(page.locator("#status")).to_contain_text("reranked by both")
    page.fill("#where", "path NOT LIKE '%chelsea%'")
    page.locator("#where").press("Enter")  # commits the text: a "change" event
    expect(page.locator("#status")).to_contain_text("where path NOT LIKE '%chelsea%', reranked by both")
    assert len(hit_names(page)) == 3 and "chelsea.jpg" not in hit_names(page)
    page.locator("#info summary").click()
    expect(page.locator("#info-list")).to_contain_text("dinov2-s14-imgfocus")
    expect(page.locator("#info-list")).to_contain_text("dense layer")


def test_user_text_is_never_markup(page):
    """A filter and a file name that are HTML show as text: no element is made from them, no script runs."""
    from playwright.sync_api import expect

    evil = '<img src=x onerror=window.pwned=1>'
    page.set_input_files("#file", files=[{"name": f"{evil}.jpg", "mimeType": "image/jpeg", "buffer": b"not a jpeg"}])
    expect(page.locator("#status")).to_have_class("status error")
    expect(page.locator("#status")).to_contain_text(f"{evil}.jpg: not an image")
    page.set_input_files("#file", str(CAT))
    wait_for_search(page, "content")
    page.fill("#where", f"path = '{evil}' OR {evil}")
    page.locator("#where").dispatch_event("change")
    expect(page.locator("#status")).to_contain_text("invalid --where filter")
    expect(page.locator("#status")).to_contain_text(evil)
    assert page.locator("#status *").count() == 0
    assert page.evaluate("() => window.pwned") is None


@pytest.mark.parametrize("page", [dict(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)],
                         indirect=True)
def test_phone_viewport(page):
    from playwright.sync_api import expect

    page.set_input_files("#file", str(CAT))
    wait_for_search(page, "content")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
    first, second = (page.locator(".hit").nth(i).bounding_box() for i in (0, 1))
    assert abs(first["y"] - second["y"]) < 1 and first["x"] + first["width"] <= second["x"]  # two columns
    assert second["x"] + second["width"] <= PHONE["width"]
    drop = page.locator("#drop").bounding_box()
    assert drop["width"] > 0.8 * PHONE["width"]  # the query area spans the screen
    shot(page, "phone-results")
    page.locator(".hit .open").first.tap()
    expect(page.locator("#match-picture")).to_have_js_property("complete", True)
    box = page.locator("#match-picture").bounding_box()
    assert box["width"] <= PHONE["width"] and box["height"] > 50
    shot(page, "phone-match", full_page=False)
