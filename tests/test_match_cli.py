"""`simsearch match A B`: point transfer, best buddies, the side-by-side picture and one-line errors.

Runs `simsearch.cli.main` in this process (the `cli` fixture of conftest.py) with the embedded model,
on a pure-translation crop pair (simsearch.bench.fixtures) whose true correspondences are known; one
case runs the real console script.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, one_line_error, run_cli
from simsearch.bench import fixtures as fx
from simsearch.bench.pck import read_pairs


@pytest.fixture(scope="module")
def crop_pair(tmp_path_factory):
    """(image A, image B, source keypoints, target keypoints) of one translation pair (coffee)."""
    root = fx.build_translation(tmp_path_factory.mktemp("spair"), fx.example_offsets(EXAMPLES, ["coffee"]))
    pair = read_pairs(root)[0]
    return pair.src, pair.trg, pair.src_kps, pair.trg_kps


def _points_arg(points) -> str:
    return ";".join(f"{x:.1f},{y:.1f}" for x, y in points)




@pytest.mark.slow
def test_match_points_json_transfers_to_the_true_positions(cli, embedded_model, crop_pair):
    a, b, src, trg = crop_pair
    pts = src[[6, 12, 18, 8]]  # interior grid points of the overlap
    code, out, err = cli("match", a, b, "--points", _points_arg(pts), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"a", "b", "matches"} and data["a"] == str(a) and data["b"] == str(b)
    assert len(data["matches"]) == len(pts)
    for m, p in zip(data["matches"], pts):
        assert set(m) == {"a", "b", "confidence"}
        np.testing.assert_allclose(m["a"], np.round(p, 1), atol=0.051)
        assert -1 <= m["confidence"] <= 1
    pred = np.array([m["b"] for m in data["matches"]])
    w, h = Image.open(b).size
    assert (pred >= 0).all() and (pred[:, 0] < w).all() and (pred[:, 1] < h).all()
    err_px = np.linalg.norm(pred - trg[[6, 12, 18, 8]], axis=1)
    assert np.median(err_px) <= 0.1 * max(w, h), err_px  # PCK@0.1 for most points


@pytest.mark.slow
def test_match_best_buddies_out_png(cli, embedded_model, crop_pair, tmp_path):
    a, b, _, _ = crop_pair
    png = tmp_path / "match.png"
    code, out, err = cli("match", a, b, "-n", "6", "--out", png, "--json")
    assert code == 0, err
    matches = json.loads(out)["matches"]
    assert 1 <= len(matches) <= 6
    conf = [m["confidence"] for m in matches]
    assert all(0 < c <= 1.0001 for c in conf)  # mutual nearest neighbours of similar images
    assert f"wrote {png}" in err
    img = Image.open(png)
    assert img.format == "PNG"
    (wa, ha), (wb, hb) = Image.open(a).size, Image.open(b).size
    height = 384  # viz.draw_matches default
    assert img.size == (round(wa * height / ha) + 12 + round(wb * height / hb), height)
    # For a pure translation, best buddies should mostly agree with the true offset.
    offset = np.array([m["a"] for m in matches]) - np.array([m["b"] for m in matches])
    true = np.array(fx.EXAMPLE_OFFSETS["coffee"][0], float)  # (dx, dy) of the pair
    close = np.linalg.norm(offset - true, axis=1) <= 0.1 * max(wb, hb)
    assert close.mean() >= 0.5, offset


@pytest.mark.slow
def test_match_nn_method_table_output(cli, embedded_model, crop_pair):
    a, b, _, _ = crop_pair
    code, out, err = cli("match", a, b, "--method", "nn", "-n", "4", "--stride", "14", "--no-log-bin")
    assert code == 0, err
    assert "confidence" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("│", "|")) and line.split()[1:2] != ["#"]]
    assert len(rows) == 4, out


@pytest.mark.slow
def test_match_nn_json_sorted_by_confidence(cli, embedded_model, crop_pair):
    a, b, _, _ = crop_pair
    code, out, err = cli("match", a, b, "--method", "nn", "-n", "5", "--json")
    assert code == 0, err
    conf = [m["confidence"] for m in json.loads(out)["matches"]]
    assert len(conf) == 5 and conf == sorted(conf, reverse=True)


@pytest.mark.parametrize("points", ["1,2;3", "abc", "1,2,3", ";", "1;2"])
def test_match_bad_points_string(cli, crop_pair, points):
    a, b, _, _ = crop_pair
    one_line_error(*cli("match", a, b, "--points", points), "--points", "x,y")


def test_match_point_outside_image(cli, crop_pair):
    a, b, _, _ = crop_pair
    w, h = Image.open(a).size
    one_line_error(*cli("match", a, b, "--points", f"10,10;{w + 5},3"), str(a), "outside", f"{w}x{h}")
    one_line_error(*cli("match", a, b, "--points", "-1,4"), "outside")


def test_match_missing_file(cli, crop_pair, tmp_path):
    a, _, _, _ = crop_pair
    one_line_error(*cli("match", a, tmp_path / "nope.jpg"), "nope.jpg")


def test_match_not_an_image(cli, crop_pair, tmp_path):
    a, _, _, _ = crop_pair
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    one_line_error(*cli("match", junk, a), "junk.jpg")


def test_match_unknown_method(cli, crop_pair):
    a, b, _, _ = crop_pair
    one_line_error(*cli("match", a, b, "--method", "sift"), "sift", "nn", "best-buddies")


@pytest.mark.slow
def test_match_bad_stride_and_layer(cli, embedded_model, crop_pair):
    a, b, _, _ = crop_pair
    one_line_error(*cli("match", a, b, "--stride", "5"), "stride 5", "14")
    one_line_error(*cli("match", a, b, "--layer", "12"), "layer=12", "0..11")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["keys", "attn"])
def test_match_unknown_facet(cli, embedded_model, crop_pair, name):
    """--facet takes key, query, value or token (its help says so); anything else, including the
    attention map (not a per-patch descriptor), is a one-line error, not a traceback."""
    a, b, _, _ = crop_pair
    one_line_error(*cli("match", a, b, "--facet", name), name)


def test_match_console_script_missing_file(tmp_path):
    """The real `simsearch` entry point: one line on stderr, exit 1, no traceback."""
    r = run_cli("match", tmp_path / "missing.png", EXAMPLES / "coffee.jpg", "--json")
    one_line_error(r.returncode, r.stdout, r.stderr, "missing.png")
