"""timm ViTs as the third backbone family, on tiny random timm models saved with `save_for_hf` and
loaded through `local-dir:` (the real loading path): the generic ViT machinery reproduces timm's own
forward and attention, with CLS and register tokens, and indexes end to end."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny_timm
from simsearch import Index
from simsearch.backbones import family_of, load_backbone
from simsearch.descriptors.facets import merge_heads

ARCHS = {  # name -> (timm architecture, extra model args, prefix tokens)
    "dinov2": ("vit_small_patch14_dinov2", {}, 1),
    "dinov2-reg4": ("vit_small_patch14_reg4_dinov2", {}, 5),
    "dino-s8": ("vit_small_patch8_224", {"img_size": 32}, 1),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def timm_pair(request, tmp_path_factory):
    """(simsearch backbone, timm model) of one tiny architecture."""
    import timm

    arch, extra, prefix = ARCHS[request.param]
    folder = save_tiny_timm(tmp_path_factory.mktemp("timm") / request.param, arch, **extra)
    bb = load_backbone(str(folder), "cpu")
    ref = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0).eval()
    assert family_of(str(folder))[0].name == "timm-vit" and bb.prefix_tokens == prefix
    return bb, ref


def test_forward_at_patch_stride_is_timms(timm_pair):
    bb, ref = timm_pair
    size = ref.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        ours, theirs = bb(x).tokens, ref.forward_features(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_attention_and_token_facets_are_timms(timm_pair):
    """q, k, v from the stored hidden state equal the block's own fused qkv projection (captured with a
    hook in timm's forward); the token facet is the block's output."""
    bb, ref = timm_pair
    x = torch.randn(1, 3, *ref.patch_embed.img_size)
    seen = {}
    handle = ref.blocks[1].attn.qkv.register_forward_hook(lambda m, a, out: seen.setdefault("qkv", out))
    block_out = {}
    handle2 = ref.blocks[1].register_forward_hook(lambda m, a, out: block_out.setdefault("x", out))
    try:
        with torch.inference_mode():
            ref.forward_features(x)
    finally:
        handle.remove()
        handle2.remove()
    b, t, _ = seen["qkv"].shape
    q_ref, k_ref, v_ref = seen["qkv"].reshape(b, t, 3, bb.num_heads, -1).permute(2, 0, 3, 1, 4)
    hidden = bb(x, keep={1}, last_block=1).hidden[1]
    q, k, v = bb.attention_inputs(1, hidden)
    k_only, q_prefix = bb.attention_keys(1, hidden)  # verification's keys and prefix queries alone
    p = bb.prefix_tokens
    for ours, theirs in ((q, q_ref), (k, k_ref), (v, v_ref), (k_only, k_ref), (q_prefix, q_ref[:, :, :p])):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(bb.blocks[1](hidden), block_out["x"], atol=1e-5, rtol=1e-5)
    assert merge_heads(k).shape == (1, t, bb.dim)


def test_overlapping_patches_and_registers(timm_pair):
    """Stride half the patch: a finer grid after the prefix tokens; the saliency covers patches only."""
    bb, ref = timm_pair
    size = ref.patch_embed.img_size
    g = bb.dense_descriptors(torch.randn(1, 3, *size), layer=1, facet="key", stride=bb.patch_size // 2)
    h, w = bb.grid_size(*size, stride=bb.patch_size // 2)
    assert g.grid == (h, w) and g.desc.shape == (1, h * w, bb.dim) and g.saliency.shape == (1, h * w)
    assert g.saliency.min() == 0 and g.saliency.max() == 1


def test_index_with_a_timm_model(tmp_path, photos):
    folder = save_tiny_timm(tmp_path / "timm-reg", "vit_small_patch14_reg4_dinov2")
    idx = Index(tmp_path / "db", model=str(folder), image_size=56, style_layer=1, dense_layer=1)
    assert idx.add_folder(photos).added == 12
    hit = idx.search(photos / "horse.jpg", k=3)[0]
    assert hit.path == str(photos / "horse.jpg") and hit.score == pytest.approx(1.0, abs=1e-5)
    hit = idx.search(photos / "horse.jpg", k=3, rerank="aas")[0]
    assert hit.path == str(photos / "horse.jpg") and hit.scores["aas"] == pytest.approx(1.0, abs=1e-5)
    assert idx.info()["dense"]["shape"] == [5 + 16, 32]  # CLS + 4 registers + 4 x 4 patches
