"""SD+DINO fused correspondences (Zhang et al.) and LDM point correspondences (Hedlin et al.): pure
functions with known answers, equality with the papers' own computations (tests/papers_reference.py),
and both paths end to end through the CLI on the tiny SD model and a tiny DINOv2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import papers_reference as ref
from conftest import EXAMPLES, SD_SIZE, save_tiny_vit
from simsearch.backbones import load_backbone
from simsearch.rerank.fusion import FusedMatcher, PairDescription, co_pca, fuse, gather_layers

pytestmark = pytest.mark.slow


# -- pure functions ------------------------------------------------------------------------------------------
def test_co_pca_known_answers():
    """Points on a plane in 5-D: two components keep every distance; the projection is one PCA of both
    images together (a shared basis), seeded and repeatable; dims clamp to what the data has."""
    rng = np.random.default_rng(0)
    basis = torch.tensor(np.linalg.qr(rng.normal(size=(5, 2)))[0], dtype=torch.float32)  # (5, 2) orthonormal
    a = torch.tensor(rng.normal(size=(30, 2)), dtype=torch.float32) @ basis.T + 3.0
    b = torch.tensor(rng.normal(size=(20, 2)), dtype=torch.float32) @ basis.T + 3.0
    ra, rb = co_pca(a, b, dims=2, seed=0)
    assert ra.shape == (30, 2) and rb.shape == (20, 2)
    torch.testing.assert_close(torch.cdist(ra, rb), torch.cdist(a, b), atol=1e-4, rtol=1e-4)
    again = co_pca(a, b, dims=2, seed=0)
    assert torch.equal(again[0], ra) and torch.equal(again[1], rb)
    assert co_pca(a, b, dims=256, seed=0)[0].shape == (30, 5)


def test_gather_and_co_pca_are_sd_dinos():
    """Three SD layers (coarse to fine) reduced per layer and gathered [8 | 5 | 2] exactly as sd-dino's
    co_pca does it (layer 2 upsampled twice)."""
    g = torch.Generator().manual_seed(0)
    feats = [{k: torch.randn(1, c, s, s, generator=g) for k, c, s in ((2, 40, 3), (5, 36, 6), (8, 24, 12))} for _ in range(2)]
    theirs = ref.sd_dino_gather(feats[0], feats[1], dims=(8, 8, 8), seed=3)

    def description(f):
        return PairDescription(sd=[(f[k][0].flatten(1).T, f[k].shape[-2:]) for k in (2, 5, 8)], dino=None, image_size=(96, 96))

    matcher = FusedMatcher.__new__(FusedMatcher)
    matcher.conf = dict(FusedMatcher.default_conf, pca_dims=8, seed=3, sd_size=96)
    ours = matcher.pair(description(feats[0]), description(feats[1]))
    for mine, their in zip(ours, theirs):
        assert mine.grid == (12, 12) and mine.stride == 8
        # the same seeded pca_lowrank; their token matrix is a transposed view, ours contiguous: float noise
        torch.testing.assert_close(mine.desc, F.normalize(their[0].flatten(1).T, dim=-1), atol=1e-4, rtol=1e-3)
    # the gathering alone, on known maps: finest channels first, coarser ones upsampled behind them
    maps = [torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 2, 2), 5.0), torch.full((1, 1, 4, 4), 8.0)]
    assert gather_layers(maps)[0, :, 0, 0].tolist() == [8.0, 5.0, 2.0]


def test_fusion_weights_each_part_by_alpha():
    """Each part unit-norm per cell, scaled alpha and 1 - alpha; cosine of fused descriptors is then the
    weighted sum alpha^2 cos_sd + (1 - alpha)^2 cos_dino over the fixed norm."""
    g = torch.Generator().manual_seed(1)
    sd, dino = torch.randn(6, 10, generator=g), torch.randn(6, 4, generator=g)
    for alpha in (0.5, 0.8, 1.0):
        f = fuse(sd, dino, alpha)
        torch.testing.assert_close(f[:, :10].norm(dim=-1), torch.full((6,), alpha))
        torch.testing.assert_close(f[:, 10:].norm(dim=-1), torch.full((6,), 1 - alpha))
        expected = alpha ** 2 * F.normalize(sd, dim=-1) @ F.normalize(sd, dim=-1).T + \
            (1 - alpha) ** 2 * F.normalize(dino, dim=-1) @ F.normalize(dino, dim=-1).T
        torch.testing.assert_close(f @ f.T, expected, atol=1e-6, rtol=1e-6)


# -- fusion on real models ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("fusion-dino"), layers=3, patch_size=14, image_size=56)


def test_fused_matcher_uses_both_backbones(tiny_sd, tiny_dino):
    """SD part from the UNet's Zhang taps (co-PCA'd per pair), DINO part from the ViT's last-block token
    facet, on DINO's grid; sd alone on SD's finest grid."""
    from simsearch.images import open_image

    sd, vit = load_backbone(str(tiny_sd), "cpu"), load_backbone(str(tiny_dino), "cpu")
    a, b = (open_image(EXAMPLES / f"{n}.jpg").image for n in ("chelsea", "coffee"))
    fused = FusedMatcher(sd, vit, sd_size=SD_SIZE, dino_size=56)
    da, db = fused.pair(fused.describe(a), fused.describe(b))
    # co-PCA keeps min(256, channels, both images' tokens) per SD layer: 2x2 grids -> 8, 4x4 (128 ch) -> 32,
    # 8x8 (64 ch) -> 64; then DINO's 32 channels, on DINO's 4x4 grid
    assert da.grid == (4, 4) and da.desc.shape[1] == 8 + 32 + 64 + 32
    token = vit.dense_descriptors(vit.preprocess(a, 56)[None], 2, "token").desc[0]
    torch.testing.assert_close(da.desc[:, -32:], 0.5 * F.normalize(token, dim=-1))
    alone = FusedMatcher(sd, None, sd_size=SD_SIZE)
    sa, _ = alone.pair(alone.describe(a), alone.describe(b))
    assert sa.grid == (8, 8) and sa.stride == SD_SIZE // 8
    torch.testing.assert_close(sa.desc.norm(dim=-1), torch.ones(64))


def test_match_and_bench_pck_with_sd_features(cli, tiny_sd, tiny_dino, tmp_path):
    from simsearch.bench.fixtures import build_translation

    code, out, err = cli("match", EXAMPLES / "chelsea.jpg", EXAMPLES / "coffee.jpg", "--features", "sd+dino", "--model",
                         tiny_sd, "--dino", tiny_dino, "--image-size", SD_SIZE, "--dino-size", "56", "--points",
                         "100,80;300,200", "--json")
    assert code == 0, err
    matches = json.loads(out)["matches"]
    assert len(matches) == 2 and all(0 <= m["b"][0] <= 640 and 0 <= m["b"][1] <= 480 for m in matches)

    root = build_translation(tmp_path / "spair", {EXAMPLES / "chelsea.jpg": [(40, 24)], EXAMPLES / "coffee.jpg": [(-31, 20)]})
    code, out, err = cli("bench", "pck", root, "--features", "dino,sd", "--features", "sd+dino", "--model", tiny_sd,
                         "--dino", tiny_dino, "--image-size", SD_SIZE, "--dino-size", "56", "--json")
    assert code == 0, err
    results = json.loads(out)
    assert set(results) == {"dino", "sd", "sd+dino"}
    assert len({r["points"] for r in results.values()}) == 1  # the same pairs for all three
    assert all(0 <= r["mean"]["pck@0.1"] <= 1 for r in results.values())
    line = [ln for ln in cli("match", EXAMPLES / "chelsea.jpg", EXAMPLES / "coffee.jpg", "--features", "sd",
                              "--stride", "7")[2].splitlines() if ln.strip()]
    assert line == [line[0]] and "--stride 7 apply to --features dino only" in line[0]
    from simsearch.api import make_matcher
    from simsearch.errors import SimsearchError

    with pytest.raises(SimsearchError, match=r"^stride=7 apply to features='dino' only"):  # the library's own words
        make_matcher("sd", str(tiny_sd), stride=7)


# -- LDM correspondences -------------------------------------------------------------------------------------
def test_ldm_maps_are_hedlins_and_processors_are_restored(tiny_sd):
    """The recording processor gives Hedlin et al.'s maps (second half of the heads, token 1, bilinear
    upsampling), lets gradients reach the prompt, and leaves the UNet's processors as they were."""
    from simsearch.rerank.ldm import DEFAULT_LAYERS, cross_attention_maps, layer_maps

    sd = load_backbone(str(tiny_sd), "cpu")
    unet = sd.unet
    before = dict(unet.attn_processors)
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([40])
    context = torch.randn(1, 77, 64, generator=g, requires_grad=True)
    with torch.enable_grad():
        with cross_attention_maps(unet, DEFAULT_LAYERS) as maps:
            from simsearch.backbones.base import StopForward

            with pytest.raises(StopForward):  # stops after the last chosen layer
                unet(noisy, t, encoder_hidden_states=context)
        ours = layer_maps(maps, DEFAULT_LAYERS, token=1, size=32).mean(1)
        # at 128 px the UNet's grids are those of 512 px divided by 4: their 32x32 token limit becomes 8x8
        theirs = ref.hedlin_cross_attention_maps(unet, noisy, t, context, layers=range(6), token=1, upsample_res=32,
                                                 max_tokens=8 ** 2)
        torch.testing.assert_close(ours, theirs)
        ours.sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert unet.attn_processors == before and all(p.requires_grad is False for p in unet.parameters())


def test_ldm_optimisation_is_seeded(tiny_sd):
    from simsearch.rerank.ldm import LDMCorrespondence, crop_window

    sd = load_backbone(str(tiny_sd), "cpu")
    pixels = torch.randn(1, 3, SD_SIZE, SD_SIZE, generator=torch.Generator().manual_seed(0))
    ldm = LDMCorrespondence(sd, steps=2, image_size=SD_SIZE)
    runs = [ldm.optimise(pixels, np.array([30.0, 90.0]), np.random.default_rng(7), torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], sd.prompt_embedding)
    rng = np.random.default_rng(0)
    for _ in range(200):  # the point stays inside every crop, away from its border
        p = rng.uniform(0, 128, size=2)
        x0, y0, side = crop_window(p, 128, 0.8, 0.15, rng)
        assert side == 102 and 0 <= x0 <= 128 - side and 0 <= y0 <= 128 - side
        assert x0 <= p[0] <= x0 + side and y0 <= p[1] <= y0 + side


def test_ldm_match_through_the_cli(cli, tiny_sd):
    code, out, err = cli("match", EXAMPLES / "chelsea.jpg", EXAMPLES / "coffee.jpg", "--method", "ldm", "--model", tiny_sd,
                         "--points", "200,150", "--steps", "1", "--repeats", "1", "--image-size", SD_SIZE, "--json")
    assert code == 0, err
    (m,) = json.loads(out)["matches"]
    assert m["a"] == [200.0, 150.0] and 0 <= m["b"][0] <= 400 and 0 <= m["b"][1] <= 400 and 0 < m["confidence"] <= 1
    one_line = [ln for ln in cli("match", EXAMPLES / "chelsea.jpg", EXAMPLES / "coffee.jpg", "--method", "ldm")[2].splitlines() if ln]
    assert len(one_line) == 1 and "--method ldm transfers given --points, and none were given" in one_line[0]
