"""`simsearch query --rerank verified|aas|matches|both` on a small database of examples/images built with the
embedded DINOv2-S/14: the reranked list is a reordering of the first-stage candidates, with per-stage
scores."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES, QUERIES, one_line_error

pytestmark = pytest.mark.slow


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.strip().splitlines()]




@pytest.fixture(scope="module")
def first_stage(embedded_db):
    from simsearch import Index

    db, _ = embedded_db
    hits = Index(db).search(QUERIES / "cat_crop.jpg", k=12)
    return {h.path: h.score for h in hits}, [h.path for h in hits]


def _fused(scores: dict, method: str) -> float:
    """The documented fusion rule: first stage + weight * max(0, score - floor) per second-stage score."""
    from simsearch.rerank import FUSION

    return scores["first_stage"] + sum(w * max(0.0, scores[name] - floor) for name, (w, floor) in FUSION[method].items())


@pytest.mark.parametrize("method", ["verified", "aas", "matches", "both"])
def test_query_rerank_reorders_candidates_with_per_stage_scores(cli, embedded_db, first_stage, method):
    db, _ = embedded_db
    code, out, err = cli("query", QUERIES / "cat_crop.jpg", "--db", db, "--rerank", method,
                         "--candidates", "12", "-k", "12", "--json")
    assert code == 0, err
    rows = _json_lines(out)
    first_scores, first_order = first_stage
    assert [r["rank"] for r in rows] == list(range(1, 13))
    assert sorted(r["path"] for r in rows) == sorted(first_order)  # the same candidates...
    if method != "verified":  # verification promotes only what it verifies: here chelsea, first already
        assert [r["path"] for r in rows] != first_order  # ...in another order
    expected_keys = {"verified": {"first_stage", "verified", "inliers", "agreement"}, "aas": {"first_stage", "aas"},
                     "matches": {"first_stage", "matches"}, "both": {"first_stage", "aas", "matches"}}[method]
    for r in rows:
        assert set(r["scores"]) == expected_keys
        assert r["scores"]["first_stage"] == pytest.approx(first_scores[r["path"]], abs=1e-5)
        assert r["score"] == pytest.approx(_fused(r["scores"], method), abs=1e-5)
        assert ("matches" in r) == (method == "verified" and r["scores"]["inliers"] > 0)
        if "aas" in r["scores"]:
            assert -1 <= r["scores"]["aas"] <= 1.00001
        if "matches" in r["scores"]:
            assert 0 <= r["scores"]["matches"] <= 1
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    # The query is a mirrored crop of chelsea: it stays on top whichever signal ranks.
    assert rows[0]["path"].endswith("chelsea.jpg")


def test_query_rerank_without_a_name_verifies_and_returns_correspondences(cli, embedded_db):
    """`--rerank` alone is the verified reranker; each hit's inliers map the mirrored crop onto
    chelsea.jpg: query x grows where the hit's x shrinks (a mirror), y grows with y."""
    import numpy as np

    db, _ = embedded_db
    code, out, err = cli("query", QUERIES / "cat_crop.jpg", "--db", db, "-k", "3", "--json", "--rerank")
    assert code == 0, err
    top = _json_lines(out)[0]
    assert top["path"].endswith("chelsea.jpg") and set(top["scores"]) == {"first_stage", "verified", "inliers", "agreement"}
    pairs = np.array([m["query"] + m["hit"] for m in top["matches"]])
    assert len(pairs) >= 8 and top["scores"]["inliers"] >= len(pairs)
    assert np.corrcoef(pairs[:, 0], pairs[:, 2])[0, 1] < -0.9
    assert np.corrcoef(pairs[:, 1], pairs[:, 3])[0, 1] > 0.9


def test_query_rerank_top_k_is_the_head_of_the_reranked_candidates(cli, embedded_db):
    db, _ = embedded_db
    args = ("query", EXAMPLES / "gravel.jpg", "--db", db, "--rerank", "both", "--candidates", "12", "--json")
    code, out_all, err = cli(*args, "-k", "12")
    assert code == 0, err
    code, out_3, err = cli(*args, "-k", "3")
    assert code == 0, err
    assert [r["path"] for r in _json_lines(out_3)] == [r["path"] for r in _json_lines(out_all)[:3]]
    # An image reranked against itself: AAS 1 and every patch a mutual nearest neighbour.
    top = _json_lines(out_all)[0]
    assert top["path"].endswith("gravel.jpg")
    assert top["scores"]["aas"] == pytest.approx(1.0, abs=1e-4) and top["scores"]["matches"] == pytest.approx(1.0)


def test_query_rerank_table_shows_each_stage(cli, embedded_db):
    db, _ = embedded_db
    code, out, err = cli("query", EXAMPLES / "coffee.jpg", "--db", db, "--rerank", "both", "-k", "3")
    assert code == 0, err
    for header in ("rank", "score", "first stage", "aas", "matches", "path"):
        assert header in out, out
    code, out, err = cli("query", EXAMPLES / "coffee.jpg", "--db", db, "--rerank", "verified", "-k", "3")
    assert code == 0, err
    for header in ("first stage", "verified", "inliers"):
        assert header in out, out


def test_query_unknown_reranker_is_a_one_line_error(cli, embedded_db):
    db, _ = embedded_db
    one_line_error(*cli("query", EXAMPLES / "coffee.jpg", "--db", db, "--rerank", "cosine", "-k", "3"),
                   "cosine", "verified", "aas", "matches", "both")


@pytest.mark.parametrize("method", ["verified", "both"])
def test_rerank_in_chunks_is_the_rerank_of_all(embedded_db, monkeypatch, method):
    """Candidates reranked RERANK_CHUNK at a time (here 5, of 12): the same hits, order, scores and
    correspondences as all at once, and never more than a chunk's dense tensors scored in one call."""
    import numpy as np

    from simsearch import Index, index, rerank

    idx = Index(embedded_db[0])
    whole = idx.search(QUERIES / "cat_crop.jpg", k=12, rerank=method, candidates=12)
    sizes = []
    score = rerank.rerank_scores

    def counted(backbone, layer, query, dense, *args, **kw):
        sizes.append(len(dense))
        return score(backbone, layer, query, dense, *args, **kw)

    monkeypatch.setattr(rerank, "rerank_scores", counted)
    monkeypatch.setattr(index, "RERANK_CHUNK", 5)
    chunked = idx.search(QUERIES / "cat_crop.jpg", k=12, rerank=method, candidates=12)
    assert sizes == [5, 5, 2]
    assert [h.path for h in chunked] == [h.path for h in whole]
    for a, b in zip(chunked, whole):
        assert a.scores.keys() == b.scores.keys()
        assert np.allclose([a.score, *a.scores.values()], [b.score, *b.scores.values()], atol=1e-5)
        assert np.allclose(np.asarray(a.matches).reshape(-1, 4), np.asarray(b.matches).reshape(-1, 4), atol=1e-3)


def test_a_copy_is_compared_with_the_thumbnails_of_its_best_candidates(embedded_db, monkeypatch):
    """Verification of a copy (a crop of chelsea) adds the thumbnails' agreement under each inlier
    transform, for the AGREEMENT_TOP candidates that rank highest without it: the crop's original
    agrees, the other pictures do not, and no candidate below that cut is compared at all."""
    from simsearch import Index
    from simsearch.rerank import AGREEMENT_TOP, scores

    compared = []
    agreement = scores.photometric_agreement

    def counted(query, cands, transform, *args, **kw):
        compared.append(len(cands))
        return agreement(query, cands, transform, *args, **kw)

    monkeypatch.setattr(scores, "photometric_agreement", counted)
    hits = Index(embedded_db[0]).search(QUERIES / "cat_crop.jpg", k=12, rerank="verified", candidates=12)
    assert len(compared) == 1 and 1 <= compared[0] <= AGREEMENT_TOP < len(hits)
    # the compared ones are the best by first stage + 0.01 per inlier beyond 3 (README, How it works)
    before = sorted(hits, key=lambda h: -(h.scores["first_stage"] + 0.01 * max(0.0, h.scores["inliers"] - 3)))
    assert all(h.scores["agreement"] == 0.0 for h in before[AGREEMENT_TOP:])
    assert sum(h.scores["agreement"] != 0.0 for h in hits) <= compared[0]  # 0 also where no block counts
    found = {h.path.rsplit("/", 1)[-1]: h.scores["agreement"] for h in hits}
    assert found["chelsea.jpg"] > 0.8
    assert max(v for name, v in found.items() if name != "chelsea.jpg") < found["chelsea.jpg"] - 0.3
    assert hits[0].path.endswith("chelsea.jpg")
