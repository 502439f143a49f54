"""Pure functions: dense codec, pooling, retrieval metrics. No model, no I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simsearch.bench.metrics import (leave_one_out, ordering_accuracy, sample_triplets, triplet_accuracy,
                                     wilson)
from simsearch.descriptors.codec import decode_dense, dense_nbytes, encode_dense
from simsearch.descriptors.pooling import CONTENT_POOLINGS, content_vector, style_vector


# -- codec -------------------------------------------------------------------------------------
@pytest.fixture
def tokens():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(257, 384)).astype(np.float32)
    x *= rng.uniform(0.01, 50, size=(257, 1)).astype(np.float32)  # tokens of very different scales
    return x


def test_fp16_round_trip(tokens):
    blob = encode_dense(tokens, "float16")
    assert len(blob) == dense_nbytes(257, 384, "float16") == 257 * 384 * 2
    back = decode_dense(blob, 257, 384, "float16")
    assert back.dtype == np.float32 and back.shape == tokens.shape
    rel = np.abs(back - tokens) / np.maximum(np.abs(tokens), 1e-6)
    assert rel[np.abs(tokens) > 1e-3].max() < 1e-3


def test_int8_round_trip_per_token(tokens):
    blob = encode_dense(tokens, "int8")
    assert len(blob) == dense_nbytes(257, 384, "int8") == 257 * 384 + 257 * 2
    back = decode_dense(blob, 257, 384, "int8")
    assert back.shape == tokens.shape
    # error relative to each token's own scale: < 1 % (half a quantisation step is 0.4 %)
    per_token = np.abs(back - tokens).max(1) / np.abs(tokens).max(1)
    assert per_token.max() < 0.01
    # and the whole token vector keeps its direction
    cos = (back * tokens).sum(1) / np.linalg.norm(back, axis=1) / np.linalg.norm(tokens, axis=1)
    assert cos.min() > 0.9999


def test_int8_zero_token_is_exact():
    x = np.zeros((3, 8), np.float32)
    x[1] = np.arange(8) - 4
    back = decode_dense(encode_dense(x, "int8"), 3, 8, "int8")
    assert np.all(np.isfinite(back))
    assert np.array_equal(back[0], np.zeros(8)) and np.array_equal(back[2], np.zeros(8))
    assert np.allclose(back[1], x[1], atol=4 / 127)


def test_codec_rejects_wrong_sizes_and_dtypes(tokens):
    blob = encode_dense(tokens, "float16")
    with pytest.raises(ValueError, match="bytes"):
        decode_dense(blob[:-2], 257, 384, "float16")
    with pytest.raises(ValueError, match="dense dtype"):
        encode_dense(tokens, "bfloat16")
    with pytest.raises(ValueError):
        dense_nbytes(1, 1, "int4")


# -- pooling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", CONTENT_POOLINGS)
def test_content_vector_shapes_and_norms(pooling):
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 16, 32)
    v = content_vector(x, pooling)
    assert v.shape == (3, 64 if pooling == "cls+mean" else 32)
    assert v.dtype == torch.float32
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_content_vector_values():
    x = torch.zeros(1, 3, 2)
    x[0, 0] = torch.tensor([3.0, 4.0])  # CLS
    x[0, 1] = torch.tensor([1.0, 0.0])
    x[0, 2] = torch.tensor([1.0, 2.0])  # patch mean (1, 1)
    assert torch.allclose(content_vector(x, "cls"), torch.tensor([[0.6, 0.8]]))
    s = 1 / math.sqrt(2)
    assert torch.allclose(content_vector(x, "mean"), torch.tensor([[s, s]]))
    # cls+mean: each half unit length, then the whole
    assert torch.allclose(content_vector(x, "cls+mean"), torch.tensor([[0.6 * s, 0.8 * s, 0.5, 0.5]]), atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        content_vector(x, "max")


def test_style_vector_halves_and_invariance():
    torch.manual_seed(0)
    patches = torch.randn(2, 16, 8)
    v = style_vector(patches)
    assert v.shape == (2, 16)
    assert torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-6)
    # each half (mean, std) carries the same weight: norm 1/sqrt(2)
    assert torch.allclose(v[:, :8].norm(dim=-1), torch.full((2,), 2 ** -0.5), atol=1e-6)
    assert torch.allclose(v[:, 8:].norm(dim=-1), torch.full((2,), 2 ** -0.5), atol=1e-6)
    # spatial layout is averaged away: shuffling the tokens changes nothing
    perm = torch.randperm(16)
    assert torch.allclose(style_vector(patches[:, perm]), v, atol=1e-6)
    # std half: per-channel population std
    std = patches.std(1, unbiased=False)
    assert torch.allclose(v[:, 8:], torch.nn.functional.normalize(std, dim=-1) * 2 ** -0.5, atol=1e-6)


# -- metrics -----------------------------------------------------------------------------------
def test_wilson_known_values():
    e = wilson(8, 10)
    assert e.value == 0.8 and e.n == 10
    assert e.low == pytest.approx(0.4902, abs=1e-4) and e.high == pytest.approx(0.9433, abs=1e-4)
    e = wilson(0, 20)
    assert e.low == 0.0 and e.high == pytest.approx(0.1611, abs=1e-4)
    e = wilson(20, 20)
    assert e.high == 1.0 and e.low == pytest.approx(0.8389, abs=1e-4)
    assert math.isnan(wilson(0, 0).value)
    assert e.to_dict() == {"value": 1.0, "n": 20, "ci95": [e.low, e.high]}


def test_leave_one_out_hand_made():
    # groups: A = {0, 1, 2}, B = {3, 4}, C = {5} (no other member: not a query)
    labels = np.array(["A", "A", "A", "B", "B", "C"])
    sim = np.array([
        #  0    1    2    3    4    5
        [9.0, 0.9, 0.1, 0.8, 0.2, 0.0],  # 0: A A? ranking 1(A) 3(B) 4 2(A) 5  -> AP = (1/1 + 2/4)/2 = 0.75
        [0.9, 9.0, 0.5, 0.6, 0.7, 0.0],  # 1: ranking 0(A) 4 3 2(A) 5          -> AP = (1 + 2/4)/2 = 0.75
        [0.1, 0.5, 9.0, 0.3, 0.2, 0.95],  # 2: ranking 5 1(A) 3 4 0(A)          -> AP = (1/2 + 2/5)/2 = 0.45
        [0.8, 0.6, 0.3, 9.0, 0.99, 0.1],  # 3: ranking 4(B) ...                 -> AP = 1
        [0.2, 0.7, 0.2, 0.99, 9.0, 0.3],  # 4: ranking 3(B) ...                 -> AP = 1
        [0.0, 0.0, 0.95, 0.1, 0.3, 9.0],
    ])
    out = leave_one_out(sim, labels, ks=(1, 2))
    assert out["queries"] == 5
    assert out["mAP"] == pytest.approx((0.75 + 0.75 + 0.45 + 1 + 1) / 5)
    assert out["recall@1"] == pytest.approx(4 / 5)  # query 2's first hit is C
    assert out["recall@2"] == pytest.approx(1.0)
    # the diagonal (self-similarity 9.0) never counts
    perfect = leave_one_out(np.eye(4) * 100 + np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]),
                            np.array([0, 0, 1, 1]))
    assert perfect["mAP"] == 1.0 and perfect["recall@1"] == 1.0


def test_triplets_and_accuracy():
    labels = np.array([0, 0, 0, 1, 1, 2])
    t = sample_triplets(labels, 200, seed=3)
    assert t.shape == (200, 3)
    assert np.all(labels[t[:, 0]] == labels[t[:, 1]]) and np.all(t[:, 0] != t[:, 1])
    assert np.all(labels[t[:, 0]] != labels[t[:, 2]])
    assert np.array_equal(t, sample_triplets(labels, 200, seed=3))  # seeded
    same = (labels[:, None] == labels[None]).astype(float)
    assert triplet_accuracy(same, t).value == 1.0
    assert triplet_accuracy(-same, t).value == 0.0
    assert triplet_accuracy(np.zeros((6, 6)), t).value == 0.5  # ties count half
    hand = np.array([[0, 1, 2], [0, 2, 1]])
    sim = np.array([[0, 0.9, 0.1], [0.9, 0, 0.5], [0.1, 0.5, 0]])
    e = triplet_accuracy(sim, hand)  # (0,1,2): 0.9 > 0.1 ok; (0,2,1): 0.1 > 0.9 no
    assert e.value == 0.5 and e.n == 2
    with pytest.raises(ValueError):
        sample_triplets(np.array([0, 1, 2]), 5)


def test_ordering_accuracy():
    weights = np.array([0.2, 0.5, 0.8, 1.0])
    assert ordering_accuracy(np.array([0.1, 0.2, 0.3, 0.4]), weights).value == 1.0
    e = ordering_accuracy(np.array([0.1, 0.3, 0.2, 0.4]), weights)  # one of 6 pairs inverted
    assert e.n == 6 and e.value == pytest.approx(5 / 6)
    # equal weights are not compared
    assert ordering_accuracy(np.array([0.1, 0.9]), np.array([0.5, 0.5])).n == 0


# -- descriptor variants ---------------------------------------------------------------------------
def test_parse_variant_reads_fields_layers_and_none():
    from simsearch.embedder import DescriptorConfig
    from simsearch.errors import SimsearchError

    assert DescriptorConfig.parse_variant("default") == ("default", {})
    assert DescriptorConfig.parse_variant(" old : style_layer=3+4, content_layer=none,style_pooling=cov,"
                                          "dense_layer=up_blocks.1,image_size=-7") == (
        "old", {"style_layer": (3, 4), "content_layer": None, "style_pooling": "cov", "dense_layer": "up_blocks.1",
                "image_size": -7})  # values are only parsed here; DescriptorConfig itself checks them
    for bad, why in [("x:model=y", "'model=y' is not field=value"), ("x:style_layer", "'style_layer' is not"),
                     (":image_size=3", "needs a name")]:
        with pytest.raises(SimsearchError, match=why):
            DescriptorConfig.parse_variant(bad)
