"""Correspondence primitives on small arrays: mutual nearest neighbours, best buddies, point transfer
with soft-argmax refinement, and the grid <-> pixel geometry of DenseDescriptors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simsearch.rerank.correspondence import (DenseDescriptors, best_buddies, cosine_similarity,
                                             mutual_nearest_neighbours, mutual_nn_share, transfer_points)


def test_mutual_nearest_neighbours_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.0],   # a0 -> b0, b0's best is a0: mutual
                        [0.8, 0.2, 0.1],   # a1 -> b0, but b0 prefers a0: not mutual
                        [0.0, 0.3, 0.7]])  # a2 -> b2, b2's best is a2: mutual
    nn_ab, mutual = mutual_nearest_neighbours(sim)
    assert nn_ab.tolist() == [0, 0, 2]
    assert mutual.tolist() == [True, False, True]


def test_mutual_nearest_neighbours_batched_and_rectangular():
    torch.manual_seed(0)
    sim = torch.randn(4, 6, 9)
    nn_ab, mutual = mutual_nearest_neighbours(sim)
    assert nn_ab.shape == mutual.shape == (4, 6)
    for m in range(4):
        for i in range(6):
            j = sim[m, i].argmax()
            assert nn_ab[m, i] == j
            assert mutual[m, i].item() == (sim[m, :, j].argmax().item() == i)


def test_mutual_nn_share():
    torch.manual_seed(0)
    a = torch.randn(20, 8)
    perm = torch.randperm(20)
    b = torch.stack([a[perm], torch.randn(20, 8)])  # a permuted copy, and an unrelated set
    share = mutual_nn_share(a, b)
    assert share.shape == (2,)
    assert share[0].item() == 1.0
    assert 0 <= share[1].item() < 1.0


@pytest.mark.parametrize("n", [100, 5])
def test_best_buddies_recover_a_permutation(n):
    torch.manual_seed(0)
    na = 40
    desc_a = torch.randn(na, 16)
    perm = torch.randperm(na)
    desc_b = desc_a[perm]  # b[j] = a[perm[j]]
    sal_a = torch.rand(na) * 0.9 + 0.1
    sal_b = sal_a[perm]
    pairs, sim = best_buddies(desc_a, desc_b, sal_a, sal_b, n=n, threshold=0.05)
    assert len(pairs) == min(n, na)
    assert len(set(pairs[:, 0].tolist())) == len(pairs)  # one pair per source patch
    for ia, ib in pairs.tolist():
        assert perm[ib].item() == ia
    torch.testing.assert_close(sim, torch.ones(len(pairs)))
    # Ordered by pair saliency, most salient first.
    pair_sal = sal_a[pairs[:, 0]] + sal_b[pairs[:, 1]]
    assert (pair_sal[:-1] >= pair_sal[1:]).all()


def test_best_buddies_respect_the_saliency_threshold():
    torch.manual_seed(1)
    desc_a = torch.randn(30, 8)
    sal_a = torch.zeros(30)
    sal_a[:10] = 1.0  # only the first 10 patches are salient
    pairs, _ = best_buddies(desc_a, desc_a.clone(), sal_a, sal_a.clone(), n=50, threshold=0.05)
    assert sorted(pairs[:, 0].tolist()) == list(range(10))
    assert (pairs[:, 0] == pairs[:, 1]).all()


def test_best_buddies_with_none_salient_is_empty():
    desc = torch.randn(12, 4)
    pairs, sim = best_buddies(desc, desc, torch.zeros(12), torch.zeros(12), n=5)
    assert pairs.shape == (0, 2) and sim.shape == (0,)


def _angle_grid(h: int, w: int, step: float = 0.6) -> torch.Tensor:
    """Descriptors whose cosine similarity falls off smoothly with grid distance:
    [cos(step*r), sin(step*r), cos(step*c), sin(step*c)] / sqrt(2), so that
    cos(cell, query at (r0, c0)) = (cos(step*(r-r0)) + cos(step*(c-c0))) / 2.
    With step 0.6 and the default temperature 0.02, cells two away weigh < 1e-7 of the best, so a
    window cut by the border does not bias the soft-argmax measurably."""
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return _angle_desc(r.flatten(), c.flatten(), step)


def _angle_desc(r: torch.Tensor, c: torch.Tensor, step: float = 0.6) -> torch.Tensor:
    return torch.stack([torch.cos(step * r), torch.sin(step * r), torch.cos(step * c), torch.sin(step * c)], 1) / math.sqrt(2)


def test_transfer_points_window_zero_is_plain_nearest_neighbour():
    torch.manual_seed(0)
    desc_b = torch.randn(6 * 7, 10)
    desc_a = torch.randn(5, 10)
    pos, conf = transfer_points(desc_a, desc_b, torch.arange(5), (6, 7), window=0)
    sim = cosine_similarity(desc_a, desc_b)
    best = sim.argmax(-1)
    assert pos.tolist() == torch.stack([best // 7, best % 7], 1).float().tolist()
    torch.testing.assert_close(conf, sim.max(-1).values)


def test_transfer_points_soft_argmax_gives_sub_cell_positions():
    h, w = 7, 8
    desc_b = _angle_grid(h, w)
    targets = torch.tensor([[3.0, 2.5], [2.5, 4.0], [3.5, 4.5], [1.0, 5.0]])
    desc_a = _angle_desc(targets[:, 0], targets[:, 1])
    pos0, _ = transfer_points(desc_a, desc_b, torch.arange(len(targets)), (h, w), window=0)
    pos, conf = transfer_points(desc_a, desc_b, torch.arange(len(targets)), (h, w), window=2)
    # Plain NN lands on a whole cell, half a cell off for the half-way targets...
    assert (pos0 == pos0.round()).all()
    assert (pos0 - targets).abs().max() == pytest.approx(0.5)
    # ...the soft-argmax recovers the sub-cell position.
    torch.testing.assert_close(pos, targets, atol=1e-3, rtol=0)
    assert (conf <= 1 + 1e-6).all() and (conf > 0.95).all()


def test_transfer_points_refinement_stays_on_the_grid():
    h, w = 5, 5
    desc_b = _angle_grid(h, w)
    desc_a = _angle_desc(torch.tensor([0.0, 4.0]), torch.tensor([0.0, 4.0]))  # corner cells
    pos, _ = transfer_points(desc_a, desc_b, torch.arange(2), (h, w), window=2)
    assert (pos >= 0).all() and (pos[:, 0] <= h - 1).all() and (pos[:, 1] <= w - 1).all()
    torch.testing.assert_close(pos, torch.tensor([[0.0, 0.0], [4.0, 4.0]]), atol=0.02, rtol=0)


def test_cosine_similarity_shape_and_range():
    a, b = torch.randn(2, 5, 3), torch.randn(2, 7, 3)
    s = cosine_similarity(a, b)
    assert s.shape == (2, 5, 7)
    torch.testing.assert_close(s[1, 2, 3], F.cosine_similarity(a[1, 2], b[1, 3], dim=0))


def test_dense_descriptors_pixel_geometry_round_trips():
    # A 448x336 image resized to 224, stride 7, patch 14: grid 31x31.
    d = DenseDescriptors(desc=torch.zeros(31 * 31, 1), saliency=torch.zeros(31 * 31), grid=(31, 31),
                         stride=7, patch=14, input_size=224, image_size=(448, 336))
    rc = torch.tensor([[0, 0], [10, 20], [30, 30]])
    xy = d.cell_to_xy(rc)
    # centre of cell (r, c) in the 224 input: (7c + 7, 7r + 7); scaled by (2, 1.5) to the image.
    np.testing.assert_allclose(xy, [[14, 10.5], [(7 * 20 + 7) * 2, (7 * 10 + 7) * 1.5], [434, 325.5]])
    idx = d.xy_to_index(xy)
    assert idx.tolist() == [0, 10 * 31 + 20, 30 * 31 + 30]
    # Points beyond the last centre clamp to the border cells.
    assert d.xy_to_index(np.array([[0, 0], [447, 335]])).tolist() == [0, 31 * 31 - 1]
