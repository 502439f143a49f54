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
    expect(page.locator("#status")).to_contain_text("invalid filter where=")
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


# -- the collection, regions, verified matches, duplicates -------------------------------------
def tile_keys(page) -> list[str]:
    return page.locator(".tile").evaluate_all("els => els.map(e => e.dataset.key)")


def test_collection_pages_and_searches_from_a_tile(page, server):
    from playwright.sync_api import expect

    page.goto(server + "/?per_page=5")
    expect(page.locator(".tile")).to_have_count(5)
    seen = []
    for offset, count in ((0, 5), (5, 5), (10, 2)):
        expect(page.locator("#page-info")).to_have_text(f"{offset + 1}–{offset + count} of 12")
        expected = httpx.get(f"{server}/api/images", params={"offset": offset, "limit": 5}).json()["images"]
        assert tile_keys(page) == [i["key"] for i in expected]
        seen += tile_keys(page)
        if offset == 0:
            page.wait_for_load_state("networkidle")
            assert all(w > 0 for w in page.locator(".tile img").evaluate_all("els => els.map(e => e.naturalWidth)"))
            shot(page, "collection")
        if offset < 10:
            page.click("#next")
    expect(page.locator("#next")).to_be_disabled()
    assert len(set(seen)) == 12
    tile = page.locator(".tile").nth(1)
    path = tile.get_attribute("data-path")
    tile.locator(".search-this").click()
    wait_for_search(page, "content")
    expect(page.locator("#results-view")).to_be_visible()
    expect(page.locator(".hit").first).to_have_attribute("data-path", path)  # an indexed image finds itself first
    assert page.locator("#query-preview").get_attribute("src") == f"/api/thumb/{tile.get_attribute('data-key')}"


def drag(page, selector: str, start: tuple[float, float], end: tuple[float, float]):
    """Press, move and release the mouse between two points given as fractions of the element's box."""
    box = page.locator(selector).bounding_box()
    at = lambda f: (box["x"] + f[0] * box["width"], box["y"] + f[1] * box["height"])
    page.mouse.move(*at(start))
    page.mouse.down()
    page.mouse.move(*at(end), steps=8)
    page.mouse.up()


def expected_box(size, start, end) -> str:
    import math

    w, h = size
    return ",".join(map(str, (math.floor(start[0] * w), math.floor(start[1] * h), math.ceil(end[0] * w), math.ceil(end[1] * h))))


def test_dragged_region_is_sent_in_image_pixels(page, server, embedded_db):
    """A box dragged on an indexed image (via "region") and on an upload goes to the server in pixels
    of the original image, and the region's results come back (the image it was cut from first)."""
    from PIL import Image
    from playwright.sync_api import expect

    page.goto(server + "/?per_page=12")
    tile = page.locator(".tile", has=page.locator("img[alt='chelsea.jpg']"))
    tile.locator(".region-this").click()
    expect(page.locator("#region-note")).to_contain_text("drag a box")
    expect(page.locator("#query-preview")).to_have_js_property("complete", True)
    start, end = (0.2, 0.25), (0.7, 0.8)
    with page.expect_request(lambda r: r.url.startswith(f"{server}/api/search?")) as request:
        drag(page, "#query-preview", start, end)
    size = Image.open(embedded_db[1] / "chelsea.jpg").size
    sent = dict(httpx.URL(request.value.url).params)
    assert sent["box"] == expected_box(size, start, end) and sent["key"] == tile.get_attribute("data-key")
    expect(page.locator("#region-text")).to_have_text(f"region {sent['box']} of {size[0]}×{size[1]} px")
    expect(page.locator("#status")).to_contain_text(f"hits for the region {sent['box']}", timeout=120_000)
    expect(page.locator("#status")).to_contain_text("reranked by verified")
    assert page.locator("#results .hit").first.get_attribute("data-path").endswith("chelsea.jpg")
    drawn = page.locator("#box").bounding_box()
    preview = page.locator("#query-preview").bounding_box()
    assert abs(drawn["x"] - (preview["x"] + start[0] * preview["width"])) < 3
    assert abs(drawn["width"] - (end[0] - start[0]) * preview["width"]) < 4
    shot(page, "region", full_page=False)

    page.set_input_files("#file", str(CAT))
    wait_for_search(page, "content")
    # Playwright does not expose a multipart body that holds a file: record the form's text fields as sent.
    page.evaluate("""() => { window.sentForms = []; const send = window.fetch;
        window.fetch = (url, options) => { if (options && options.body instanceof FormData)
            window.sentForms.push(Object.fromEntries([...options.body].filter(([, v]) => typeof v === "string")));
          return send(url, options); }; }""")
    with page.expect_request(lambda r: r.url == f"{server}/api/search" and r.method == "POST"):
        drag(page, "#query-preview", start, end)
    box = expected_box(Image.open(CAT).size, start, end)
    assert page.evaluate("() => window.sentForms")[-1]["box"] == box
    page.click("#region-clear")  # the whole image again: no box sent
    wait_for_search(page, "content")
    assert page.locator("#box").is_hidden()


def test_match_view_draws_every_verified_correspondence(page, server):
    from playwright.sync_api import expect

    page.set_input_files("#file", str(CAT))
    wait_for_search(page, "content")
    page.select_option("#rerank", "verified")
    expect(page.locator("#status")).to_contain_text("reranked by verified")
    r = httpx.post(f"{server}/api/search", files={"image": (CAT.name, CAT.read_bytes(), "image/jpeg")},
                   data={"k": "12", "rerank": "verified"}, timeout=120).json()
    hit = r["hits"][0]
    assert hit["matches"] and hit_names(page)[0] == os.path.basename(hit["path"])
    page.locator(".hit .open").first.click()
    lines = page.locator("#match-lines g.match-line line")
    expect(lines).to_have_count(len(hit["matches"]))
    expect(page.locator("#match-caption")).to_contain_text(f"{len(hit['matches'])} verified correspondences")
    # Each end sits on its image's point: query pixels scaled by 256 / frame height, the hit's beside it.
    qs = 256 / r["query"]["frame"][1]
    left = r["query"]["frame"][0] * qs + 12
    hs = 256 / hit["height"]
    ends = lines.evaluate_all("els => els.map(l => ['x1', 'y1', 'x2', 'y2'].map(a => Number(l.getAttribute(a))))")
    for (x1, y1, x2, y2), m in zip(ends, hit["matches"]):
        assert (x1, y1) == pytest.approx((m["query"][0] * qs, m["query"][1] * qs), abs=1e-3)
        assert (x2, y2) == pytest.approx((left + m["hit"][0] * hs, m["hit"][1] * hs), abs=1e-3)
    assert page.locator("#match-picture").is_hidden()
    drawn = page.locator("#match-lines").bounding_box()
    assert drawn["height"] > 150 and drawn["width"] == pytest.approx(drawn["height"] * (left + hit["width"] * hs) / 256, rel=0.02)
    images = page.locator("#match-lines image").evaluate_all("els => els.map(e => e.getAttribute('href'))")
    assert images[0].startswith("blob:") and images[1] == f"/api/thumb/{hit['key']}"
    shot(page, "match-verified", full_page=False)


DEDUP_STUB = {  # the schema of GET /api/dedup, for the rendering test only
    "reclaimable_bytes": 123_456, "pairs_verified": 7, "table_version": 3,
    "groups": [{"group": 1, "representative": None, "members": []}],
}


def test_dedup_view_renders_groups(page, server, embedded_db):
    """How the view draws what /api/dedup answers (a fixed answer routed in the browser; the real
    endpoint's test follows): the representative marked keep, scores, inliers, bytes, no deleting,
    and a path of markup shown as text."""
    from playwright.sync_api import expect

    listed = httpx.get(f"{server}/api/images", params={"limit": 3}).json()["images"]
    evil = '<img src=x onerror=window.pwned=1>.jpg'
    members = [{"key": listed[0]["key"], "path": listed[0]["path"], "role": "keep", "score": 1.0, "inliers": 0, "bytes": 5000},
               {"key": listed[1]["key"], "path": f"/x/{evil}", "role": "duplicate", "score": 0.9712, "inliers": 41, "agreement": 0.834, "bytes": 4000},
               {"key": listed[2]["key"], "path": listed[2]["path"], "role": "exact", "score": 1.0, "inliers": 64, "bytes": 3000}]
    answer = {**DEDUP_STUB, "groups": [{"group": 1, "representative": listed[0]["key"], "members": members}]}
    requests = []

    def fulfill(route):
        requests.append(route.request.url)
        route.fulfill(json=answer)

    page.route("**/api/dedup?*", fulfill)
    page.click(".views button[data-view=dedup]")
    group = page.locator(".group")
    expect(group).to_have_count(1)
    expect(page.locator("#dedup-summary")).to_have_text("1 groups · 123 KB reclaimable · 7 pairs verified")
    expect(group.locator("h3")).to_have_text("group 1 · 3 images · 7.0 KB reclaimable")
    assert group.locator(".member").evaluate_all("els => els.map(e => e.dataset.role)") == ["keep", "duplicate", "exact"]
    expect(group.locator(".member.representative .role")).to_have_text("keep")
    expect(group.locator(".member").nth(1).locator(".facts")).to_have_text("score 0.971 · 41 inliers · agreement 0.83 · 4.0 KB")
    expect(group.locator(".member").nth(1).locator(".path")).to_have_text(evil)
    assert page.evaluate("() => window.pwned") is None and group.locator(".path *").count() == 0
    offered = page.locator("#dedup-view button, #dedup-view a").evaluate_all("els => els.map(e => e.textContent)")
    assert offered and not [t for t in offered if re.search("delete|remove|trash|move", t, re.I)], offered
    page.wait_for_load_state("networkidle")
    shot(page, "dedup")
    # A tile's "duplicates" asks for its group by key and shows only the group that holds it.
    page.click(".views button[data-view=collection]")
    page.locator(f".tile[data-key='{listed[1]['key']}'] .dups-this").click()
    expect(group).to_have_count(1)
    assert dict(httpx.URL(requests[-1]).params)["key"] == listed[1]["key"]
    expect(page.locator("#dedup-scope")).to_have_text(f"the group of {os.path.basename(listed[1]['path'])}")


@pytest.fixture(scope="module")
def folder_server(tmp_path_factory, tiny_model):
    """A server over the 12 photos split into a/ and b/deep/, and a byte-exact copy of one of them in a/
    (the tiny random model: folders and exact duplicates need no trained one)."""
    import shutil

    from conftest import EXAMPLES, TINY
    from simsearch import Index
    from simsearch.server import create_app

    root = tmp_path_factory.mktemp("folders")
    for i, p in enumerate(sorted(EXAMPLES.glob("*.jpg"))):
        (root / "photos" / ("a" if i % 2 else "b/deep")).mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, root / "photos" / ("a" if i % 2 else "b/deep") / p.name)
    shutil.copy2(EXAMPLES / "coffee.jpg", root / "photos" / "a" / "coffee-copy.jpg")
    index = Index(root / "db", model=str(tiny_model), **TINY)
    index.add_folder(root / "photos")
    with live_server(create_app(index)) as url:
        yield url, root / "photos"


def test_folders_filter_the_collection(browser, folder_server):
    from playwright.sync_api import expect

    url, photos = folder_server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    expect(page.locator(".tile")).to_have_count(13)
    expect(page.locator(".crumb.current")).to_have_text("photos")
    assert page.locator(".folder").evaluate_all("els => els.map(e => e.textContent)") == ["a 7", "b 6"]
    page.locator(".folder[data-path$='/b']").click()
    expect(page.locator(".crumb.current")).to_have_text("deep")  # b holds only deep/: shown at once
    expect(page.locator(".tile")).to_have_count(6)
    paths = page.locator(".tile").evaluate_all("els => els.map(e => e.dataset.path)")
    assert sorted(paths) == sorted(str(p) for p in (photos / "b/deep").glob("*.jpg"))
    page.locator(".crumb", has_text="photos").click()
    expect(page.locator(".tile")).to_have_count(13)
    page.close()


def test_dedup_view_against_the_real_endpoint(browser, folder_server):
    """The real /api/dedup behind the page: the exact copy and its original form one group, the
    representative marked keep, and a tile's "duplicates" shows that group."""
    from playwright.sync_api import expect

    url, photos = folder_server
    answer = httpx.get(f"{url}/api/dedup", timeout=120).json()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.click(".views button[data-view=dedup]")
    group = page.locator(".group")
    expect(group).to_have_count(len(answer["groups"]))
    copies = {str(photos / "a/coffee-copy.jpg"), str(photos / "b/deep/coffee.jpg")}
    ours = [g for g in answer["groups"] if {m["path"] for m in g["members"]} >= copies]
    assert len(ours) == 1, answer
    shown = page.locator(f".group[data-group='{ours[0]['group']}']")
    assert shown.locator(".member").evaluate_all("els => els.map(e => e.dataset.key)") == [m["key"] for m in ours[0]["members"]]
    expect(shown.locator(".member.representative")).to_have_attribute("data-key", ours[0]["representative"])
    expect(shown.locator(".member.representative .role")).to_have_text("keep")
    assert shown.locator(".member .role").all_text_contents() == [m["role"] for m in ours[0]["members"]]
    assert [m["role"] for m in ours[0]["members"] if m["key"] == ours[0]["representative"]] == ["keep"]
    page.click(".views button[data-view=collection]")
    page.locator(".tile[data-path$='/coffee-copy.jpg'] .dups-this").click()
    expect(page.locator(".group")).to_have_count(1)
    expect(page.locator(".group .member")).to_have_count(len(ours[0]["members"]))
    page.close()
