"""`simsearch dedup` and simsearch.dedup on the embedded DINOv2-S/14, real LanceDB and FAISS.

One folder is indexed once for the module: examples/images photos, a byte copy, a lossless re-save, a
mirrored crop, and a chain (A ~ B ~ C where B is A and C side by side, A and C unrelated). Scores are
checked against the reranker's own verification (`Index.rerank`, method "verified"), the smaller image
as the query.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import faiss
from PIL import Image, ImageOps

from conftest import EXAMPLES, one_line_error
from simsearch import Index
from simsearch.ann import VectorIndex, gpu_available
from simsearch import dedup
from simsearch.dedup import (CACHE_DIR, CANDIDATE_NPROBE, CSV_COLUMNS, DEFAULT_CONF, MIN_STYLE, STYLE_K, PairCache, build_groups,
                             _cosines, candidate_pairs, candidates, find_duplicates, identity, pair_table, scope_of)
from simsearch.index import Hit
from simsearch.store import path_key

pytestmark = pytest.mark.slow
OTHERS = ("brick.jpg", "coins.jpg", "rocket.jpg")  # unrelated photos: must stay out of every group


def _files(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `folder`: (size, mtime_ns, blake2b): what 'nothing deleted or moved' compares."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.blake2b(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def collection(tmp_path_factory, embedded_model):
    """-> (db, folder, {name: normalized path}) with the folder indexed and deduplicated once."""
    root = tmp_path_factory.mktemp("dedup")
    folder = root / "photos"
    folder.mkdir()
    chelsea = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB")
    shutil.copy2(EXAMPLES / "chelsea.jpg", folder / "chelsea.jpg")
    shutil.copy2(EXAMPLES / "chelsea.jpg", folder / "chelsea_copy.jpg")  # exact duplicate
    later = (folder / "chelsea.jpg").stat().st_mtime_ns + 10**10
    os.utime(folder / "chelsea_copy.jpg", ns=(later, later))  # newer: of the two JPEGs the original is kept
    chelsea.save(folder / "chelsea.png")  # same pixels, lossless: kept over both JPEGs
    w, h = chelsea.size
    ImageOps.mirror(chelsea.crop((w // 8, h // 8, w - w // 8, h - h // 8))).save(folder / "chelsea_crop_mirror.jpg", quality=85)
    # more pixels than the original, the same content at the same scale: not the one to keep
    chelsea.rotate(12, expand=True, resample=Image.Resampling.BICUBIC).save(folder / "chelsea_rotated.jpg", quality=70)
    # the chain: A (large) ~ B = [A | C] (small) ~ C, while A and C show different things
    a, c = Image.open(EXAMPLES / "astronaut.jpg").convert("RGB"), Image.open(EXAMPLES / "coffee.jpg").convert("RGB")
    a.resize((800, 800)).save(folder / "chain_a.jpg", quality=92)
    side = Image.new("RGB", (400, 200))
    side.paste(a.resize((200, 200)), (0, 0))
    side.paste(c.resize((200, 200)), (200, 0))
    side.save(folder / "chain_b.jpg", quality=92)
    c.resize((300, 200)).save(folder / "chain_c.jpg", quality=92)
    for name in OTHERS:
        shutil.copy2(EXAMPLES / name, folder / name)
    db = root / "db"
    Index(db, model=embedded_model).add_folder(folder)
    paths = {p.name: str(p) for p in folder.iterdir()}
    return db, folder, paths


@pytest.fixture(scope="module")
def result(collection):
    db, folder, _ = collection
    return find_duplicates(Index(db))


def _verified(idx: Index, a: str, b: str) -> float:
    """The reranker's verified share with the image of fewer pixels as the query (ties: the smaller
    key): the pair score's independent computation."""
    pixels = {p: Image.open(p).size[0] * Image.open(p).size[1] for p in (a, b)}
    q, c = sorted((a, b), key=lambda p: (pixels[p], path_key(p)))
    _, query = idx.stored_query(path_key(q))
    (hit,) = idx.rerank(query, [Hit(rank=1, score=0.0, path="", id="", key=path_key(c))], "verified")
    return hit.scores["verified"]


def _group_of(result, path: str):
    found = [g for g in result.groups if any(m.path == path for m in g.members)]
    assert len(found) <= 1
    return found[0] if found else None


def test_exact_copy_and_edited_copies_group_around_the_keep_rule(collection, result):
    db, _, paths = collection
    g = _group_of(result, paths["chelsea.png"])
    roles = {m.path: m.role for m in g.members}
    # the content at one resolution everywhere (the rotated copy has more pixels, all of them the same
    # photo at the same scale on a larger canvas): the lossless PNG is kept; the byte copies of the JPEG
    # are duplicates of it; the mirrored crop and the rotated copy are too
    copies = ("chelsea.jpg", "chelsea_copy.jpg", "chelsea_crop_mirror.jpg", "chelsea_rotated.jpg")
    assert Image.open(paths["chelsea_rotated.jpg"]).size[0] > Image.open(paths["chelsea.png"]).size[0]
    assert roles == {paths["chelsea.png"]: "keep", **{paths[n]: "duplicate" for n in copies}}
    assert g.representative == path_key(paths["chelsea.png"])
    assert g.reclaimable_bytes == sum(os.path.getsize(paths[n]) for n in copies)
    idx = Index(db)
    crop = next(m for m in g.members if m.path == paths["chelsea_crop_mirror.jpg"])
    expected = _verified(idx, paths["chelsea.png"], paths["chelsea_crop_mirror.jpg"])
    assert crop.score == pytest.approx(expected, abs=1e-5) and crop.score >= DEFAULT_CONF["threshold"]
    assert crop.inliers >= 3
    for name in OTHERS:
        assert _group_of(result, paths[name]) is None


def test_a_chain_is_not_merged(collection):
    db, _, paths = collection
    idx = Index(db)
    ab = _verified(idx, paths["chain_a.jpg"], paths["chain_b.jpg"])
    bc = _verified(idx, paths["chain_b.jpg"], paths["chain_c.jpg"])
    ac = _verified(idx, paths["chain_a.jpg"], paths["chain_c.jpg"])
    assert min(ab, bc) > 2 * ac  # the chain is in the data: A ~ B and B ~ C verify far better than A ~ C
    # the thumbnails' agreement off: B ~ C (a resized half of B) is an edge, as the chain needs
    res = find_duplicates(idx, threshold=(min(ab, bc) + ac) / 2, min_agreement=0.0)
    assert res.new_pairs_verified == 0
    g = _group_of(res, paths["chain_a.jpg"])
    assert {m.path: m.role for m in g.members} == {paths["chain_a.jpg"]: "keep", paths["chain_b.jpg"]: "duplicate"}
    assert _group_of(res, paths["chain_c.jpg"]) is None  # single linkage would have put C with A


def test_the_image_most_others_copy_is_kept_before_a_larger_edited_file(collection):
    """Same resolution everywhere (scale 1): among equals the content with the most verified copies
    comes before the file rule (an edited copy is often the larger or lossless file yet verifies against
    fewer of the others); with one copy each, the file rule decides. Pairs given, the real files and store."""
    db, _, paths = collection
    idx = Index(db)
    scope = scope_of(idx, None)
    node = {n: int(scope.node_of(np.array([path_key(paths[n])]))[0]) for n in
            ("chelsea.png", "chelsea.jpg", "chelsea_crop_mirror.jpg", "chelsea_rotated.jpg")}
    png, jpg, crop, rot = node.values()

    def groups(edges):
        a, b = (np.array([min(x, y) for x, y in edges]), np.array([max(x, y) for x, y in edges]))
        n = len(edges)
        return build_groups(idx, scope, pair_table(a, b, np.full(n, 0.9), np.full(n, 0.5), np.full(n, 20),
                                                    np.full(n, 0.9), np.ones(n)), 0.1, 0.7)

    (g,) = groups([(png, jpg), (jpg, crop), (jpg, rot)])  # the JPEG content verified against all three
    roles = {m.path: m.role for m in g.members}
    assert roles[paths["chelsea.jpg"]] == "keep" and roles[paths["chelsea_copy.jpg"]] == "exact"
    assert {roles[paths[n]] for n in ("chelsea.png", "chelsea_crop_mirror.jpg", "chelsea_rotated.jpg")} == {"duplicate"}
    (g,) = groups([(png, jpg)])  # one copy each: lossless before lossy
    assert g.representative == path_key(paths["chelsea.png"])


def test_threshold_regroups_from_stored_scores_without_the_model(cli, collection, result, monkeypatch):
    db, _, paths = collection

    def no_model(self):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(Index, "embedder", property(no_model))
    code, out, err = cli("dedup", "--db", db, "--threshold", "0.0", "--json")
    assert code == 0, err
    low = json.loads(out)
    assert low["new_pairs_verified"] == 0 and low["pairs_verified"] == result.pairs_verified
    code, out, err = cli("dedup", "--db", db, "--threshold", "1.5", "--json")
    high = json.loads(out)
    # above any verified share only the exact copies remain grouped
    assert [[(m["path"], m["role"]) for m in g["members"]] for g in high["groups"]] == [
        [(paths["chelsea.jpg"], "keep"), (paths["chelsea_copy.jpg"], "exact")]]  # equal but for mtime: the older kept
    assert sum(len(g["members"]) for g in low["groups"]) >= sum(len(g.members) for g in result.groups)
    (cached,) = PairCache(db, "pairs", identity(Index(db), DEFAULT_CONF["k"], DEFAULT_CONF["min_cosine"])).parts()
    assert cached[2]["self"] == Index(db).store.version


def test_json_and_csv_list_every_member(cli, collection, result):
    db, _, _ = collection
    code, out, err = cli("dedup", "--db", db, "--json")
    data = json.loads(out)
    assert set(data) >= {"groups", "reclaimable_bytes", "pairs_verified", "table_version"}
    assert data["reclaimable_bytes"] == result.reclaimable_bytes
    for g in data["groups"]:
        assert isinstance(g["representative"], str) and g["representative"] == g["members"][0]["key"]
        assert set(g["members"][0]) >= {"key", "path", "role", "score", "inliers", "bytes"}
    code, out, err = cli("dedup", "--db", db, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(int(r["group"]), r["member"], r["role"], int(r["bytes_reclaimable"])) for r in rows] == [
        (g["group"], m["path"], m["role"], m["bytes"]) for g in data["groups"] for m in g["members"]]


def test_folder_run_indexes_reports_failures_and_touches_no_file(cli, tmp_path, collection):
    db, folder, paths = collection
    work = tmp_path / "set"
    shutil.copytree(folder, work)
    (work / "broken.jpg").write_bytes(b"")
    sub = tmp_path / "db"
    shutil.copytree(db, sub)
    before = _files(work)
    code, out, err = cli("dedup", work, "--db", sub, "--html", tmp_path / "g.html")
    assert code == 0, err
    assert f"failed: {work / 'broken.jpg'}: empty file" in err
    assert "nothing was deleted or moved" in out
    page = (tmp_path / "g.html").read_text()
    assert "data:image/jpeg;base64," in page and str(work / "chelsea_crop_mirror.jpg") in page
    facts = re.findall(r"score ([0-9.]+) · (\d+) inliers · agreement ([0-9.]+) · ", page)
    assert facts and all(0 <= float(a) <= 1 for _, _, a in facts), facts
    assert _files(work) == before
    assert "never deletes or moves a file" in " ".join(cli("dedup", "--help")[1].split()).lower()


def test_against_finds_the_leaked_copy(cli, tmp_path, collection, embedded_model):
    db, _, paths = collection
    ref = tmp_path / "train"
    ref.mkdir()
    shutil.copy2(collection[2]["chelsea_crop_mirror.jpg"], ref / "cat_flipped.jpg")
    shutil.copy2(EXAMPLES / "coins.jpg", ref / "coins.jpg")  # byte copy of one in this set
    shutil.copy2(EXAMPLES / "camera.jpg", ref / "camera.jpg")  # in no other set
    test_set = tmp_path / "test"
    test_set.mkdir()
    for name in ("chelsea.jpg", "coins.jpg", "grass.jpg"):
        shutil.copy2(EXAMPLES / name, test_set / name)
    sub = tmp_path / "db"
    shutil.copytree(db, sub)
    code, out, err = cli("dedup", test_set, "--db", sub, "--against", ref, "--json")
    assert code == 0, err
    data = json.loads(out)
    found = {(m["set"], os.path.basename(m["path"]), m["role"]) for g in data["groups"] for m in g["members"]}
    assert found == {("ref", "cat_flipped.jpg", "keep"), ("self", "chelsea.jpg", "duplicate"),
                     ("ref", "coins.jpg", "keep"), ("self", "coins.jpg", "exact")}
    # the same reference as a database of the same model gives the same answer
    ref_db = tmp_path / "ref.db"
    Index(ref_db, model=embedded_model).add_folder(ref)
    code, out2, err = cli("dedup", test_set, "--db", sub, "--against", ref_db, "--json")
    assert code == 0, err
    again = {(m["set"], os.path.basename(m["path"]), m["role"]) for g in json.loads(out2)["groups"] for m in g["members"]}
    assert again == found


def test_bad_input_is_a_one_line_error(cli, tmp_path, collection, new_index, photos):
    db, _, _ = collection
    one_line_error(*cli("dedup", "--db", tmp_path / "missing"), "no simsearch database")
    one_line_error(*cli("dedup", tmp_path / "nowhere", "--db", db), "nowhere", "no such file")
    (tmp_path / "empty").mkdir()
    sub = tmp_path / "db"
    shutil.copytree(db, sub)
    one_line_error(*cli("dedup", tmp_path / "empty", "--db", sub), "empty", "no indexed images")
    other = tmp_path / "tiny.db"
    new_index(other).add_folder(photos)
    one_line_error(*cli("dedup", "--db", sub, "--against", other), "was built with")
    one_line_error(*cli("dedup", "--db", sub, "--against", tmp_path / "nope"), "nope", "no such file")


def test_server_pages_the_groups(collection, result):
    from fastapi.testclient import TestClient

    from simsearch.server import create_app

    db, _, _ = collection
    client = TestClient(create_app(db), raise_server_exceptions=False)
    body = client.get("/api/dedup").json()
    assert body["groups"] == [g.to_dict() for g in result.groups]
    assert body["reclaimable_bytes"] == result.reclaimable_bytes and body["table_version"] == result.table_version
    page = client.get("/api/dedup", params={"limit": 1, "offset": 1}).json()
    assert page["groups"] == body["groups"][1:2]
    assert client.get("/api/dedup", params={"limit": 0}).status_code == 422


def test_a_new_image_is_verified_only_against_its_own_candidates(tmp_path, collection):
    db, _, paths = collection
    sub = tmp_path / "db"
    shutil.copytree(db, sub)
    ident = identity(Index(sub), DEFAULT_CONF["k"], DEFAULT_CONF["min_cosine"])
    before = PairCache(sub, "pairs", ident).load()[0].to_pylist()
    assert find_duplicates(Index(sub)).new_pairs_verified == 0  # the copy's stored scores are current
    extra = tmp_path / "more"
    extra.mkdir()
    cat = Image.open(paths["chelsea.png"])
    cat.crop((0, 0, cat.width * 4 // 5, cat.height * 4 // 5)).save(extra / "chelsea_cropped.png")
    idx = Index(sub)
    idx.add_folder(extra)
    res = find_duplicates(idx)
    new_key = path_key(str(extra / "chelsea_cropped.png"))
    after = PairCache(sub, "pairs", ident).load()[0].to_pylist()
    seen = lambda p: (p["a"], p["b"], p["score"], p["inliers"])  # noqa: E731  (NaN style: compare without it)
    added = [p for p in after if seen(p) not in {seen(q) for q in before}]
    assert 0 < res.new_pairs_verified == len(added) <= DEFAULT_CONF["k"] + STYLE_K
    assert all(new_key in (p["a"], p["b"]) for p in added)
    assert [seen(p) for p in after if seen(p) in {seen(q) for q in before}] == [seen(p) for p in before]  # none verified again
    group = _group_of(res, str(extra / "chelsea_cropped.png"))
    assert group is not None and group is _group_of(res, paths["chelsea.png"])


def test_a_stopped_run_resumes_at_the_part_it_was_in(tmp_path, collection, monkeypatch):
    """One content a part; stopped (as Ctrl-C stops it) in the verification of the second part that
    has pairs to verify, the next run keeps the parts saved before it, verifies only what an unstopped
    run verified after them, and ends with the same pairs and groups in one consolidated part. (Which
    parts have pairs follows the keys, hashes of the temporary paths: read off the unstopped run.)"""
    db, _, _ = collection
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    for copy in (whole, stopped):
        shutil.copytree(db, copy)
        shutil.rmtree(copy / CACHE_DIR, ignore_errors=True)  # none when this test runs first
    monkeypatch.setattr(dedup, "PART_NODES", 1)
    monkeypatch.setattr(dedup, "MAX_PARTS", 10**6)
    verify, sent, calls = dedup.verify_smaller_first, [], []
    monkeypatch.setattr(dedup, "verify_smaller_first", lambda index, pairs, *a, **kw: calls.append(pairs.num_rows) or verify(index, pairs, *a, **kw))
    full = find_duplicates(Index(whole))
    stop_at = [i for i, n in enumerate(calls) if n][1]  # the same tables, so the same parts in the same order

    def stop_in_the_second_with_pairs(index, pairs, *args, **kwargs):
        if len(sent) == stop_at:
            raise KeyboardInterrupt
        sent.append(pairs.num_rows)
        return verify(index, pairs, *args, **kwargs)

    monkeypatch.setattr(dedup, "verify_smaller_first", stop_in_the_second_with_pairs)
    with pytest.raises(KeyboardInterrupt):
        find_duplicates(Index(stopped))
    ident = identity(Index(stopped), DEFAULT_CONF["k"], DEFAULT_CONF["min_cosine"])
    assert len(list((stopped / CACHE_DIR / "pairs").glob("part-*.parquet"))) == stop_at
    saved, queried = PairCache(stopped, "pairs", ident).load()
    assert len(queried) == stop_at and saved.num_rows == sum(sent) == sum(calls[:stop_at])  # no row of the tiny table is gone
    monkeypatch.setattr(dedup, "verify_smaller_first", verify)
    resumed = find_duplicates(Index(stopped))
    assert sum(sent) > 0 and resumed.new_pairs_verified == full.new_pairs_verified - sum(sent)
    assert len(list((stopped / CACHE_DIR / "pairs").glob("part-*.parquet"))) == 1
    pairs = lambda root: sorted(zip(*(PairCache(root, "pairs", ident).load()[0].column(c).to_pylist() for c in "ab")))  # noqa: E731
    assert pairs(stopped) == pairs(whole)
    members = lambda res: [[(m.path, m.role) for m in g.members] for g in res.groups]  # noqa: E731
    assert members(resumed) == members(full)
    assert find_duplicates(Index(stopped)).new_pairs_verified == 0


def test_a_run_resumed_across_a_change_keeps_what_it_verified_after_it(tmp_path, collection, monkeypatch):
    """Stopped at v1; a new image (v2); stopped again before its last part; then finished: the pairs the
    second run verified (some with the new image) all stand, nothing is verified twice, and each part is
    brought up to date from its own version."""
    db, _, paths = collection
    root = tmp_path / "db"
    shutil.copytree(db, root)
    shutil.rmtree(root / CACHE_DIR, ignore_errors=True)  # none when this test runs first
    monkeypatch.setattr(dedup, "PART_NODES", 1)
    monkeypatch.setattr(dedup, "MAX_PARTS", 10**6)
    verify, sent, stop_at = dedup.verify_smaller_first, [], [3]

    def stopping(index, pairs, *args, **kwargs):
        if len(sent) == stop_at[0]:
            raise KeyboardInterrupt
        sent.append({tuple(sorted(p)) for p in zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist())})
        return verify(index, pairs, *args, **kwargs)

    monkeypatch.setattr(dedup, "verify_smaller_first", stopping)
    with pytest.raises(KeyboardInterrupt):
        find_duplicates(Index(root))  # three parts at v1
    extra = tmp_path / "more"
    extra.mkdir()
    cat = Image.open(paths["chelsea.png"])
    cat.crop((0, 0, cat.width * 4 // 5, cat.height * 4 // 5)).save(extra / "chelsea_cropped.png")
    Index(root).add_folder(extra)  # v2
    new_key = path_key(str(extra / "chelsea_cropped.png"))
    stop_at[0] = 3 + len(scope_of(Index(root), None).nodes()) - 3 - 1  # all but the last of the contents left
    with pytest.raises(KeyboardInterrupt):
        find_duplicates(Index(root))
    second = set().union(*sent[3:])
    assert any(new_key in p for p in second)
    stop_at[0] = 10**6
    last = find_duplicates(Index(root))
    ident = identity(Index(root), DEFAULT_CONF["k"], DEFAULT_CONF["min_cosine"])
    stored = PairCache(root, "pairs", ident).load()[0]
    stored = set(zip(*(stored.column(c).to_pylist() for c in "ab")))
    assert second <= {tuple(sorted(p)) for p in stored}
    assert last.new_pairs_verified == len(sent[-1]) and not (sent[-1] & second)
    assert _group_of(last, str(extra / "chelsea_cropped.png")) is _group_of(last, paths["chelsea.png"]) is not None


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.skipif(gpu_available(), reason="FAISS counts its scans on the CPU index only")
def test_candidate_search_scans_a_fixed_number_of_lists_and_finds_every_near_copy():
    """On an IVF index whose default probes twice CANDIDATE_NPROBE lists: each query scans exactly its
    CANDIDATE_NPROBE nearest lists (their sizes summed from the quantiser's own assignment), and the pairs
    above the floor are those an exact search over all pairs finds, with their cosines."""
    rng = np.random.default_rng(0)
    n, d, floor = 40_000, 64, 0.8  # random 64-d unit vectors meet at cosine >= 0.8 with probability ~1e-14
    x = _unit(rng.standard_normal((n, d)))
    copies = np.arange(0, n, 97)
    x[copies + 1] = _unit(x[copies] + 0.03 * rng.standard_normal((len(copies), d)))
    keys = np.arange(n, dtype=np.int64) * 3 + 11  # keys are not positions
    vi = VectorIndex.build(keys, x, ivf_threshold=1_000, nlist=800)
    assert vi.kind == "ivf" and vi.probes() == 2 * CANDIDATE_NPROBE
    ivf = faiss.extract_index_ivf(vi.index)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    _, nearest = ivf.quantizer.search(x, CANDIDATE_NPROBE)
    faiss.cvar.indexIVF_stats.reset()
    found = candidate_pairs(vi, keys, iter([(keys, x)]), k=5, min_cosine=floor)
    assert faiss.cvar.indexIVF_stats.nq == n
    # the quantiser's batch search may order near-tied 16th centroids otherwise: a few vectors in 32M
    assert faiss.cvar.indexIVF_stats.ndis == pytest.approx(sizes[nearest].sum(), rel=1e-5)

    exact = set()
    for s in range(0, n, 2048):
        sims = x[s:s + 2048] @ x.T
        i, j = np.nonzero(sims >= floor)
        exact |= {(int(keys[s + a]), int(keys[b])) for a, b in zip(i, j) if s + a != b}
    assert len(exact) == 2 * len(copies)  # each planted pair, both ways, and nothing else
    a, b, cos = (found.column(c).to_numpy() for c in ("a", "b", "cosine"))
    assert set(zip(a.tolist(), b.tolist())) == exact
    pos = {int(key): i for i, key in enumerate(keys)}
    want = np.einsum("ij,ij->i", x[[pos[v] for v in a]], x[[pos[v] for v in b]])
    np.testing.assert_allclose(cos, want, atol=1e-5)


def test_candidates_are_the_content_and_the_style_neighbours(collection):
    """`candidates` on the real store: every pair at content cosine >= the floor or at style cosine >=
    MIN_STYLE (k reaches every row, so the floors decide), each with its content cosine, and its style
    cosine where style found it, all from the stored vectors."""
    db, _, _ = collection
    idx = Index(db)
    keys, content = idx.store.vectors("content")
    style_keys, style = idx.store.vectors("style")
    style = style[np.argsort(style_keys)[np.searchsorted(np.sort(style_keys), keys)]]
    assert len(keys) - 1 <= STYLE_K  # style's k reaches every row too
    c, s = (_unit(x.astype(np.float64)) for x in (content, style))
    cos, sty = c @ c.T, s @ s.T
    floor = 0.9  # above most content pairs here, so that style adds pairs of its own
    got = candidates(idx, keys, len(keys), floor)
    pairs = list(zip(got.column("a").to_pylist(), got.column("b").to_pylist()))
    pos = {int(key): i for i, key in enumerate(keys)}
    want = {(int(keys[i]), int(keys[j])) for i in range(len(keys)) for j in range(len(keys))
            if i != j and (cos[i, j] >= floor or sty[i, j] >= MIN_STYLE)}
    assert len(pairs) == len(set(pairs)) and set(pairs) == want
    by_style_only = [p for p in pairs if cos[pos[p[0]], pos[p[1]]] < floor]
    assert by_style_only  # the style neighbours add pairs content would not give
    np.testing.assert_allclose(got.column("cosine").to_numpy(), [cos[pos[a], pos[b]] for a, b in pairs], atol=1e-4)
    expect_style = np.array([sty[pos[a], pos[b]] if sty[pos[a], pos[b]] >= MIN_STYLE else np.nan for a, b in pairs])
    np.testing.assert_allclose(got.column("style").to_numpy(), expect_style, atol=1e-4)


def test_pair_cosines_are_read_by_key_and_nan_for_a_row_gone(collection):
    db, _, _ = collection
    idx = Index(db)
    keys, content = idx.store.vectors("content")
    c = _unit(content.astype(np.float64))
    gone = int(keys.max()) + 1
    a = np.array([keys[3], keys[0], keys[5], keys[1]])
    b = np.array([keys[0], keys[3], gone, keys[1]])
    got = _cosines(idx, idx, a, b, "content", chunk=2)  # chunks of two pairs: the gone row in the second
    np.testing.assert_allclose(got[[0, 1, 3]], [c[3] @ c[0], c[0] @ c[3], 1.0], atol=1e-5)
    assert np.isnan(got[2])
