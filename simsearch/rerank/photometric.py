"""Photometric agreement: do two images' pixels agree under the transform their patches verified?

Geometric verification (rerank.verify) says that a layout of patch keys maps onto another one; keys
at 16 x 16 cells do not see what a 32-pixel thumbnail still shows. Two diagrams drawn from one
template, two card faces of one deck or two stamps of one set verify like copies, yet their pixels
differ box by box. So the query's grey thumbnail is warped onto each candidate's by the verified
similarity, refined first (`refine`: REFINE_STEPS gradient steps on the thumbnails' correlation at half
size, since the patch grid fixes a transform only to a fraction of a cell), and compared block by block:
- both thumbnails are smoothed with a 3 x 3 binomial kernel (JPEG blocking, and the transform is only
  known to a fraction of a patch);
- the query thumbnail is cut into BLOCK x BLOCK pixel blocks; a block counts when it lies wholly inside
  the candidate under the transform and its pixels are not flat (std >= MIN_STD grey levels): flat
  blocks agree with anything, and an edited copy's padding or a crop's outside say nothing;
- each block scores the zero-mean normalised correlation of its pixels with the warped candidate's
  (0 where those are flat: a block with detail over a blank area disagrees);
- agreement = the median over the counted blocks, so text stamped over part of a copy or a local colour
  change moves it little, while a different drawing on the same layout disagrees in most blocks.
Patch keys barely change when a patch is mirrored, so for a picture symmetric left to right the
verifier finds the unmirrored transform of a mirrored copy as readily as the mirrored one, and the
pixels then disagree in every detail. So each transform is also tried composed with a left-right flip
about the middle of what it overlaps (`mirror_counterpart`); the one whose unrefined blocks agree
better (by MIRROR_MARGIN) is refined and counts. On the copy-detection proxy's dedup pairs (tuning
split, every third pair at verified score >= 0.1): mirror + colour copies at agreement >= 0.7 went from
0.69 to 0.86 of their originals, false pairs (either split) from 0.037 to 0.038 of those compared;
refining both hypotheses and keeping the better gave the same 0.86 at 0.041, for twice the refinement
(README "Duplicates").
Correlation is invariant to gain and offset of the grey levels (colour edits, greyscale copies). Pure
tensor code, batched over the candidates of one query.

A region query (`region_agreement`) is a few cells of its target: a 1/16 region covers 32 x 32 pixels of
a 128-pixel thumbnail, two blocks a side, and its alignment (rerank.verify.align) knows the scale only to
a view step and the place to a cell. So the region's thumbnail is template-matched instead: scaled to its
footprint at a few scales around the alignment's, and moved over every offset within a fraction of a
cell of where the alignment puts it; the agreement is the best zero-mean normalised correlation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BLOCK = 16  # pixels of a 128-pixel thumbnail (images.THUMB_SIZE): an 8 x 8 grid on a square image
MIN_STD = 4.0  # grey levels: a block flatter than this carries no evidence
REFINE_STEPS, REFINE_LR = 30, 6e-3  # gradient steps on the transform; the first step's size (units of the longer side), decaying to 0
# A region's template: scales around the alignment's (its views are 1.33-1.5x apart), and how far from the
# aligned place it is moved (units of the candidate's longer side: 3/4 of a cell of a 16 x 16 grid).
# Fitted on the copy-detection proxy's tuning regions (README, "Region queries"); wider searches gained nothing.
REGION_SCALES = tuple(2 ** (k / 8) for k in range(-3, 4))
REGION_RADIUS = 0.75 / 16
MIRRORS = True  # photometric_agreement also tries each transform's mirror_counterpart (module docstring)
# The counterpart replaces the verifier's transform only when its unrefined agreement is higher by this
# much: a rotated copy's unrefined blocks are noisy (fitted on the dedup proxy's tuning pairs).
MIRROR_MARGIN = 0.05


def smooth(grey: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> the same smoothed by a 3 x 3 binomial kernel, edges replicated."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None]) / 16
    return F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernel[None, None])


def warp_onto(query_hw: tuple[int, int], cands: torch.Tensor, cand_hw: torch.Tensor,
              transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates' pixels under each pixel of a (h, w) query thumbnail.

    cands (M, 1, H, W) candidate thumbnails padded to one size, cand_hw (M, 2) their true (h, w);
    transform (M, 3) complex (a, b, mirrored) as rerank.verify returns it: a query point z in units of
    its image's longer side lands at a * (conj(z) if mirrored else z) + b in the candidate's units.
    -> warped (M, h, w) bilinear samples, inside (M, h, w) bool: the point lands within the candidate."""
    return _warp(query_hw, cands, cand_hw, _real(transform), transform[:, 2].real > 0.5)


def _real(transform: torch.Tensor) -> torch.Tensor:
    """(M, 3) complex -> (M, 4) real: a.re, a.im, b.re, b.im (autograd on real numbers is the cheap one)."""
    return torch.view_as_real(transform[:, :2]).flatten(1).clone()


def _warp(query_hw, cands, cand_hw, ab: torch.Tensor, mirrored: torch.Tensor):
    h, w = query_hw
    side = max(h, w)
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / side, (torch.arange(w) + 0.5) / side, indexing="ij")
    ys = torch.where(mirrored[:, None, None], -ys, ys)  # conj(z): (M, h, w)
    ar, ai, br, bi = (ab[:, i, None, None] for i in range(4))
    scale = cand_hw.max(-1).values.to(ab.dtype)[:, None, None]  # candidate pixels per unit
    tx, ty = (ar * xs - ai * ys + br) * scale, (ai * xs + ar * ys + bi) * scale  # (M, h, w) candidate pixels
    hh, ww = cands.shape[-2:]
    grid = torch.stack([tx / ww * 2 - 1, ty / hh * 2 - 1], -1)  # (M, h, w, 2), align_corners=False
    warped = F.grid_sample(cands, grid, mode="bilinear", align_corners=False)[:, 0]
    inside = (tx >= 0) & (ty >= 0) & (tx <= cand_hw[:, 1, None, None]) & (ty <= cand_hw[:, 0, None, None])
    return warped, inside


def refine(query: torch.Tensor, cands: torch.Tensor, cand_hw: torch.Tensor, transform: torch.Tensor,
           steps: int = REFINE_STEPS, lr: float | None = None) -> torch.Tensor:
    """The similarities `transform` (M, 3) complex moved to where the warped candidates (M, 1, H, W)
    correlate best with the query (h, w) over their overlap: gradient ascent (Adam) on a and b, on both
    thumbnails at half size (a quarter of the pixels; the blocks then read them at full size). The patch
    grid fixes a transform to a fraction of a cell; a thumbnail's blocks need it to a pixel or two."""
    mirrored = transform[:, 2].real > 0.5
    with torch.inference_mode(False), torch.enable_grad():  # callers score under inference mode
        q = F.avg_pool2d(query.clone()[None, None], 2)[0, 0]
        c, hw = F.avg_pool2d(cands.clone(), 2), cand_hw.clone().float() / 2
        ab = _real(transform).requires_grad_(True)
        opt = torch.optim.Adam([ab], lr=lr or REFINE_LR)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)  # settle instead of oscillating
        for _ in range(steps):
            warped, inside = _warp(tuple(q.shape), c, hw, ab, mirrored)
            w = inside.float()
            n = w.sum((-2, -1), keepdim=True).clamp_min(1.0)
            mean = lambda x: (x * w).sum((-2, -1), keepdim=True) / n  # noqa: E731  over the overlap
            dq, dc = q - mean(q), warped - mean(warped)
            corr = mean(dq * dc) / (mean(dq * dq) * mean(dc * dc)).clamp_min(1e-6).sqrt()  # (M, 1, 1)
            opt.zero_grad()
            (-corr.sum()).backward()
            opt.step()
            decay.step()
        a_b = torch.view_as_complex(ab.detach().view(-1, 2, 2))  # (M, 2): a, b
    return torch.cat([a_b.to(transform.dtype), transform[:, 2:]], 1)


def mirror_counterpart(query_hw: tuple[int, int], cand_hw: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """Each transform (M, 3) complex composed with a left-right flip of the query about the vertical line
    through the middle (x0) of the query's part that lands inside the candidate (its whole width when none
    does): z -> T(2 x0 - conj(z)), that is a' = -a, b' = b + 2 a x0, mirrored toggled. For a picture
    whose layout is symmetric about that line both transforms overlay the same outline; only one overlays
    its details.
    cand_hw (M, 2) the candidates' (h, w) pixels, as warp_onto takes them."""
    h, w = query_hw
    blank = torch.zeros(len(transform), 1, 1, 1)  # only `inside` is used: the samples of this 1 x 1 blank are dropped
    inside = _warp(query_hw, blank, cand_hw, _real(transform), transform[:, 2].real > 0.5)[1]  # (M, h, w)
    xs = (torch.arange(w) + 0.5) / max(h, w)  # query pixel centres, units of its longer side
    n = inside.sum((-2, -1))  # (M,)
    x0 = torch.where(n > 0, (inside * xs).sum((-2, -1)) / n.clamp_min(1), w / max(h, w) / 2)
    a, b, mirrored = transform.unbind(1)
    return torch.stack([-a, b + 2 * a * x0, 1 - mirrored], 1)


def photometric_agreement(query: np.ndarray, cands: list[np.ndarray], transform: torch.Tensor,
                          block: int = BLOCK, min_std: float = MIN_STD, steps: int = REFINE_STEPS,
                          mirrors: bool = MIRRORS) -> torch.Tensor:
    """Median block correlation (module docstring) of a query's grey thumbnail (h, w) uint8 with each of
    M candidates' (their own sizes) under `transform` (M, 3) complex, refined; when `mirrors`, under its
    mirror_counterpart instead where that one agrees better by MIRROR_MARGIN before refinement. -> (M,)
    in [-1, 1]; 0 where no block counts."""
    m = len(cands)
    q = smooth(torch.from_numpy(np.asarray(query, np.float32))[None, None])[0, 0]  # (h, w)
    if not m or q.shape[0] < block or q.shape[1] < block:  # nothing to compare, or a thumbnail smaller than one block
        return torch.zeros(m)
    hw = torch.tensor([c.shape for c in cands])
    pad = torch.zeros(m, 1, int(hw[:, 0].max()), int(hw[:, 1].max()))
    for i, c in enumerate(cands):  # each smoothed within its own size: the padding must not bleed in
        pad[i, :, :c.shape[0], :c.shape[1]] = smooth(torch.from_numpy(np.asarray(c, np.float32))[None, None])[0]
    if mirrors:  # both hypotheses unrefined in one batch of 2M; only the one kept is refined (half the cost of refining both)
        flipped = mirror_counterpart(tuple(q.shape), hw, transform)
        both = _block_agreement(q, pad.repeat(2, 1, 1, 1), hw.repeat(2, 1), torch.cat([transform, flipped]), block, min_std)
        transform = torch.where((both[m:] > both[:m] + MIRROR_MARGIN)[:, None], flipped, transform)
    if steps:
        transform = refine(q, pad, hw, transform, steps)
    return _block_agreement(q, pad, hw, transform, block, min_std)


def _block_agreement(q: torch.Tensor, cands: torch.Tensor, cand_hw: torch.Tensor, transform: torch.Tensor,
                     block: int = BLOCK, min_std: float = MIN_STD) -> torch.Tensor:
    """The median block correlation of a smoothed query thumbnail q (h, w), at least one block a side,
    with the smoothed candidates (M, 1, H, W) (true sizes cand_hw (M, 2)) warped under `transform`
    (M, 3) complex, as it stands. -> (M,)"""
    hb, wb = q.shape[0] // block, q.shape[1] // block
    warped, inside = warp_onto(tuple(q.shape), cands, cand_hw, transform)

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (..., h, w) -> (..., hb * wb, block * block)
        x = x[..., :hb * block, :wb * block].unflatten(-2, (hb, block)).unflatten(-1, (wb, block))
        return x.transpose(-3, -2).flatten(-4, -3).flatten(-2)

    qb, cb = blocks(q), blocks(warped)  # (K, P), (M, K, P)
    qb, cb = qb - qb.mean(-1, keepdim=True), cb - cb.mean(-1, keepdim=True)
    q_std, c_std = qb.pow(2).mean(-1).sqrt(), cb.pow(2).mean(-1).sqrt()  # (K,), (M, K)
    corr = (qb * cb).mean(-1) / (q_std * c_std).clamp_min(1e-6)  # (M, K)
    corr = torch.where(c_std < 1.0, torch.zeros_like(corr), corr)
    counts = blocks(inside.float()).amin(-1).bool() & (q_std >= min_std)  # (M, K)
    return torch.nan_to_num(torch.where(counts, corr, torch.nan).nanmedian(-1).values, nan=0.0)  # the lower middle of the counted blocks


def template_correlation(template: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Zero-mean normalised correlation of a (h, w) template at every place it fits wholly inside a
    (H, W) image -> (H - h + 1, W - w + 1); 0 where the image under it is flat (std under 1 grey level).
    In float64: the windows' variance is a difference of sums, taken from integral images (a box sum
    costs four reads, not h x w)."""
    t, x = template.double(), image.double()
    t = t - t.mean()
    (h, w), n = t.shape, t.numel()

    def box_sums(v: torch.Tensor) -> torch.Tensor:  # (H, W) -> (H - h + 1, W - w + 1) sums of v under the template
        s = F.pad(v.cumsum(0).cumsum(1), (1, 0, 1, 0))
        return s[h:, w:] - s[:-h, w:] - s[h:, :-w] + s[:-h, :-w]

    s1, s2 = box_sums(x), box_sums(x * x)
    var = (s2 - s1 * s1 / n).clamp_min(0)  # n * the window's variance
    corr = F.conv2d(x[None, None], t[None, None])[0, 0] / (var.sqrt() * t.pow(2).sum().sqrt()).clamp_min(1e-9)
    return torch.where(var < n, torch.zeros_like(corr), corr)


def region_agreement(query: np.ndarray, cands: list, transform: torch.Tensor, scales=REGION_SCALES,
                     radius: float = REGION_RADIUS, min_std: float = MIN_STD) -> torch.Tensor:
    """The best correlation of a region's grey thumbnail (h, w) uint8 with each of M candidates' (their
    own sizes; None: no thumbnail) near where `transform` (M, 3) complex (rerank.verify.alignment_transform:
    no rotation, mirrored = flipped left-right) puts it: the template scaled by |a| x each of `scales`,
    flipped when mirrored, its centre within `radius` (units of the candidate's longer side) of the
    transformed centre. -> (M,) in [-1, 1]; 0 for a flat region, a template larger than the candidate,
    a place off the candidate or no thumbnail."""
    q = smooth(torch.from_numpy(np.asarray(query, np.float32))[None, None])  # (1, 1, h, w)
    h, w = q.shape[-2:]
    side = max(h, w)
    centre = complex(w / 2, h / 2) / side  # the region's centre, in units of its longer side
    out = torch.zeros(len(cands))
    for i, (cand, (a, b, mirrored)) in enumerate(zip(cands, transform.tolist())):
        if cand is None:
            continue
        mirrored = mirrored.real > 0.5
        c = smooth(torch.from_numpy(np.asarray(cand, np.float32))[None, None])[0, 0]  # (H, W)
        big, small = max(c.shape), (q.flip(-1) if mirrored else q)
        at = (a * (centre.conjugate() if mirrored else centre) + b) * big  # the centre, candidate pixels
        cx, cy = at.real, at.imag
        reach = int(np.ceil(radius * big)) + 1  # pixels the centre may move
        for k in scales:
            th, tw = round(h * abs(a) * big / side * k), round(w * abs(a) * big / side * k)
            if min(th, tw) < 3 or th > c.shape[0] or tw > c.shape[1]:
                continue
            tpl = smooth(F.interpolate(small, size=(th, tw), mode="bilinear", antialias=True, align_corners=False))[0, 0]
            if tpl.std(correction=0) < min_std:
                continue
            x0, y0 = round(cx - tw / 2), round(cy - th / 2)  # the template's corner at the aligned place
            xa, ya = max(0, x0 - reach), max(0, y0 - reach)
            xb, yb = min(c.shape[1], x0 + tw + reach), min(c.shape[0], y0 + th + reach)
            if xb - xa >= tw and yb - ya >= th:
                out[i] = max(float(out[i]), float(template_correlation(tpl, c[ya:yb, xa:xb]).max()))
    return out
