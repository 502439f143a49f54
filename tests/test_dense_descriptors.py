"""Dense descriptors as pure tensor functions (log-binning, saliency, attention, facets) and the ViT
feature extractor on tiny random DINOv2 and DINO v1 (transformers ViTModel) checkpoints."""

from __future__ import annotations


import pytest
import torch

from conftest import save_tiny_vit
from simsearch.descriptors.facets import attention_probs, cls_attention, facet, merge_heads
from simsearch.descriptors.logbin import BINS, log_bin, log_bin_tokens
from simsearch.descriptors.saliency import cls_saliency


# -- log-binning --------------------------------------------------------------------------------
def log_bin_reference(x: torch.Tensor, hierarchy: int = 2) -> torch.Tensor:
    """The explicit per-cell loop of Amir et al.'s `_log_bin` (DESIGN.md): for each cell and level k,
    the 3^k x 3^k average pool (no padding counted) read at offsets {-3^k, 0, 3^k}^2 (centre only at
    level 0), indices clamped to the grid (border replicated)."""
    b, c, h, w = x.shape
    pools = []
    for k in range(hierarchy):
        s = 3**k
        pool = torch.zeros_like(x)
        for i in range(h):
            for j in range(w):
                rows = slice(max(0, i - s // 2), min(h, i + s // 2 + 1))
                cols = slice(max(0, j - s // 2), min(w, j + s // 2 + 1))
                pool[:, :, i, j] = x[:, :, rows, cols].mean(dim=(-2, -1))
        pools.append(pool)
    bins = 1 + 8 * hierarchy
    out = torch.zeros(b, c * bins, h, w)
    for y in range(h):
        for xx in range(w):
            part = 0
            for k in range(hierarchy):
                s = 3**k
                for i in range(y - s, y + s + 1, s):
                    for j in range(xx - s, xx + s + 1, s):
                        if i == y and j == xx and k != 0:
                            continue
                        ii, jj = min(max(i, 0), h - 1), min(max(j, 0), w - 1)
                        out[:, part * c:(part + 1) * c, y, xx] = pools[k][:, :, ii, jj]
                        part += 1
    return out


def test_log_bin_has_17_bins_per_channel():
    x = torch.randn(2, 5, 6, 7)
    y = log_bin(x)
    assert BINS == 17
    assert y.shape == (2, 17 * 5, 6, 7)


def test_log_bin_border_cell_hand_computed():
    # 4x4 grid holding 0..15 row-major, one channel.
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    y = log_bin(x)[0, :, 0, 0]  # the top-left corner cell
    # Level 0, offset (-1,-1) leaves the grid: replicated from cell (0,0) itself.
    assert y[0].item() == 0.0
    # Level 0, offset (+1,+1) is cell (1,1) = 5; the centre bin (index 4) is the cell itself.
    assert y[8].item() == 5.0 and y[4].item() == 0.0
    # Level 1 bins are indices 9..16 in order (-3,-3) (-3,0) (-3,3) (0,-3) (0,3) (3,-3) (3,0) (3,3).
    # (-3,-3) clamps to (0,0): 3x3 mean of the in-grid part {0,1,4,5} = 2.5.
    assert y[9].item() == pytest.approx(2.5)
    # (0,+3) is cell (0,3): mean of {2,3,6,7} = 4.5.
    assert y[13].item() == pytest.approx(4.5)
    # (+3,+3) is cell (3,3): mean of {10,11,14,15} = 12.5.
    assert y[16].item() == pytest.approx(12.5)
    # (+3,0) is cell (3,0): mean of {8,9,12,13} = 10.5.
    assert y[15].item() == pytest.approx(10.5)


def test_log_bin_equals_the_explicit_loop_everywhere():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 9)
    ref = log_bin_reference(x)
    got = log_bin(x)
    interior = (4, 4)  # far enough from every border that nothing is clamped at level 1
    torch.testing.assert_close(got[..., interior[0], interior[1]], ref[..., interior[0], interior[1]])
    torch.testing.assert_close(got, ref)  # and every border cell too


def test_log_bin_tokens_layout():
    torch.manual_seed(1)
    x = torch.randn(1, 3, 5, 6)
    tokens = x.flatten(2).transpose(1, 2)  # (1, 30, 3) row-major
    got = log_bin_tokens(tokens, (5, 6))
    assert got.shape == (1, 30, 17 * 3)
    torch.testing.assert_close(got, log_bin(x).flatten(2).transpose(1, 2))


# -- saliency and attention ----------------------------------------------------------------------
def test_cls_attention_is_the_first_row_of_attention():
    """The CLS row from merged keys, against softmax(q k^T / sqrt(d)) written out per head."""
    torch.manual_seed(0)
    b, h, t, d = 2, 3, 5, 4
    q, k = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    want = torch.stack([torch.stack([torch.softmax(k[i, j] @ q[i, j, 0] / d ** 0.5, 0) for j in range(h)])
                        for i in range(b)])  # (B, H, T)
    torch.testing.assert_close(cls_attention(q[:, :, 0], merge_heads(k)), want)
    torch.testing.assert_close(attention_probs(q, k)[:, :, 0], want)


def test_cls_saliency_is_min_max_normalised():
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(3, 4, 10, 10), dim=-1)
    s = cls_saliency(attn)
    assert s.shape == (3, 9)
    torch.testing.assert_close(s.min(-1).values, torch.zeros(3))
    torch.testing.assert_close(s.max(-1).values, torch.ones(3))
    mean = attn[:, :, 0, 1:].mean(1)
    expected = (mean - mean.min(-1, keepdim=True).values) / (mean.max(-1, keepdim=True).values - mean.min(-1, keepdim=True).values)
    torch.testing.assert_close(s, expected)


def test_cls_saliency_head_selection():
    attn = torch.zeros(1, 3, 5, 5)
    attn[0, 0, 0, 1:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # head 0 looks at patch 0
    attn[0, 1, 0, 1:] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # head 1 at patch 3
    attn[0, 2, 0, 1:] = torch.tensor([0.0, 0.5, 0.5, 0.0])  # head 2 at patches 1, 2
    assert cls_saliency(attn, heads=[1])[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert cls_saliency(attn, heads=[0])[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(cls_saliency(attn, heads=[0, 1])[0], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    # All heads: patch means (1, .5, .5, 1)/3 -> min-max (1, 0, 0, 1).
    torch.testing.assert_close(cls_saliency(attn)[0], torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_cls_saliency_constant_map_does_not_divide_by_zero():
    attn = torch.full((1, 2, 4, 4), 0.25)
    s = cls_saliency(attn)
    assert torch.isfinite(s).all() and (s == 0).all()


def test_attention_probs_rows_sum_to_one():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8)
    p = attention_probs(q, k)
    assert p.shape == (2, 3, 7, 11)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 7))
    torch.testing.assert_close(p, torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1))


def test_merge_heads():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # (B, H, T, d)
    m = merge_heads(x)
    assert m.shape == (2, 4, 15)
    torch.testing.assert_close(m[1, 2, 5:10], x[1, 1, 2])


# -- ViT backbones ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vits")
    return {"dinov2": save_tiny_vit(root / "dinov2", layers=2, patch_size=8, image_size=32, mlp_ratio=2),
            "dino": save_tiny_vit(root / "vit", family="dino", layers=2, patch_size=8, image_size=32, mlp_ratio=2)}


@pytest.fixture(scope="module", params=["dinov2", "dino"])
def tiny_backbone(request, tiny_dirs):
    from simsearch.backbones import load_backbone

    return load_backbone(str(tiny_dirs[request.param]), "cpu")


def test_load_backbone_picks_the_family_from_config(tiny_dirs):
    from simsearch.backbones import family_of, load_backbone

    assert family_of(str(tiny_dirs["dinov2"]))[0].name == family_of(str(tiny_dirs["dino"]))[0].name == "hf-vit"
    assert load_backbone(str(tiny_dirs["dinov2"]), "cpu").kind.model_class == "Dinov2Model"
    assert load_backbone(str(tiny_dirs["dino"]), "cpu").kind.model_class == "ViTModel"


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_backbone_at_patch_stride_equals_the_model(tiny_backbone, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    kwargs = {} if size == (32, 32) else {"interpolate_pos_encoding": True}
    if tiny_backbone.kind.model_class == "Dinov2Model":
        kwargs = {}  # DINOv2 always interpolates
    with torch.inference_mode():
        ref = tiny_backbone.model(pixel_values=x, **kwargs).last_hidden_state
        out = tiny_backbone(x)
    p = tiny_backbone.patch_size
    assert out.grid == (size[0] // p, size[1] // p)
    torch.testing.assert_close(out.tokens, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (40, 48), (45, 37)])
def test_overlapping_patches_grid(tiny_backbone, size):
    p = tiny_backbone.patch_size
    s = p // 2
    x = torch.randn(1, 3, *size)
    out = tiny_backbone(x, stride=s)
    expected = (1 + (size[0] - p) // s, 1 + (size[1] - p) // s)
    assert out.grid == expected == tiny_backbone.grid_size(*size, stride=s)
    assert out.tokens.shape == (1, 1 + expected[0] * expected[1], tiny_backbone.dim)
    assert torch.isfinite(out.tokens).all()


def test_stride_must_divide_the_patch(tiny_backbone):
    from simsearch.errors import SimsearchError

    with pytest.raises(SimsearchError, match="divide"):
        tiny_backbone(torch.randn(1, 3, 32, 32), stride=3)


def test_facets_match_the_models_own_computation(tiny_backbone):
    """token = the block's output (the next hidden state); query/key/value = the projections the
    model itself computes (captured with hooks); attn = the model's eager attention probabilities."""
    bb = tiny_backbone
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    captured: dict[str, torch.Tensor] = {}
    attn_mod = bb.blocks[1].attention
    hooks = [getattr(attn_mod, f"{n}_proj").register_forward_hook(
        lambda _m, _i, o, n=n: captured.__setitem__(n, o.detach().clone())) for n in "qkv"]
    bb.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            ref = bb.model(pixel_values=x, output_hidden_states=True, output_attentions=True)
            out = bb(x, keep={0, 1, 2})
            for layer in (0, 1):
                torch.testing.assert_close(facet(bb, layer, out.hidden[layer], "token"), ref.hidden_states[layer + 1])
            for name, short in (("query", "q"), ("key", "k"), ("value", "v")):
                got = facet(bb, 1, out.hidden[1], name)
                assert got.shape == (1, 17, bb.dim)  # heads concatenated
                torch.testing.assert_close(got, captured[short])
            k, q_cls = bb.attention_keys(1, out.hidden[1])  # verification's keys and CLS query alone
            assert k.shape == (1, bb.num_heads, 17, bb.dim // bb.num_heads) and q_cls.shape[2] == 1
            torch.testing.assert_close(merge_heads(k), captured["k"])
            torch.testing.assert_close(merge_heads(q_cls), captured["q"][:, :1])
            attn = facet(bb, 1, out.hidden[1], "attn")
            assert attn.shape == (1, bb.num_heads, 17, 17)
            torch.testing.assert_close(attn, ref.attentions[1])
    finally:
        for h in hooks:
            h.remove()
        bb.model.set_attn_implementation("sdpa")


def test_unknown_facet_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match="unknown facet"):
        facet(tiny_backbone, 0, torch.randn(1, 5, tiny_backbone.dim), "keys")


def test_facet_outside_inference_mode(tiny_backbone):
    """facet() is documented as a plain function; it should accept the hidden states that
    ViTBackbone.forward returns without the caller having to enter inference mode."""
    out = tiny_backbone(torch.randn(1, 3, 32, 32), keep={1})
    k = facet(tiny_backbone, 1, out.hidden[1], "key")
    assert k.shape == (1, 17, tiny_backbone.dim)


def test_log_binned_facet_on_a_real_grid(tiny_backbone):
    with torch.inference_mode():
        out = tiny_backbone(torch.randn(1, 3, 40, 48), keep={1}, stride=4)
        k = facet(tiny_backbone, 1, out.hidden[1], "key")[:, 1:]
        lb = log_bin_tokens(k, out.grid)
    assert lb.shape == (1, out.grid[0] * out.grid[1], 17 * tiny_backbone.dim)
    c, (h, w) = tiny_backbone.dim, out.grid
    cells = k[0].reshape(h, w, c)
    bins = lb[0].reshape(h, w, 17, c)
    # Level 0, bin (dy, dx) = (+1, +1) (index 8) of cell (2, 3) is cell (3, 4); the centre bin (4) is the cell.
    torch.testing.assert_close(bins[2, 3, 8], cells[3, 4])
    torch.testing.assert_close(bins[..., 4, :], cells)
    # Level 1, bin (+3, +3) (index 16) of cell (2, 3) is the 3x3 mean around cell (5, 6).
    torch.testing.assert_close(bins[2, 3, 16], cells[4:7, 5:8].mean((0, 1)))
    # ... and at the border the pooled cells are replicated: (-3, -3) (index 9) of cell (0, 0) is the
    # 2x2 mean of the corner (count_include_pad=False pooling at cell (0, 0), then replicated).
    torch.testing.assert_close(bins[0, 0, 9], cells[0:2, 0:2].mean((0, 1)))
