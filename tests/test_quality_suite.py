"""Style descriptors, the two-stage ranking protocol and `simsearch bench suite` (issue 12).

- Pure functions with answers worked out by hand: covariance descriptor, concatenation, whitening,
  reranked rankings, the bootstrap interval.
- The fast protocol of evaluate_groups (AAS only on the pairs a statistic reads) equals an
  independent exact N^2 computation from FeatureSet.matrix when the candidates cover every image.
- `bench suite` on a small suite made from examples/images, on the tiny random 12-block DINOv2.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXAMPLES
from test_bench_suites import make_groups, one_line_error

from simsearch.bench.metrics import bootstrap_ci, leave_one_out, reranked, top_candidates
from simsearch.descriptors.pooling import (channel_projection, concat_normalized, covariance_vector, fit_whitening,
                                           style_pooled, style_vector, whiten)


# -- style descriptors -------------------------------------------------------------------------
def test_covariance_vector_known_matrix():
    # tokens (1,0), (-1,0), (0,2), (0,-2): mean 0, covariance [[0.5, 0], [0, 2]]
    x = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]])
    v = covariance_vector(x)
    # upper triangle (0.5, 0, 2) -> signed sqrt (0.7071, 0, 1.4142) -> unit norm
    assert torch.allclose(v, torch.tensor([[1.0, 0.0, 2.0]]) / 5**0.5, atol=1e-6)
    # centred: adding a constant to every token changes nothing; negative covariance keeps its sign
    assert torch.allclose(covariance_vector(x + 3.0), v, atol=1e-6)
    y = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])  # cov [[1, -1], [-1, 1]]
    assert torch.allclose(covariance_vector(y), torch.tensor([[1.0, -1.0, 1.0]]) / 3**0.5, atol=1e-6)


def test_style_pooled_kinds():
    x = torch.randn(3, 10, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(style_pooled(x, "meanstd"), style_vector(x))
    assert torch.equal(style_pooled(x, "cov"), covariance_vector(x))
    both = style_pooled(x, "meanstd+cov")
    assert both.shape == (3, 8 + 10) and torch.allclose(both.norm(dim=-1), torch.ones(3))
    # each unit-norm half weighs the same: the cosine of two concatenations is the mean of the halves'
    expect = 0.5 * ((style_vector(x)[0] @ style_vector(x)[1]) + (covariance_vector(x)[0] @ covariance_vector(x)[1]))
    assert torch.allclose(both[0] @ both[1], expect, atol=1e-6)
    for bad in ("gram", "meanstd3", "cov0", "cov+cov", "meanstd+"):
        with pytest.raises(ValueError, match="style pooling"):
            style_pooled(x, bad)
    # cov<k>: the covariance of the tokens projected on k fixed orthonormal directions
    proj = channel_projection(4, 2)
    assert torch.allclose(proj.T @ proj, torch.eye(2), atol=1e-6) and torch.equal(proj, channel_projection(4, 2))
    assert torch.allclose(style_pooled(x, "cov2"), covariance_vector(x @ proj), atol=1e-6)
    assert style_pooled(x, "meanstd+cov2").shape == (3, 8 + 3)
    # a full-rank projection is a rotation: the covariance changes, its eigenvalues do not
    rot = channel_projection(4, 4)
    c1 = torch.cov(x[0].T, correction=0)
    c2 = torch.cov((x[0] @ rot).T, correction=0)
    assert torch.allclose(torch.linalg.eigvalsh(c1), torch.linalg.eigvalsh(c2), atol=1e-5)
    with pytest.raises(ValueError, match="more directions"):
        style_pooled(x, "cov5")


def test_concat_normalized_is_the_mean_of_part_cosines():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cosine 0
    b = torch.tensor([[3.0, 4.0, 0.0], [3.0, 4.0, 0.0]])  # cosine 1, unnormalised on purpose
    v = concat_normalized([a, b])
    assert torch.allclose(v[0] @ v[1], torch.tensor(0.5))
    assert torch.allclose(v.norm(dim=-1), torch.ones(2))


def test_whitening_makes_the_fit_data_covariance_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) @ torch.tensor([[3.0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0.2, 0, 0],
                                                          [0, 0, 0, 5, 0], [0, 0, 0, 1, 1]]) + 7.0
    mean, proj = fit_whitening(x)
    z = (x - mean) @ proj
    cov = z.T @ z / len(z)
    assert proj.shape == (5, 5) and torch.allclose(cov, torch.eye(5), atol=1e-4)
    assert torch.allclose(z.mean(0), torch.zeros(5), atol=1e-4)
    # two directions kept: those of the largest variance, still white
    mean2, proj2 = fit_whitening(x, dim=2)
    z2 = (x - mean2) @ proj2
    assert proj2.shape == (5, 2) and torch.allclose(z2.T @ z2 / len(z2), torch.eye(2), atol=1e-4)
    # shrinkage s: direction i keeps the variance lambda_i / (lambda_i + s * mean(lambda)), so the weakest
    # directions are damped the most
    _, proj_s = fit_whitening(x, shrink=1.0)
    var = (((x - mean) @ proj_s) ** 2).mean(0)
    xc = (x - x.mean(0)).double()
    lam = torch.linalg.eigvalsh(xc.T @ xc / len(x)).flip(0)
    assert torch.allclose(var.double(), lam / (lam + lam.mean()), atol=1e-4)
    w = whiten(x[:3], mean, proj)
    assert torch.allclose(w.norm(dim=-1), torch.ones(3))
    # rank-deficient data: only the directions it spans
    flat = torch.cat([x[:, :2], torch.zeros(200, 3)], 1)
    assert fit_whitening(flat)[1].shape == (5, 2)


# -- ranking protocol --------------------------------------------------------------------------
def test_reranked_orders_candidates_by_second_then_the_rest_by_first():
    first = np.array([[1, .9, .8, .7, .6],
                      [.9, 1, .5, .4, .3],
                      [.8, .5, 1, .2, .1],
                      [.7, .4, .2, 1, .0],
                      [.6, .3, .1, .0, 1]])
    second = -first.copy()  # reverses every order
    r = reranked(first, second, 2)
    # row 0: candidates 1, 2 (by first) reranked by second -> 2 then 1; then 3, 4 in first's order
    order0 = [j for j in np.argsort(-r[0]) if j != 0]
    assert order0 == [2, 1, 3, 4]
    order4 = [j for j in np.argsort(-r[4]) if j != 4]
    assert order4 == [1, 0, 2, 3]  # candidates 0, 1 -> reversed; rest 2, 3 by first
    assert top_candidates(first, 2).tolist()[0] == [1, 2]
    # candidates covering every other image: the ranking is `second`'s exactly
    full = reranked(first, second, 4)
    off = ~np.eye(5, dtype=bool)
    assert np.array_equal(full[off], second[off])
    labels = np.array([0, 0, 1, 1, 1])
    assert leave_one_out(reranked(first, second, 10), labels) == leave_one_out(second, labels)
    # entries of `second` outside the candidates are never read
    holes = second.copy()
    holes[0, 3] = holes[3, 0] = np.nan
    assert np.array_equal(reranked(first, holes, 2)[0], r[0])


def test_bootstrap_ci():
    assert bootstrap_ci(np.full(10, 0.25)) == (0.25, 0.25)
    v = np.random.default_rng(0).random(200)
    lo, hi = bootstrap_ci(v, seed=1)
    assert lo < v.mean() < hi and bootstrap_ci(v, seed=1) == (lo, hi)
    # the interval narrows as 1/sqrt(n): four times the data, about half the width
    lo4, hi4 = bootstrap_ci(np.tile(v, 4), seed=1)
    assert 0.35 < (hi4 - lo4) / (hi - lo) < 0.65


def test_fast_protocol_equals_exact_when_candidates_cover_all(tiny12, tmp_path):
    from simsearch.bench.features import FeatureSet
    from simsearch.bench.metrics import sample_triplets, triplet_accuracy
    from simsearch.bench.suites import (COMBINED_AAS_WEIGHT, calibration_pairs, combine, evaluate_groups,
                                        read_groups)

    root = make_groups(tmp_path / "g", names=["chelsea", "astronaut", "coffee"], n_aug=4)
    cache = tmp_path / "cache.db"
    n = 12
    for mode, first in (("content", "cosine"), ("style", "style")):
        fast = evaluate_groups(root, mode=mode, triplets=200, candidates=n - 1, model=str(tiny12), cache=cache)
        # exact: every pair through FeatureSet.matrix, combined z-scored on the same calibration pairs
        paths, labels = read_groups(root)
        fs = FeatureSet(paths, cache=cache, model=str(tiny12))
        y = np.asarray(labels)
        sims = {m: fs.matrix(m) for m in ("cosine", "style", "aas")}
        sims["combined"] = combine(sims[first], sims["aas"], calibration_pairs(n), COMBINED_AAS_WEIGHT)
        trip = sample_triplets(y, 200, 0)
        for m, sim in sims.items():
            exact = {"triplet_accuracy": triplet_accuracy(sim, trip).to_dict(), **leave_one_out(sim, y)}
            assert fast.metrics[m] == exact, (mode, m)
        assert fast.config["candidates"] == n - 1 and "exact over all pairs" in fast.config["definitions"]["aas"]
        # fewer candidates: stated in the output, and the vector metrics do not move
        few = evaluate_groups(root, mode=mode, triplets=200, candidates=3, model=str(tiny12), cache=cache)
        assert f"first 3 candidates by {first}" in few.config["definitions"]["aas"]
        for m in ("cosine", "style"):
            assert few.metrics[m] == fast.metrics[m]
        for m in ("aas", "combined"):  # triplets are exact whatever the candidates
            assert few.metrics[m]["triplet_accuracy"] == fast.metrics[m]["triplet_accuracy"]
        fs.close()


# -- bench suite -------------------------------------------------------------------------------
def make_suite(root):
    """Two sets sharing their images through symlinks, as data.py's card-decks / card-ranks do:
    `style` groups by the augmentation kind, `content` by the photo."""
    photos = make_groups(root / "photos", names=["chelsea", "astronaut", "coffee"], n_aug=3)
    for d in photos.iterdir():
        for f in d.iterdir():
            for name, group in (("content", d.name), ("style", f.stem.rsplit("_", 1)[1])):
                (root / name / group).mkdir(parents=True, exist_ok=True)
                (root / name / group / f.name).symlink_to(os.path.relpath(f, root / name / group))
    manifest = {"sets": {"style": {"mode": "style", "group": "augmentation"}, "content": {"mode": "content"}}}
    (root / "suite.json").write_text(json.dumps(manifest))
    return root


def test_bench_suite_cli(cli, tiny12, tmp_path):
    root = make_suite(tmp_path / "suite")
    cache = tmp_path / "cache"
    code, out, err = cli("bench", "suite", root, "--model", tiny12, "--triplets", "100", "--cache", cache,
                         "--variant", "default", "--variant", "early:style_layer=1,content_layer=2", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert set(r["sets"]) == {"style", "content"} and r["sets"]["style"]["group"] == "augmentation"
    rows = {f"{v}: {m}" for v in ("default", "early") for m in ("cosine", "style", "aas", "combined")}
    assert set(r["rows"]) == rows and set(r["ranks"]) == rows
    for row, per_set in r["rows"].items():
        assert set(per_set) == {"style", "content"}
        for stats in per_set.values():
            assert stats["triplet_accuracy"]["n"] == 100 and stats["queries"] == 9
            lo, hi = stats["mAP_ci95"]
            assert lo <= stats["mAP"] <= hi
    # ranks: 8 rows per set, each set's ranks sum to 1 + ... + 8
    for s, mode in (("style", "style"), ("content", "content")):
        values = [r["rows"][row][s]["triplet_accuracy"]["value"] for row in rows]
        best = max(values)
        assert all(r["ranks"][row][mode] == 1.0 for row in rows
                   if r["rows"][row][s]["triplet_accuracy"]["value"] == best) or values.count(best) > 1
        assert sum(r["ranks"][row][mode] for row in rows) == pytest.approx(36)
    assert r["config"]["variants"]["early"]["descriptors"]["style_layer"] == 1
    assert r["config"]["variants"]["default"]["descriptors"]["style_layer"] != 1
    # each variant embedded the 9 distinct images once (the sets share them), into its own cache database
    assert len(list(cache.glob("*.db"))) == 2
    # the table: one row per (variant, metric), one column per set, the mean ranks and the definitions
    code, out, err = cli("bench", "suite", root, "--model", tiny12, "--triplets", "100", "--cache", cache,
                         "--variant", "early:style_layer=1,content_layer=2", "--metric", "style,aas")
    assert code == 0, err
    assert "early: style" in out and "early: combined" in out and "mean rank" in out and "first-stage" in out
    assert "early: cosine" not in out


def test_bench_suite_bad_input(cli, tmp_path, tiny12):
    one_line_error(*cli("bench", "suite", tmp_path)[::2], "suite.json")
    (tmp_path / "suite.json").write_text('{"sets": {"a": {"mode": "colour"}}}')
    one_line_error(*cli("bench", "suite", tmp_path)[::2], "mode")
    (tmp_path / "suite.json").write_text('{"sets": {"a": {"mode": "style"}}}')
    one_line_error(*cli("bench", "suite", tmp_path)[::2], "no folder")
    (tmp_path / "suite.json").write_text("[1, 2]")
    one_line_error(*cli("bench", "suite", tmp_path)[::2], "not a suite manifest")
    root = make_suite(tmp_path / "s")
    one_line_error(*cli("bench", "suite", root, "--variant", "x:style_layr=3", "--model", tiny12)[::2], "style_layr")
    one_line_error(*cli("bench", "suite", root, "--variant", ":style_layer=3", "--model", tiny12)[::2], "name")


# -- configuration ---------------------------------------------------------------------------------
def test_tables_written_before_style_pooling_still_match_their_config():
    from simsearch.embedder import DescriptorConfig

    # what a table stored before the field existed: no style_pooling, one style layer
    old = {"model": "dinov2-s14-imgfocus", "image_size": 224, "content_pooling": "cls", "content_layer": 11,
           "style_layer": 4, "dense_layer": 9, "dense_dtype": "float16", "timestep": None, "noise_seed": None,
           "ip_adapter": None}
    stored = DescriptorConfig.from_dict(old)
    assert stored.style_pooling == "meanstd" and stored.style_layer == 4
    # not the embedded model's default pooling: an old table keeps what it was built with
    assert DescriptorConfig.for_model(old["model"]).style_pooling == "meanstd+cov32"
    assert stored == DescriptorConfig(**old, style_pooling="meanstd") == DescriptorConfig.from_dict(json.loads(json.dumps(stored.to_dict())))
    # several layers survive the JSON round trip (a list comes back) and one listed layer is that layer
    multi = DescriptorConfig.for_model(style_layer=(3, 4, 5), style_pooling="meanstd+cov")
    assert DescriptorConfig.from_dict(json.loads(json.dumps(multi.to_dict()))) == multi
    assert DescriptorConfig.for_model(style_layer=[4]) == DescriptorConfig.for_model(style_layer=4)
    from simsearch.errors import SimsearchError

    with pytest.raises(SimsearchError, match="style pooling 'gram'"):
        DescriptorConfig.for_model(style_pooling="gram")
    with pytest.raises(SimsearchError, match="empty"):
        DescriptorConfig.for_model(style_layer=())


def test_multi_block_style_vector_is_stored_and_reopened(new_index, tiny_model, tmp_path):
    from simsearch import Index
    from simsearch.backbones import load_backbone

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        Image.open(EXAMPLES / f"{name}.jpg").convert("RGB").save(folder / f"{name}.png")
    db = tmp_path / "db"
    idx = new_index(db, style_layer=(1, 3), style_pooling="meanstd+cov")
    idx.add_folder(folder)
    again = Index(db)  # the stored configuration, tuple and all
    assert again.conf == idx.conf and again.conf.style_layer == (1, 3)
    Index(db, style_layer=(1, 3))  # asking for it explicitly matches
    # the stored vector: both blocks' statistics, each unit-norm, concatenated
    bb = load_backbone(str(tiny_model), "cpu")
    from simsearch.images import open_image

    pixels = torch.from_numpy(idx.embedder.preprocess(open_image(folder / "chelsea.png", max_side=idx.conf.image_size).image))[None]
    tok = bb.tokens(pixels, {"a": (1, "features"), "b": (3, "features")})

    def unit(v):
        return v / np.linalg.norm(v)

    def meanstd_cov(x):  # one block's (N, C) patch tokens, written out from the definitions in numpy
        x = x.astype(np.float64)
        meanstd = unit(np.concatenate([unit(x.mean(0)), unit(x.std(0))]))
        cov = np.cov(x.T, bias=True)[np.triu_indices(x.shape[1])]
        return unit(np.concatenate([meanstd, unit(np.sign(cov) * np.sqrt(np.abs(cov)))]))

    expect = unit(np.concatenate([meanstd_cov(tok[k][0, 1:].numpy()) for k in ("a", "b")]))  # CLS dropped
    from simsearch.paths import normalize
    from simsearch.store import path_key

    stored = again.store.rows([path_key(normalize(folder / "chelsea.png"))], ["style"])[0]["style"]
    assert len(stored) == 2 * (2 * 32 + 32 * 33 // 2)  # per block: mean/std (2C) + covariance triangle
    assert np.allclose(stored, expect, atol=1e-5)
    assert np.allclose(again.embed_image(folder / "chelsea.png").style[0], expect, atol=1e-5)


def test_default_database_holds_the_registry_style_vector(embedded_db):
    """An index on the embedded model with no descriptor options is built with the registry's defaults,
    and its stored style vector is their definition written out in numpy from the backbone's tokens:
    per listed block, mean/std (2C) and the covariance of the patches projected on 32 fixed orthonormal
    directions, each part unit-norm, the blocks concatenated."""
    from simsearch import Index
    from simsearch.backbones import DEFAULT_MODEL, descriptor_defaults
    from simsearch.descriptors.pooling import channel_projection
    from simsearch.images import open_image
    from simsearch.paths import normalize
    from simsearch.store import path_key

    db, photos = embedded_db
    index = Index(db)
    registry = descriptor_defaults(DEFAULT_MODEL)
    assert {name: getattr(index.conf, name) for name in registry} == registry
    assert index.conf.style_pooling == "meanstd+cov32" and len(index.conf.style_layer) == 4

    path = photos / "chelsea.jpg"
    pixels = torch.from_numpy(index.embedder.preprocess(open_image(path, max_side=index.conf.image_size).image))[None]
    blocks = index.conf.style_layer
    tok = index.embedder.backbone.tokens(pixels, {str(b): (b, "features") for b in blocks})
    proj = channel_projection(384, 32).numpy().astype(np.float64)  # the fixed directions are an input here

    def unit(v):
        return v / np.linalg.norm(v)

    def block_vector(x):  # one block's (N, C) patch tokens
        x = x.astype(np.float64)
        meanstd = unit(np.concatenate([unit(x.mean(0)), unit(x.std(0))]))
        cov = np.cov((x @ proj).T, bias=True)[np.triu_indices(32)]
        return unit(np.concatenate([meanstd, unit(np.sign(cov) * np.sqrt(np.abs(cov)))]))

    expect = unit(np.concatenate([block_vector(tok[str(b)][0, 1:].numpy()) for b in blocks]))  # CLS dropped
    stored = index.store.rows([path_key(normalize(path))], ["style"])[0]["style"]
    assert len(stored) == 4 * (2 * 384 + 32 * 33 // 2)
    assert np.allclose(stored, expect, atol=1e-5)


def test_average_rank_shares_ties():
    from simsearch.bench.metrics import average_rank

    assert average_rank([0.9, 0.5, 0.9, 0.1]).tolist() == [1.5, 3.0, 1.5, 4.0]
