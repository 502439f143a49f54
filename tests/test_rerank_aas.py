"""Aligned Attention Score (DiffSim) and the rerank score functions, on small arrays and a tiny
random DINOv2 checkpoint."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny_vit
from simsearch.rerank import RERANKERS, fuse, rerank_scores
from simsearch.rerank.aas import aas_directed, aligned_attention_score, attend


def _qkv(seed: int, m: int = 1, heads: int = 2, t: int = 10, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(m, heads, t, d, generator=g) for _ in range(3))


def _reference_directed(q_a, k_a, v_a, k_b, v_b):
    """AAS(A->B) written out: one cosine over the flattened attention outputs."""
    def att(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v

    return F.cosine_similarity(att(q_a, k_b, v_b).flatten(), att(q_a, k_a, v_a).flatten(), dim=0)


def test_attend_is_softmax_attention():
    q, k, v = _qkv(0)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    torch.testing.assert_close(attend(q, k, v), ref)


def test_aas_of_identical_images_is_one():
    a = _qkv(0)
    torch.testing.assert_close(aligned_attention_score(a, a), torch.ones(1))


def test_aas_matches_the_written_out_formula():
    a, b = _qkv(0), _qkv(1)
    ref = 0.5 * (_reference_directed(*a, b[1], b[2]) + _reference_directed(*b, a[1], a[2]))
    torch.testing.assert_close(aligned_attention_score(a, b)[0], ref)
    torch.testing.assert_close(aas_directed(*a, b[1], b[2])[0], _reference_directed(*a, b[1], b[2]))


def test_aas_is_symmetric():
    a, b = _qkv(0), _qkv(1)
    torch.testing.assert_close(aligned_attention_score(a, b), aligned_attention_score(b, a))


def test_aas_is_invariant_to_permuting_b_tokens():
    """B = A's tokens in another order: A's queries read the same keys/values (softmax over keys is
    order-free) and B's permuted queries give a permuted copy of A's output; both directions are 1."""
    a = _qkv(0, t=12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    b = tuple(x[:, :, perm] for x in a)
    unrelated = _qkv(7, t=12)
    scores = aligned_attention_score(a, tuple(torch.cat([x, y]) for x, y in zip(b, unrelated)))
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[1].item() < 0.9


def test_aas_batch_equals_one_by_one():
    a = _qkv(0)
    cands = [_qkv(s) for s in range(1, 6)]
    batch = tuple(torch.cat(parts) for parts in zip(*cands))
    together = aligned_attention_score(a, batch)
    alone = torch.cat([aligned_attention_score(a, c) for c in cands])
    torch.testing.assert_close(together, alone)
    assert ((together >= -1) & (together <= 1)).all()


# -- rerank_scores on a tiny DINOv2 ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from simsearch.backbones import load_backbone

    return load_backbone(str(save_tiny_vit(tmp_path_factory.mktemp("tiny") / "dinov2", layers=3, patch_size=8, image_size=32, mlp_ratio=2)), "cpu")


def _dense(backbone, seed, layer=1, size=32):
    g = torch.Generator().manual_seed(seed)
    out = backbone(torch.randn(1, 3, size, size, generator=g), keep={layer})
    return out.hidden[layer][0].numpy()


def test_rerank_scores_permuted_copy_scores_one(tiny_dinov2):
    q = _dense(tiny_dinov2, 0)
    perm = np.r_[0, 1 + np.random.default_rng(0).permutation(len(q) - 1)]  # CLS stays first
    cands = np.stack([q[perm], _dense(tiny_dinov2, 1), _dense(tiny_dinov2, 2), q])
    s = rerank_scores(tiny_dinov2, 1, q, cands, "both")
    assert set(s) == {"aas", "matches"}
    assert s["aas"].shape == s["matches"].shape == (4,)
    np.testing.assert_allclose(s["aas"][[0, 3]], 1.0, atol=1e-5)
    np.testing.assert_allclose(s["matches"][[0, 3]], 1.0)
    assert (s["aas"][1:3] < 0.999).all() and (s["matches"][1:3] < 1.0).all()
    assert set(np.argsort(-fuse(np.zeros(4), s, "both"))[:2]) == {0, 3}


@pytest.mark.parametrize("method", RERANKERS)
def test_rerank_scores_only_what_the_method_needs(tiny_dinov2, method):
    q = _dense(tiny_dinov2, 0)
    cands = np.stack([_dense(tiny_dinov2, s) for s in range(1, 5)])
    s = rerank_scores(tiny_dinov2, 1, q, cands, method)
    expected = {"verified": {"verified", "inliers", "pairs", "transform"}, "aas": {"aas"}, "matches": {"matches"},
                "both": {"aas", "matches"}}[method]
    assert set(s) == expected


def test_fusion_keeps_the_first_stage_and_promotes_by_second_stage_evidence():
    """fuse = first stage + weight * (score above its floor): a second stage at or below its floor
    leaves the first-stage order, evidence above it reorders by weight * excess."""
    first = np.array([0.9, 0.8, 0.7])
    rule = {"verified": (2.0, 0.1)}
    assert np.argsort(-fuse(first, {"verified": np.array([0.0, 0.1, 0.05])}, "verified", rule)).tolist() == [0, 1, 2]
    fused = fuse(first, {"verified": np.array([0.0, 0.0, 0.3])}, "verified", rule)
    np.testing.assert_allclose(fused, [0.9, 0.8, 0.7 + 2.0 * 0.2])


def test_rerank_scores_refuses_an_unknown_method(tiny_dinov2):
    q = _dense(tiny_dinov2, 0)
    with pytest.raises(ValueError, match="unknown reranker"):
        rerank_scores(tiny_dinov2, 1, q, q[None], "cosine")


def test_rerank_scores_uses_the_blocks_projections(tiny_dinov2):
    """The AAS of rerank_scores is the AAS of that block's q/k/v (what the index stored is the
    hidden state entering the block)."""
    q, c = _dense(tiny_dinov2, 0), _dense(tiny_dinov2, 1)
    with torch.inference_mode():
        qa = tiny_dinov2.qkv(1, torch.as_tensor(q)[None])
        qb = tiny_dinov2.qkv(1, torch.as_tensor(c)[None])
        expected = aligned_attention_score(qa, qb).numpy()
    np.testing.assert_allclose(rerank_scores(tiny_dinov2, 1, q, c[None], "aas")["aas"], expected, rtol=1e-6)
