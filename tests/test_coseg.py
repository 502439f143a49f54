"""Co-segmentation (Amir et al.): the pure steps on small arrays with known answers, the whole method on
synthetic descriptors whose answer is known, the CLI and `query --coseg` on a tiny model, and the real
thing: tuxpaint stamps pasted on photos, scored against their alpha masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import EXAMPLES, one_line_error, require
from PIL import Image

from simsearch import coseg as C


# -- pure functions ------------------------------------------------------------------------------
def test_elbow_rule_stops_at_the_first_k_that_improves_less_than_the_coefficient():
    assert not C.elbow_reached([1.0], 0.975)
    assert not C.elbow_reached([1.0, 0.5], 0.975)
    assert not C.elbow_reached([1.0, 0.5, 0.4875], 0.975)  # exactly 2.5% better: go on
    assert C.elbow_reached([1.0, 0.5, 0.49], 0.975)
    assert C.elbow_reached([1.0, 0.5, 0.6], 0.975)


def blobs(centres: np.ndarray, sizes: list[int], noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[truth] + noise * rng.standard_normal((len(truth), centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def test_elbow_kmeans_keeps_the_k_where_improvement_stalls():
    # 3 tight blobs in 32 dimensions: k = 3 explains them; splitting a blob at k = 4 gains ~1% < 2.5%,
    # so their loop stops at 4 and keeps it (one blob split in two, no cluster across blobs)
    x, truth = blobs(np.eye(32)[:3], [60, 60, 60], 0.05, seed=0)
    centroids, labels = C.elbow_kmeans([x[:90], x[90:]], elbow=0.975, max_k=14, interval=1)
    assert len(centroids) == 4
    labels = np.concatenate(labels)
    assert len(labels) == 180
    for c in range(4):
        assert len(set(truth[labels == c])) == 1  # every cluster inside one blob
    assert set(truth[labels == labels[0]]) == {0}


def test_training_sample_takes_every_ith_row_but_enough_rows():
    rows = [np.arange(1000)[:, None], np.arange(1000, 1500)[:, None]]
    assert len(C.training_sample(rows, 100, 10)) == 15  # 10 + 5: their sample_interval
    sample = C.training_sample(rows, 100, 500)  # 1500 // 500 = every 3rd row
    assert sample[:3, 0].tolist() == [0, 3, 6] and len(sample) == 334 + 167


def test_salient_clusters_majority_vote():
    # 4 images, clusters 0..2; a cluster is salient in an image when its mean saliency > 0.065;
    # needs ceil(0.75 * 4) = 3 votes
    labels = [np.array([0, 0, 1, 2]), np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), np.array([0, 0, 1, 1])]
    saliency = [np.array([0.9, 0.5, 0.9, 0.2]), np.array([0.9, 0.9, 0.1, 0.05]),  # image 1: cluster 2 mean 0.075
                np.array([0.7, 0.0, 0.1, 0.06]), np.array([0.8, 0.9, 0.0, 0.02])]
    # cluster 0: 4 votes; cluster 1: images 0, 1 (0.9, 0.9), image 2 0.05, image 3 0.01 -> 2 votes;
    # cluster 2: images 0 (0.2), 1 (0.075), image 2 (0.06 <= 0.065), absent in image 3 -> 2 votes
    assert C.salient_clusters(labels, saliency, 3).tolist() == [0]
    assert C.salient_clusters(labels, saliency, 3, votes=0.5).tolist() == [0, 1, 2]
    assert C.salient_clusters(labels, saliency, 3, threshold=0.05, votes=0.75).tolist() == [0, 2]
    assert C.salient_clusters(labels, saliency, 4).tolist() == [0]  # an absent cluster gets no vote


def test_outlier_filter_drops_the_image_far_from_the_mean_cls():
    cls = np.array([[1, 0.1, 0], [1, 0, 0.1], [1, -0.1, 0], [0.9, 0, 0], [0, 1, 0]], dtype=np.float32)
    assert C.inliers(cls, 0.7).tolist() == [True, True, True, True, False]
    assert C.inliers(cls, -1.0).all()


def test_class_distances_take_the_nearest_centroid_of_each_class():
    desc = np.array([[1, 0], [0, 1]], dtype=np.float32)
    centroids = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    d = C.class_distances(desc, centroids, [np.array([0]), np.array([1, 2]), np.array([], dtype=int)])
    np.testing.assert_allclose(d, [[0, 0.8, C.FAR], [2, 0, C.FAR]], atol=1e-6)


def test_nearest_class_upsamples_each_cell_to_its_pixels():
    cls0 = np.array([[0.0, 1.0], [1.0, 0.0]])
    label = C.nearest_class(np.stack([cls0, 1 - cls0], -1), (4, 4))
    np.testing.assert_array_equal(label, np.kron([[0, 1], [1, 0]], np.ones((2, 2), int)))
    assert C.nearest_class(np.stack([cls0, 1 - cls0], -1), (3, 5)).shape == (3, 5)
    np.testing.assert_array_equal(C.saliency_mask(np.array([[0.0, 1.0]]), (1, 4), 0.5), [[False, False, True, True]])


def test_jaccard():
    a = np.array([[1, 1, 0, 0]], bool)
    assert C.jaccard(a, np.array([[0, 1, 1, 0]], bool)) == pytest.approx(1 / 3)
    assert C.jaccard(a, a) == 1.0 and C.jaccard(~a & a, ~a & a) == 1.0


def test_unique_stems():
    assert C.unique_stems(["a/x.jpg", "b/x.png", "c/y.jpg", "d/x.jpg"]) == ["x", "x-2", "y", "x-3"]


# -- the method on synthetic descriptors with a known answer -------------------------------------
def synthetic_set(n: int = 6, side: int = 6, seed: int = 0):
    """n images on a side x side grid: a common salient object (left half one descriptor, right half
    another) in a 2 x 4 box at a per-image place; each background its own descriptor; image 0 also
    holds a salient object of its own; image n-1 is an outlier (another CLS)."""
    rng = np.random.default_rng(seed)
    dim = 64
    axes = np.linalg.qr(rng.standard_normal((dim, dim)))[0]  # orthonormal directions
    left, right, distractor = axes[0], axes[1], axes[2]
    feats, truth = [], []
    for i in range(n):
        desc = np.tile(axes[3 + i], (side, side, 1))
        sal = np.zeros((side, side))
        y, x = rng.integers(0, side - 1), rng.integers(0, side - 3)
        desc[y:y + 2, x:x + 2], desc[y:y + 2, x + 2:x + 4] = left, right
        sal[y:y + 2, x:x + 4] = 0.9
        mask = sal > 0
        if i == 0:
            desc[(y + 3) % side, :2] = distractor
            sal[(y + 3) % side, :2] = 1.0
        desc = desc + 0.01 * rng.standard_normal(desc.shape)
        desc = (desc / np.linalg.norm(desc, axis=-1, keepdims=True)).reshape(-1, dim).astype(np.float32)
        cls = axes[20] if i < n - 1 else axes[21]
        feats.append(C.ImageFeatures(desc, sal.reshape(-1), (side, side), cls))
        truth.append(mask)
    return feats, truth


def test_cosegmentation_finds_the_common_object_and_its_parts():
    feats, truth = synthetic_set()
    sizes = [t.shape for t in truth]
    r = C.cosegment_features(feats, sizes, C.CosegConfig(parts=2))
    assert r.inliers.all() and r.n_parts == 2
    # the distractor (salient in one image) and every background stay out
    for mask, t in zip(r.masks, truth):
        np.testing.assert_array_equal(mask, t)
    # parts: the left halves share one label, the right halves the other, background -1
    lefts = {int(p[t][0]) for p, t in zip(r.parts, truth)}
    rights = {int(p[t][-1]) for p, t in zip(r.parts, truth)}
    assert len(lefts) == len(rights) == 1 and lefts != rights
    assert all((p[~t] == -1).all() for p, t in zip(r.parts, truth))


def test_outlier_filter_empties_the_outliers_mask():
    feats, truth = synthetic_set()
    r = C.cosegment_features(feats, [t.shape for t in truth], C.CosegConfig(outlier_threshold=0.7))
    assert r.inliers.tolist() == [True] * 5 + [False]
    assert not r.masks[-1].any()
    for mask, t in zip(r.masks[:-1], truth):
        np.testing.assert_array_equal(mask, t)


def test_masks_have_each_images_size():
    feats, truth = synthetic_set(n=3)
    r = C.cosegment_features(feats, [(30, 50), (12, 12), (7, 61)], C.CosegConfig(parts=2))
    assert [m.shape for m in r.masks] == [p.shape for p in r.parts] == [(30, 50), (12, 12), (7, 61)]
    # 6 x 6 cells onto 30 x 50 pixels: the object's 2 x 4 cells become a 10 x ~33 pixel box
    ys, xs = np.nonzero(r.masks[0])
    assert 9 <= ys.max() - ys.min() + 1 <= 11 and 32 <= xs.max() - xs.min() + 1 <= 35


def test_config_errors():
    for bad in (dict(facet="token"), dict(votes=0), dict(parts=0), dict(parts=256), dict(max_clusters=0)):
        with pytest.raises(C.SimsearchError):
            C.CosegConfig(**bad)


# -- CLI and Python API on the tiny random model (plumbing: shapes, files, errors) ---------------
def picture_set(folder, names=("chelsea", "coffee", "horse", "astronaut")):
    folder.mkdir()
    for name in names:
        Image.open(EXAMPLES / f"{name}.jpg").save(folder / f"{name} <b>[i].png")
    return folder


def test_coseg_cli_writes_masks_overlays_parts_and_a_page(cli, tmp_path, tiny_model):
    folder = picture_set(tmp_path / "set")
    (folder / "broken [red].png").write_bytes(b"not an image [/]")
    out, page = tmp_path / "masks", tmp_path / "page.html"
    code, stdout, err = cli("coseg", folder, "--out", out, "--parts", "2", "--html", page, "--model", tiny_model,
                            "--image-size", 56, "--json")
    assert code == 0, err
    assert f"failed: {folder / 'broken [red].png'}: not an image Pillow can read" in err
    rows = [json.loads(line) for line in stdout.strip().splitlines()]
    assert len(rows) == 4 and all(r["inlier"] for r in rows)
    for row in rows:
        size = Image.open(row["path"]).size
        mask, parts = Image.open(row["mask"]), Image.open(row["parts"])
        assert mask.size == parts.size == Image.open(row["overlay"]).size == size
        assert set(np.unique(mask)) <= {0, 255} and set(np.unique(parts)) <= {0, 1, 2}
        assert (np.asarray(mask) > 0).mean() == pytest.approx(row["foreground"], abs=1e-4)
        assert ((np.asarray(parts) > 0) == (np.asarray(mask) > 0)).mean() > 0.5
    text = page.read_text()
    assert text.count("data:image/jpeg;base64,") == 4 * 3  # image, co-segmentation, parts
    assert "coffee &lt;b&gt;[i].png" in text and "coffee <b>" not in text
    assert "broken [red].png: not an image Pillow can read" in text

    code, stdout, err = cli("coseg", folder / "horse <b>[i].png", folder / "coffee <b>[i].png", "--out", out,
                            "--model", tiny_model, "--image-size", 56, "--parts", 3)
    assert code == 0, err
    assert "co-segmentation: k =" in stdout and str(folder / "horse <b>[i].png") in stdout
    assert (out / "coffee <b>[i]_parts_overlay.jpg").is_file()

    # a threshold no two different images pass: every image is an outlier, every mask empty
    code, stdout, err = cli("coseg", folder, "--out", out, "--model", tiny_model, "--image-size", 56,
                            "--outlier-threshold", 0.99999, "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.strip().splitlines()]
    assert [r["inlier"] for r in rows] == [False] * 4 and all(r["foreground"] == 0 for r in rows)
    assert err.count("outlier (CLS far from the set's mean), left out: ") == 4


def test_coseg_cli_errors(cli, tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(*cli("coseg", tmp_path / "gone [b]", "--out", tmp_path / "o"), "gone [b]", "no such file")
    one_line_error(*cli("coseg", empty, "--out", tmp_path / "o", "--model", tiny_model), str(empty), "no image")
    (empty / "bad.png").write_bytes(b"")
    one_line_error(*cli("coseg", empty, "--out", tmp_path / "o", "--model", tiny_model), "no readable image",
                   "bad.png: empty file")
    one_line_error(*cli("coseg", EXAMPLES / "horse.jpg", "--out", tmp_path / "o", "--model", tiny_model,
                        "--stride", 5, "--image-size", 56), "stride 5")


def test_coseg_needs_a_vit(tiny_sd):
    from simsearch.backbones import load_backbone

    with pytest.raises(C.SimsearchError, match="ViT backbone.*'sd'"):
        C.cosegment(load_backbone(str(tiny_sd), "cpu"), [Image.open(EXAMPLES / "horse.jpg")])


def test_query_coseg_segments_the_query_with_its_hits(cli, tmp_path, new_index, photos):
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    out = tmp_path / "co [x]"
    code, stdout, err = cli("query", photos / "chelsea.jpg", "--db", db, "-k", "4", "--json", "--coseg", out)
    assert code == 0, err
    hits = [json.loads(line)["path"] for line in stdout.strip().splitlines()]
    assert hits[0] == str(photos / "chelsea.jpg")  # the query is its own first hit, co-segmented once
    stems = sorted(p.name.removesuffix("_mask.png") for p in out.glob("*_mask.png"))
    assert stems == sorted(p.rsplit("/", 1)[-1].removesuffix(".jpg") for p in hits)
    text = (out / "coseg.html").read_text()
    assert "co-segmentation of chelsea.jpg and its hits" in text and text.count("data:image/jpeg") == 2 * 4
    assert f"wrote 4 masks and overlays to {out}" in err
    dropped = [line.rsplit(": ", 1)[1] for line in err.splitlines() if line.startswith("outlier")]
    assert text.count("outlier (dropped)") == len(dropped) and set(dropped) <= set(hits)


# -- the real thing: cut-out photos with alpha pasted on photos -----------------------------------
@pytest.mark.slow
def test_cosegmentation_of_real_cutouts_beats_saliency_alone(embedded_model):
    """Five birds, each on a crop of another example photo: the masks must match the alpha masks better
    than the saliency map they vote with, thresholded alone (benchmarks/coseg.py measures ten
    categories)."""
    import debian_data
    from simsearch.backbones import load_backbone
    from simsearch.bench import fixtures

    stamps = require(debian_data.stamps_dir(), "tuxpaint stamps not found (Debian package tuxpaint-stamps-default "
                                               "in the data root of benchmarks/debian_data.py)")
    images, truths = fixtures.composite_set(stamps, "animals/birds", 5, EXAMPLES, seed=0)
    result = C.cosegment(load_backbone(embedded_model, "cpu"), images)
    coseg = np.mean([C.jaccard(m, t) for m, t in zip(result.masks, truths)])
    saliency = np.mean([C.jaccard(C.saliency_mask(s, t.shape, 0.065), t) for s, t in zip(result.saliency, truths)])
    print(f"birds: co-segmentation J {coseg:.3f}, saliency > 0.065 J {saliency:.3f}")
    assert coseg > saliency + 0.1 and coseg > 0.45, (coseg, saliency)  # measured: 0.533 vs 0.288
