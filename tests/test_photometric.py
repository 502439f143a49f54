"""rerank.photometric: the thumbnails' block agreement under a verified similarity, and its refinement."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import EXAMPLES
from simsearch.dedup import content_tiers
from simsearch.images import grey_thumbnail
from simsearch.rerank.photometric import BLOCK, MIN_STD, photometric_agreement, region_agreement, template_correlation


def _smooth(x: np.ndarray) -> np.ndarray:
    """[1 2 1] / 4 along each axis, edges repeated: written out, not through torch."""
    p = np.pad(x.astype(np.float64), 1, mode="edge")
    rows = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


def _block_median(q: np.ndarray, c: np.ndarray) -> float:
    """Median over the BLOCK x BLOCK blocks of q that are not flat of their correlation with c's."""
    vals = []
    for y in range(0, q.shape[0] - BLOCK + 1, BLOCK):
        for x in range(0, q.shape[1] - BLOCK + 1, BLOCK):
            a, b = q[y:y + BLOCK, x:x + BLOCK].ravel(), c[y:y + BLOCK, x:x + BLOCK].ravel()
            if a.std() < MIN_STD:
                continue
            vals.append(0.0 if b.std() < 1 else np.corrcoef(a, b)[0, 1])
    vals = np.sort(vals)
    return float(vals[(len(vals) - 1) // 2])  # the lower middle, as torch.median


def _photo(name: str) -> Image.Image:
    return Image.open(EXAMPLES / name).convert("RGB")


def test_a_translated_copy_scores_what_the_blocks_correlate_to():
    """A query placed at an integer offset inside a larger canvas: under the exact transform each query
    pixel lands on a candidate pixel centre, so the warped candidate is a slice of the smoothed canvas."""
    rng = np.random.default_rng(0)
    query = (rng.random((64, 96)) * 255).astype(np.uint8)
    canvas = rng.integers(0, 255, (100, 128)).astype(np.uint8)
    canvas[20:84, 16:112] = query
    canvas[40:60, 30:60] = 128  # part of the copy painted over: those blocks disagree
    # z (units of the query's 96 px) -> (16 + 96 z, 20 + ...) pixels of the candidate, units of its 128 px
    transform = torch.tensor([[96 / 128, (16 + 20j) / 128, 0]], dtype=torch.complex64)
    got = photometric_agreement(query, [canvas], transform, steps=0)
    expected = _block_median(_smooth(query), _smooth(canvas)[20:84, 16:112])
    assert got.item() == pytest.approx(expected, abs=1e-4)
    assert 0.5 < expected < 1.0  # the painted blocks pull the median down, not to zero


def test_refinement_brings_a_rough_transform_onto_the_copy():
    """A mirrored crop of a photo against the photo, from the transform the patch grid gave (8 % off in
    scale, 5 % of the image in place): the refined agreement is that of the true transform; an unrelated
    photo under the same transform stays low."""
    img = _photo("chelsea.jpg")
    w, h = img.size
    crop = ImageOps.mirror(img.crop((w // 8, h // 8, w - w // 8, h - h // 8)))
    q, c, other = grey_thumbnail(crop), grey_thumbnail(img), grey_thumbnail(_photo("coffee.jpg"))
    a = -max(crop.size) / w  # mirrored: x' = a conj(z) + b, units of each longer side
    true = torch.tensor([[a, (w - w // 8) / w + 1j * (h // 8) / w, 1]], dtype=torch.complex64)
    rough = torch.tensor([[-0.8285 + 0.0498j, 0.9003 + 0.0097j, 1]], dtype=torch.complex64)  # the verifier's, measured
    exact = photometric_agreement(q, [c], true, steps=0).item()
    assert exact > 0.95
    assert photometric_agreement(q, [c], rough, steps=0).item() < 0.5
    refined = photometric_agreement(q, [c, other], rough.expand(2, -1))
    assert refined[0].item() > 0.9 and refined[1].item() < 0.3


def test_flat_or_tiny_thumbnails_agree_with_nothing():
    flat = np.full((64, 64), 200, np.uint8)
    transform = torch.tensor([[1, 0, 0]], dtype=torch.complex64)
    assert photometric_agreement(flat, [flat], transform).item() == 0.0
    tiny = np.arange(100, dtype=np.uint8).reshape(10, 10)
    assert photometric_agreement(tiny, [tiny], transform).item() == 0.0
    assert photometric_agreement(flat, [], transform[:0]).shape == (0,)


def test_content_tiers_follow_the_transforms_not_the_pixels():
    """1 -> 2 at the same scale (a rotated copy on a larger canvas), 1 -> 3 at half size, 3 -> 4 at 1.1x
    of 3 (within the tolerance of 3, so one tier); 5 -> 6 a separate set."""
    a, b = np.array([1, 1, 3, 5]), np.array([2, 3, 4, 6])
    scale = np.array([1.0, 0.5, 1.1, np.nan])
    tiers = content_tiers(a, b, scale, fallback=np.array([1.0, 1.0, 1.0, 2.0]))
    assert tiers == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 0}


def test_template_correlation_is_the_correlation_at_each_place():
    """Against np.corrcoef of the template with the window under it, place by place; a flat window
    correlates with nothing (0)."""
    rng = np.random.default_rng(1)
    image = rng.normal(100, 30, (14, 17))
    image[:6, :7] = 50.0  # a flat patch, as large as the template
    template = rng.normal(0, 1, (6, 7))
    got = template_correlation(torch.tensor(template), torch.tensor(image)).numpy()
    assert got.shape == (9, 11)
    for y in range(9):
        for x in range(11):
            window = image[y:y + 6, x:x + 7]
            want = 0.0 if window.std() < 1 else np.corrcoef(template.ravel(), window.ravel())[0, 1]
            assert got[y, x] == pytest.approx(want, abs=1e-9)
    assert got[0, 0] == 0.0


def test_a_region_is_found_near_where_its_alignment_puts_it():
    """A 1/16 region of a photo (plain and mirrored) against the photo's thumbnail, under the transform
    an alignment gives (10 % off in scale, 3 % of the image off in place): its agreement is that of the
    true place; an unrelated photo and a place far from the region agree less; a flat region, a missing
    thumbnail or a template larger than the candidate agree with nothing."""
    img = _photo("chelsea.jpg")
    w, h = img.size
    x0, y0, side = 140, 40, max(w, h) // 4  # around the cat's head, a quarter of the side
    crop = img.crop((x0, y0, x0 + side, y0 + side * h // w))
    c, other = grey_thumbnail(img), grey_thumbnail(_photo("coffee.jpg"))
    a, b = 1.1 * max(crop.size) / w, (x0 + 1j * y0) / w + (0.03 - 0.02j)  # z (units of the crop) -> units of the photo
    plain = torch.tensor([[a, b, 0]], dtype=torch.complex64)
    exact = template_correlation(torch.tensor(_smooth(np.asarray(
        Image.fromarray(grey_thumbnail(crop)).resize((32, 21), Image.Resampling.BILINEAR)))), torch.tensor(_smooth(c)))
    got = region_agreement(grey_thumbnail(crop), [c, other, None], plain.expand(3, -1))
    assert got[0].item() > 0.9 and got[0].item() >= exact.max().item() - 0.05
    assert got[1].item() < got[0].item() - 0.2 and got[2].item() == 0.0
    mirrored = torch.tensor([[-a, b + a * crop.width / max(crop.size), 1]], dtype=torch.complex64)  # x -> width - x first
    assert region_agreement(grey_thumbnail(ImageOps.mirror(crop)), [c], mirrored).item() > 0.9
    far = torch.tensor([[a, b + 0.3, 0]], dtype=torch.complex64)
    assert region_agreement(grey_thumbnail(crop), [c], far).item() < got[0].item() - 0.2
    flat = np.full((40, 40), 90, np.uint8)
    assert region_agreement(flat, [c], plain).item() == 0.0
    assert region_agreement(grey_thumbnail(crop), [c], torch.tensor([[8.0, 0, 0]], dtype=torch.complex64)).item() == 0.0


def test_the_mirror_counterpart_flips_about_the_middle_of_the_overlap():
    """T'(z) = T(2 x0 - conj(z)), x0 the mean x of the query pixels that T puts inside the candidate,
    computed here pixel by pixel in numpy, for an unmirrored and a mirrored T."""
    from simsearch.rerank.photometric import mirror_counterpart

    h, w, side = 30, 40, 40
    cand_hw = torch.tensor([[50, 60], [50, 60]])
    transform = torch.tensor([[0.9 + 0.1j, 0.4 + 0.05j, 0], [0.7 - 0.2j, 0.3 + 0.5j, 1]], dtype=torch.complex64)
    got = mirror_counterpart((h, w), cand_hw, transform)
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / side, (np.arange(w) + 0.5) / side, indexing="ij")
    z = xs + 1j * ys
    for row, (a, b, mirrored) in zip(got.numpy(), transform.numpy()):
        mirrored = mirrored.real > 0.5
        t = (a * (np.conj(z) if mirrored else z) + b) * 60  # candidate pixels (its longer side: 60)
        inside = (t.real >= 0) & (t.imag >= 0) & (t.real <= 60) & (t.imag <= 50)
        assert 0 < inside.sum() < inside.size  # the overlap is a part of the query
        x0 = xs[inside].mean()
        flipped = 2 * x0 - np.conj(z)
        expected = a * (np.conj(flipped) if mirrored else flipped) + b
        a2, b2, m2 = row
        assert (m2.real > 0.5) != mirrored
        np.testing.assert_allclose(a2 * (np.conj(z) if m2.real > 0.5 else z) + b2, expected, atol=1e-5)


def test_the_counterpart_must_agree_better_by_the_margin(monkeypatch):
    """Unrefined, the mirrored chelsea agrees < 0.5 under the identity and > 0.95 under its counterpart:
    a margin below that gap picks the counterpart, one above it keeps the verifier's transform."""
    from simsearch.rerank import photometric
    img = _photo("chelsea.jpg")
    q, c = grey_thumbnail(ImageOps.mirror(img)), grey_thumbnail(img)
    identity = torch.tensor([[1, 0, 0]], dtype=torch.complex64)
    plain = photometric_agreement(q, [c], identity, mirrors=False).item()  # refined from the identity
    monkeypatch.setattr(photometric, "MIRROR_MARGIN", 0.9)
    assert photometric_agreement(q, [c], identity).item() == pytest.approx(plain, abs=1e-4)
    monkeypatch.setattr(photometric, "MIRROR_MARGIN", 0.4)
    assert photometric_agreement(q, [c], identity).item() > 0.9 > plain


def test_a_mirrored_copy_agrees_under_an_unmirrored_transform_through_its_counterpart():
    """What the verifier returns for a left-right symmetric picture's mirrored copy: the identity. The
    pixels disagree under it, and agree under its counterpart (the exact mirror here, so no
    refinement); an unrelated photo agrees under neither."""
    img = _photo("chelsea.jpg")
    q, c, other = grey_thumbnail(ImageOps.mirror(img)), grey_thumbnail(img), grey_thumbnail(_photo("coffee.jpg").resize(img.size))
    identity = torch.tensor([[1, 0, 0], [1, 0, 0]], dtype=torch.complex64)
    plain = photometric_agreement(q, [c, other], identity, steps=0, mirrors=False)
    both = photometric_agreement(q, [c, other], identity, steps=0)
    assert plain[0].item() < 0.5
    assert both[0].item() > 0.95 and both[1].item() < 0.3
    exact = torch.tensor([[-1, q.shape[1] / max(q.shape), 1]], dtype=torch.complex64)  # x' = w - x: the mirror written out
    assert both[0].item() == pytest.approx(photometric_agreement(q, [c], exact, steps=0, mirrors=False).item(), abs=1e-4)
    # refined, only the hypothesis picked before refinement is refined: the counterpart for the copy under
    # the identity; the given transform where it is already right (the copy under the exact mirror) or
    # where the counterpart agrees no better (the unrelated photo)
    refined = photometric_agreement(q, [c, other, c], torch.cat([identity, exact]))
    alone = photometric_agreement(q, [c], exact, mirrors=False).item()
    assert refined[0].item() == pytest.approx(alone, abs=1e-4) and refined[2].item() == pytest.approx(alone, abs=1e-4)
    assert refined[1].item() == pytest.approx(photometric_agreement(q, [other], identity[:1], mirrors=False).item(), abs=1e-4)
