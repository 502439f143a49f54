"""Geometric verification (rerank.verify) on small arrays whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simsearch.rerank.verify import (GeometricVerifier, PatchSet, align_translation, cell_centres,
                                     ransac_similarity, squared_residuals, tentative_matches)


def _similarity(xy: np.ndarray, scale: float, angle: float, shift, mirror: bool) -> np.ndarray:
    """x' = s R(angle) (mirror_x(x)) + t, written with a matrix (not complex numbers as the code is)."""
    x = xy * [-1, 1] if mirror else xy
    r = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return scale * x @ r.T + np.asarray(shift)


@pytest.mark.parametrize("mirror", [False, True])
def test_ransac_recovers_a_similarity_among_outliers(mirror):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 1, (2, 60, 2))
    dst = np.stack([_similarity(src[0], 0.5, 0.3, (0.2, 0.1), mirror), rng.uniform(0, 1, (60, 2))])
    outliers = rng.random(60) < 0.5  # half of the first row's matches are wrong
    dst[0, outliers] = rng.uniform(0, 1, (outliers.sum(), 2))
    dst[0, ~outliers] += rng.normal(0, 0.003, ((~outliers).sum(), 2))
    ver = ransac_similarity(torch.tensor(src, dtype=torch.float32), torch.tensor(dst, dtype=torch.float32),
                            torch.ones(2, 60), tol=0.02, mirror=True)
    found = ver.inliers[0].numpy()
    assert (found == ~outliers).mean() > 0.95  # the true inliers, and (almost) only them
    assert ver.score[0] == pytest.approx(found.sum())
    assert ver.score[1] < 8  # random points: no model explains many
    assert bool(ver.transform[0, 2].real > 0.5) == mirror
    a, b = ver.transform[0, 0], ver.transform[0, 1]
    assert abs(a) == pytest.approx(0.5, abs=0.01)
    z = torch.complex(*torch.tensor(src[0, :3].T, dtype=torch.float32))
    z = z.conj() if mirror else z
    pred = (a * z + b).numpy()
    expect = _similarity(src[0, :3], 0.5, 0.3, (0.2, 0.1), mirror)
    np.testing.assert_allclose(np.stack([pred.real, pred.imag], -1), expect, atol=0.01)


def test_ransac_ignores_matches_without_weight_and_needs_three():
    src = torch.rand(1, 10, 2)
    w = torch.zeros(1, 10)
    w[0, :2] = 1  # two matches fit any similarity: no evidence
    ver = ransac_similarity(src, src.clone(), w, tol=0.01)
    assert ver.score[0] == 0 and not ver.inliers.any()


def test_cell_centres_in_units_of_the_longer_side():
    xy = cell_centres((2, 4), torch.tensor([[400, 200]]))  # a 2:1 image on a 2 x 4 grid
    expect = np.array([[(c + 0.5) / 4, (r + 0.5) / 2 * 0.5] for r in range(2) for c in range(4)])
    np.testing.assert_allclose(xy[0].numpy(), expect, atol=1e-6)


def test_pooled_averages_2x2_cells():
    desc = F.normalize(torch.randn(1, 16, 8), dim=-1)
    ps = PatchSet.on_grid(desc, torch.rand(1, 16), (4, 4), [[100, 100]])
    pooled = ps.pooled(2)
    assert pooled.grid == (2, 2)
    g = desc[0].reshape(4, 4, 8)
    top_left = F.normalize(g[:2, :2].reshape(4, 8).mean(0), dim=0)
    torch.testing.assert_close(pooled.desc[0, 0], top_left)
    torch.testing.assert_close(pooled.xy[0, 0], torch.tensor([0.25, 0.25]))
    assert pooled.weight[0, 3] == pytest.approx(ps.weight[0].reshape(4, 4)[2:, 2:].mean().item())


def test_tentative_matches_mutual_ratio_and_floor():
    # query cells 0..3 have distinct descriptors; candidate 0 holds them permuted on a 1 x 8 grid,
    # candidate 1 holds two equally close copies of query cell 0 far apart (ambiguous: the ratio test fails)
    e = torch.eye(8)
    q = PatchSet.on_grid(e[:4][None], torch.ones(1, 4), (1, 4), [[4, 1]])
    c0 = e[[7, 2, 6, 0, 5, 1, 4, 3]]  # query cell i sits at candidate cell perm^-1
    c1 = torch.stack([e[0] + 0.3 * e[4], e[5], e[6], e[7], e[4], e[0] + 0.3 * e[1], e[2] * 0.1 + e[6], e[3] * 0.1 + e[5]])
    cand = PatchSet.on_grid(torch.stack([c0, c1]), torch.ones(2, 8), (1, 8), [[8, 1], [8, 1]])
    t = tentative_matches(q, cand, min_sim=0.5, ratio=0.9)
    assert t.target[0].tolist() == [3, 5, 1, 7] and (t.weight[0] == 1).all()
    assert t.weight[1, 0] == 0  # two equally good matches 5 cells apart
    assert t.weight[1, 2] == 0 and t.weight[1, 3] == 0  # best cosine 0.1 / 0.1: below the floor


def test_ratio_test_takes_the_second_best_outside_the_best_cells_3x3():
    """On a 5 x 6 grid, against a loop over every cell: a match passes when the best cosine's distance
    is below ratio x that of the best cell more than one row or column away from it."""
    torch.manual_seed(0)
    q = PatchSet.on_grid(F.normalize(torch.randn(1, 12, 16), dim=-1), torch.ones(1, 12), (3, 4), [[4, 3]])
    cand = PatchSet.on_grid(F.normalize(torch.randn(3, 30, 16), dim=-1), torch.ones(3, 30), (5, 6), [[6, 5]] * 3)
    t = tentative_matches(q, cand, min_sim=-1.0, ratio=0.97)
    sim = (q.desc[0] @ cand.desc.transpose(1, 2)).numpy()
    for m in range(3):
        for i in range(12):
            best = int(sim[m, i].argmax())
            far = [j for j in range(30) if abs(j // 6 - best // 6) > 1 or abs(j % 6 - best % 6) > 1]
            d = lambda s: np.sqrt(max(2 - 2 * s, 0))  # noqa: E731
            passes = d(sim[m, i, best]) < 0.97 * d(sim[m, i, far].max()) and int(sim[m, :, best].argmax()) == i
            assert t.target[m, i] == best and bool(t.weight[m, i] > 0) == passes


def test_squared_residuals_are_those_of_each_hypothesis_at_each_point():
    """The nine-term expansion RANSAC counts inliers with, against |a z + b - t|^2 in float64 complex."""
    rng = np.random.default_rng(3)
    c = lambda *shape: rng.normal(size=shape) + 1j * rng.normal(size=shape)  # noqa: E731
    a, b, z, t = c(2, 5), c(2, 5), c(2, 7), c(2, 7)
    want = np.abs(a[:, :, None] * z[:, None] + b[:, :, None] - t[:, None]) ** 2
    got = squared_residuals(*(torch.tensor(x, dtype=torch.complex64) for x in (a, b, z, t)))
    assert got.shape == (2, 5, 7)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_ransac_scores_only_the_voting_slots_and_maps_inliers_back():
    """12 true matches spread over 300 slots, the rest without a vote: the inliers are those 12 slots."""
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 1, (1, 300, 2))
    dst = _similarity(src[0], 0.7, -0.4, (0.1, 0.3), False)[None]
    w = np.zeros((1, 300))
    slots = rng.choice(300, 12, replace=False)
    w[0, slots] = rng.uniform(0.5, 1, 12)
    ver = ransac_similarity(torch.tensor(src, dtype=torch.float32), torch.tensor(dst, dtype=torch.float32),
                            torch.tensor(w, dtype=torch.float32), tol=0.01, mirror=False)
    assert sorted(ver.inliers[0].nonzero()[:, 0].tolist()) == sorted(slots.tolist())
    assert ver.score[0] == pytest.approx(w[0, slots].sum(), rel=1e-5)


def test_verifier_finds_a_half_size_crop_and_rejects_a_shuffle():
    """A candidate whose 16 x 16 grid holds the query's 8 x 8 grid (described at half size) in its
    top-left quarter, mirrored; another with the same descriptors shuffled over the grid."""
    torch.manual_seed(0)
    q_desc = F.normalize(torch.randn(64, 32), dim=-1)  # the query on an 8 x 8 grid
    cand = F.normalize(torch.randn(2, 256, 32), dim=-1)
    cells = torch.arange(256).reshape(16, 16)
    region = cells[:8, :8].flip(1).reshape(-1)  # mirrored: query column c lands in column 7 - c
    cand[0, region] = q_desc + 0.05 * torch.randn(64, 32)
    cand[1, torch.randperm(256)[:64]] = q_desc
    query = PatchSet.on_grid(q_desc[None], torch.ones(1, 64), (8, 8), [[100, 100]])
    cands = PatchSet.on_grid(F.normalize(cand, dim=-1), torch.ones(2, 256), (16, 16), [[200, 200], [200, 200]])
    ver = GeometricVerifier(pool_candidates=False)([query], cands)
    assert ver.score[0] > 0.8 and ver.score[1] < 0.15
    pairs = ver.pairs[0]
    # query pixel (x, y) -> candidate pixel (100 - x, y): a mirror at the same scale in pixels
    np.testing.assert_allclose(pairs[:, 2], 100 - pairs[:, 0], atol=1.0)
    np.testing.assert_allclose(pairs[:, 3], pairs[:, 1], atol=1.0)


def _unit_grid(rng, h: int, w: int, c: int = 32) -> np.ndarray:
    g = rng.normal(size=(h, w, c))
    return g / np.linalg.norm(g, axis=-1, keepdims=True)

def _grid_set(g: np.ndarray) -> PatchSet:
    """Grids (B, h, w, C) of unit descriptors as a PatchSet, one pixel a cell, every cell weighing 1."""
    b, h, w, c = g.shape
    return PatchSet.on_grid(torch.tensor(g.reshape(b, h * w, c), dtype=torch.float32), torch.ones(b, h * w), (h, w),
                            [(w, h)] * b)



def _best_offset(query: np.ndarray, cand: np.ndarray) -> tuple[float, int, int]:
    """Brute force: mean cosine of the query's cells over the candidate cells under them (0 off the
    grid), for every translation that overlaps by at least one cell."""
    (hq, wq, _), (hc, wc, _) = query.shape, cand.shape
    best = (-2.0, 0, 0)
    for dy in range(-(hq - 1), hc):
        for dx in range(-(wq - 1), wc):
            total = sum(query[i, j] @ cand[i + dy, j + dx] for i in range(hq) for j in range(wq)
                        if 0 <= i + dy < hc and 0 <= j + dx < wc)
            best = max(best, (total / (hq * wq), dy, dx))
    return best


@pytest.mark.parametrize("mirror", [False, True])
def test_alignment_finds_a_small_region_at_its_offset(mirror):
    rng = np.random.default_rng(3)
    cands = np.stack([_unit_grid(rng, 10, 12) for _ in range(3)])
    region = cands[1, 5:9, 2:6]  # 4 x 4 cells of candidate 1 (1/7.5 of its cells)
    query = region[:, ::-1] if mirror else region
    noisy = query + rng.normal(0, 0.1, query.shape)
    noisy /= np.linalg.norm(noisy, axis=-1, keepdims=True)

    al = align_translation(_grid_set(noisy[None]), _grid_set(cands), mirror=True)
    assert al.offset[1].tolist() == [5, 2, int(mirror)]
    assert int(al.score.argmax()) == 1
    for i in (0, 2):  # unrelated grids: the brute-force best over plain translations, at most
        assert float(al.score[i]) == pytest.approx(max(_best_offset(noisy, cands[i])[0],
                                                       _best_offset(noisy[:, ::-1], cands[i])[0]), abs=1e-5)
    ver = GeometricVerifier(min_sim=0.8).align([_grid_set(noisy[None])], _grid_set(cands))
    assert int(ver.inliers[1]) == 16 and int(ver.inliers[0]) == 0
    # correspondences: each query cell centre against the candidate cell it came from (pixels)
    q_xy, c_xy = ver.pairs[1][:, :2], ver.pairs[1][:, 2:]
    qj = np.floor(q_xy[:, 0]).astype(int)
    cj = np.floor(c_xy[:, 0]).astype(int)
    assert (cj == (5 - qj if mirror else qj + 2)).all()
    assert (np.floor(c_xy[:, 1]) == np.floor(q_xy[:, 1]) + 5).all()


@pytest.mark.parametrize("query_grid, cand_grid", [((3, 5), (6, 7)), ((5, 2), (4, 9)), ((7, 8), (5, 6))])
def test_alignment_of_non_square_grids_is_the_brute_force_best(query_grid, cand_grid, monkeypatch):
    """Score and offset of every candidate against a loop over all translations, plain and mirrored,
    on grids of other shapes than square (a query larger than the candidate too), with the candidates
    taken a few at a time (the similarities' memory bound)."""
    import simsearch.rerank.verify as verify

    rng = np.random.default_rng(5)
    query = _unit_grid(rng, *query_grid)
    cands = np.stack([_unit_grid(rng, *cand_grid) for _ in range(4)])

    monkeypatch.setattr(verify, "ALIGN_BYTES", 8 * np.prod(query_grid) * np.prod(cand_grid) * 3)  # 3 at a time
    al = align_translation(_grid_set(query[None]), _grid_set(cands), mirror=True)
    for i in range(4):
        plain, mirrored = _best_offset(query, cands[i]), _best_offset(query[:, ::-1], cands[i])
        score, dy, dx = max(plain, mirrored)
        assert float(al.score[i]) == pytest.approx(score, abs=1e-5)
        assert al.offset[i].tolist() == [dy, dx, int(mirrored > plain)]


def test_flat_cells_are_the_untextured_ones():
    """A 128 px black canvas with noise in rows and columns 32..95: on a 16 x 16 grid (8 px cells)
    exactly cells 4..11 of each axis are textured; on an 8 x 8 grid, cells 2..5."""
    from simsearch.images import flat_cells

    grey = np.zeros((128, 128), np.uint8)
    grey[32:96, 32:96] = np.random.default_rng(0).integers(0, 256, (64, 64))
    for side, lo, hi in ((16, 4, 12), (8, 2, 6)):
        want = np.ones((side, side), bool)
        want[lo:hi, lo:hi] = False
        np.testing.assert_array_equal(flat_cells(grey, (side, side)), want.reshape(-1))
    # a wide image resized whole onto a square grid: columns are judged on its own width
    wide = np.zeros((64, 128), np.uint8)
    wide[:, 64:] = np.random.default_rng(1).integers(0, 256, (64, 64))
    assert flat_cells(wide, (4, 4)).reshape(4, 4)[:, :2].all() and not flat_cells(wide, (4, 4)).reshape(4, 4)[:, 2:].any()


def test_a_shared_blank_canvas_does_not_verify():
    """Two unrelated pictures on one black canvas (their corners, say): the canvas cells have the same
    keys at the same places, so they verify as a copy unless flat cells lose their vote
    (rerank.scores.without_flat)."""
    from simsearch.rerank.scores import without_flat

    torch.manual_seed(0)
    canvas = F.normalize(torch.randn(32), dim=0)
    grid = torch.arange(256).reshape(16, 16)
    blank = torch.zeros(16, 16, dtype=torch.bool)
    blank[:5, :5] = blank[:5, -5:] = blank[-5:, :5] = blank[-5:, -5:] = True  # four corners
    desc = F.normalize(torch.randn(2, 256, 32), dim=-1)
    where = 0.7 * F.normalize(torch.randn(int(blank.sum()), 32), dim=-1)  # what a cell's key keeps of its position
    desc[:, grid[blank]] = F.normalize(canvas + where + 0.02 * torch.randn(2, int(blank.sum()), 32), dim=-1)
    inner = np.kron(~blank.numpy(), np.ones((8, 8), bool))
    greys = [np.where(inner, np.random.default_rng(i).integers(0, 256, (128, 128)), 0).astype(np.uint8) for i in (0, 1)]
    query = PatchSet.on_grid(desc[:1], torch.ones(1, 256), (16, 16), [[128, 128]])
    cand = PatchSet.on_grid(desc[1:], torch.ones(1, 256), (16, 16), [[128, 128]])
    verifier = GeometricVerifier(pool_candidates=False)
    unmasked = float(verifier([query], cand).score[0])
    assert unmasked > 0.3, unmasked  # the corners verify each other
    masked = without_flat(query, [greys[0]])
    assert (masked.weight[0] == 0).sum() == blank.sum() and masked.weight[0, grid[~blank]].eq(1).all()
    assert float(verifier([masked], without_flat(cand, [greys[1]])).score[0]) < 0.1  # chance inliers at most
    assert without_flat(query, [None]).weight.eq(1).all()  # no thumbnail: every cell votes


@pytest.mark.parametrize("mirror", [False, True])
def test_the_alignment_implies_the_similarity_of_its_cells(mirror):
    """A 4 x 4 region of a 10 x 12 grid (one pixel a cell): the transform an alignment returns takes
    every query cell's centre onto the centre of the candidate cell it was aligned to, written out in
    pixels (scale 4/12 of the units, no rotation; mirrored: x -> 3 - x first)."""
    rng = np.random.default_rng(3)
    cands = np.stack([_unit_grid(rng, 10, 12) for _ in range(2)])
    region = cands[1, 5:9, 2:6]
    query = region[:, ::-1] if mirror else region

    ver = GeometricVerifier(min_sim=0.8).align([_grid_set(query[None].copy())], _grid_set(cands))
    a, b, flipped = ver.transform[1].tolist()
    assert flipped.real == float(mirror)
    ys, xs = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    z = ((xs + 0.5) + 1j * (ys + 0.5)) / 4  # query cell centres, units of its 4 px
    landed = (a * (z.conj() if mirror else z) + b) * 12  # candidate pixels
    want = ((3 - xs if mirror else xs) + 2 + 0.5) + 1j * (ys + 5 + 0.5)
    np.testing.assert_allclose(landed, want, atol=1e-4)
    assert abs(a) == pytest.approx(4 / 12, abs=1e-6) and abs(a.imag) < 1e-6
