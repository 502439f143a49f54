"""Geometric verification: does a candidate show what the query shows, in a consistent layout?

The last step of an instance-retrieval pipeline (hloc, DELG-style rerankers) on the patch tokens the
index already stores:
1. tentative matches: mutual nearest neighbours of unit-normalised patch descriptors that pass a
   similarity floor and Lowe's ratio test (the second-best match is taken outside the best one's
   3 x 3 neighbourhood, since a token's neighbours look alike), weighted by CLS-attention saliency so
   that background (white, sky) hardly votes, and with no vote at all from cells whose pixels are flat
   in the query's thumbnail (rerank.scores.without_flat: a blank canvas matches any other);
2. RANSAC over 2-point similarity transforms (scale, rotation, translation; optionally mirrored) on
   the patch centres, every candidate at once, then a least-squares refit on the inliers;
3. score = the saliency weight of the inliers.
A region query (a few cells of its target) has too few tentative matches for RANSAC: it is verified by
an exhaustive search over translations of its grid on the candidate's (`align_translation`, each view
a scale), every cell voting.
Scale-aware: the query is described on several grids ("views": a crop at half the input size meets
its original's patches at their scale) and candidates on their stored grid and its 2 x 2 pooling (for
a query that shows the candidate at half size, pasted into another picture); the best pair of views
counts.

Points are in units of their image's longer side, where a crop, resize, paste or rotation of the
original image is a similarity. Pure tensor code: every function runs on small arrays in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F



@dataclass
class PatchSet:
    """Patch descriptors of B images on one (h, w) grid."""

    desc: torch.Tensor  # (B, N, C) unit norm
    weight: torch.Tensor  # (B, N) saliency in [0, 1]
    xy: torch.Tensor  # (B, N, 2) patch centres (x, y) in units of the image's longer side
    grid: tuple[int, int]  # (h, w), N = h * w
    sizes: torch.Tensor  # (B, 2) image (width, height) in pixels
    mass: torch.Tensor | None = None  # (B,) the saliency a score is a share of; None: weight's sum

    def total(self) -> torch.Tensor:
        """(B,) the saliency mass a verification score is a share of."""
        return self.weight.sum(-1) if self.mass is None else self.mass

    @classmethod
    def on_grid(cls, desc: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int], sizes) -> "PatchSet":
        """Descriptors (B, h*w, C) of images of `sizes` (B, 2) pixels, resized whole onto `grid`."""
        sizes = torch.as_tensor(sizes, dtype=torch.float32).reshape(-1, 2)
        return cls(F.normalize(desc.float(), dim=-1), weight.float(), cell_centres(grid, sizes), grid, sizes)

    def pooled(self, factor: int = 2) -> "PatchSet":
        """The same images on a grid `factor` times coarser (descriptors averaged, then renormalised)."""
        h, w = self.grid
        b, _, c = self.desc.shape

        def pool(x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N', D)
            g = x.transpose(1, 2).reshape(b, -1, h, w)
            return F.avg_pool2d(g, factor, ceil_mode=True).flatten(2).transpose(1, 2)

        grid = (-(-h // factor), -(-w // factor))
        return PatchSet(F.normalize(pool(self.desc), dim=-1), pool(self.weight[..., None])[..., 0],
                        pool(self.xy), grid, self.sizes, self.mass)


def cell_centres(grid: tuple[int, int], sizes: torch.Tensor) -> torch.Tensor:
    """Centres of a (h, w) grid laid over images of `sizes` (B, 2) = (width, height) pixels.
    -> (B, h*w, 2) in units of each image's longer side."""
    h, w = grid
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    unit = torch.stack([xs.flatten(), ys.flatten()], -1)  # (N, 2) in [0, 1]
    sizes = sizes.float()
    return unit[None] * (sizes / sizes.max(-1, keepdim=True).values)[:, None]


@dataclass
class Tentative:
    """Tentative matches of one query's patches in M candidates (query-major: one slot per query patch)."""

    target: torch.Tensor  # (M, Nq) index of the matched candidate patch
    weight: torch.Tensor  # (M, Nq) vote of the match; 0 where it failed a test
    sim: torch.Tensor  # (M, Nq) cosine of the match


def tentative_matches(query: PatchSet, cand: PatchSet, min_sim: float = 0.3, ratio: float = 0.95) -> Tentative:
    """Mutual nearest neighbours of query (1 image) in each of cand's M images that pass the
    similarity floor and the ratio test, voting sqrt(saliency_q * saliency_c)."""
    sim = query.desc[0] @ cand.desc.transpose(1, 2)  # (M, Nq, Nc)
    best, target = sim.max(-1)  # (M, Nq)
    # also its match's best (amax, no indices: 6x faster; query cells exactly tied for a column's best all count)
    mutual = best >= sim.amax(1).gather(1, target)  # (M, Nq)
    # second best outside the 3 x 3 cells around the best (a token's neighbours look alike): mask them
    h, w = cand.grid
    step = torch.arange(-1, 2)
    around = ((target // w)[..., None, None] + step[:, None]).clamp(0, h - 1) * w + \
        ((target % w)[..., None, None] + step).clamp(0, w - 1)  # (M, Nq, 3, 3) cell indices
    second = sim.scatter_(-1, around.flatten(-2), -1.0).amax(-1)  # (M, Nq); sim is not read after this
    dist = lambda s: (2 - 2 * s).clamp_min(0).sqrt()  # noqa: E731  (unit vectors)
    ok = mutual & (best >= min_sim) & (dist(best) < ratio * dist(second))
    vote = (query.weight[0] * cand.weight.gather(1, target)).clamp_min(0).sqrt()
    return Tentative(target, vote * ok, best)


@dataclass
class Verified:
    score: torch.Tensor  # (M,) saliency weight of the inliers
    inliers: torch.Tensor  # (M, Nq) bool, over the tentative slots
    transform: torch.Tensor  # (M, 3) complex: a, b, mirrored (0/1): x' = a * (conj(x) if mirrored else x) + b


def _fit(z: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares similarity t ~ a z + b; z, t complex (..., P), w (..., P) -> a, b (...)."""
    ws = w.sum(-1).clamp_min(1e-9)
    zm, tm = (w * z).sum(-1) / ws, (w * t).sum(-1) / ws
    dz, dt = z - zm[..., None], t - tm[..., None]
    a = (w * dz.conj() * dt).sum(-1) / (w * dz.abs() ** 2).sum(-1).clamp_min(1e-12)
    return a, tm - a * zm


def ransac_similarity(src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor, tol: float,
                      hypotheses: int = 128, mirror: bool = True, scale_range: tuple[float, float] = (0.2, 5.0),
                      refits: int = 2, seed: int = 0) -> Verified:
    """Best similarity transform per row. src (M, P, 2), dst (M, P, 2) matched points, weight (M, P)
    >= 0 (0: no match). A point is an inlier within `tol` of its prediction. Rows with fewer than 3
    voting matches score 0."""
    m, p, _ = src.shape
    live = max(int((weight > 0).sum(-1).max()), 2)
    if live >= p:
        return _ransac(src, dst, weight, tol, hypotheses, mirror, scale_range, refits, seed)
    # the cost is M x H x P: score only the slots that vote (the ratio test leaves a few dozen of Nq)
    slots = weight.topk(live, dim=-1).indices  # (M, P')
    pick = lambda x: x.gather(1, slots[..., None].expand(-1, -1, 2))  # noqa: E731
    ver = _ransac(pick(src), pick(dst), weight.gather(1, slots), tol, hypotheses, mirror, scale_range, refits, seed)
    return Verified(ver.score, torch.zeros(m, p, dtype=torch.bool).scatter_(1, slots, ver.inliers), ver.transform)


def squared_residuals(a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """|a_h z_p + b_h - t_p|^2 for every hypothesis h and point p: a, b (M, H), z, t (M, P) complex -> (M, H, P).

    Expanded into a sum of nine products of a term of h and a term of p, so one batched matmul
    computes it instead of a complex (M, H, P) tensor and five passes over it."""
    ab, zt = a * b.conj(), z * t.conj()
    one_h, one_p = torch.ones_like(a.real), torch.ones_like(z.real)
    per_h = torch.stack([a.abs() ** 2, b.abs() ** 2, one_h, 2 * ab.real, -2 * ab.imag,
                         -2 * a.real, 2 * a.imag, -2 * b.real, -2 * b.imag], -1)  # (M, H, 9)
    per_p = torch.stack([z.abs() ** 2, one_p, t.abs() ** 2, z.real, z.imag,
                         zt.real, zt.imag, t.real, t.imag], -1)  # (M, P, 9)
    return torch.bmm(per_h, per_p.transpose(1, 2))


def _ransac(src, dst, weight, tol, hypotheses, mirror, scale_range, refits, seed) -> Verified:
    m, p, _ = src.shape
    z = torch.complex(src[..., 0], src[..., 1])  # (M, P)
    t = torch.complex(dst[..., 0], dst[..., 1])
    voting = weight > 0
    gen = torch.Generator().manual_seed(seed)
    pick = torch.multinomial(weight + 1e-6, 2 * hypotheses, replacement=True, generator=gen).view(m, hypotheses, 2)
    z1, z2 = z.gather(1, pick[..., 0]), z.gather(1, pick[..., 1])  # (M, H)
    t1, t2 = t.gather(1, pick[..., 0]), t.gather(1, pick[..., 1])
    flips = (False, True) if mirror else (False,)
    best_score = torch.full((m,), -1.0)
    best = torch.zeros(m, 3, dtype=torch.complex64)
    for flip in flips:
        zz, zz1, zz2 = (z.conj(), z1.conj(), z2.conj()) if flip else (z, z1, z2)
        a = (t2 - t1) / torch.where((zz2 - zz1).abs() > 1e-6, zz2 - zz1, torch.ones_like(zz1))  # (M, H)
        b = t1 - a * zz1
        plausible = (a.abs() >= scale_range[0]) & (a.abs() <= scale_range[1]) & (pick[..., 0] != pick[..., 1])
        inside = (squared_residuals(a, b, zz, t) < tol ** 2).float()  # (M, H, P)
        score = torch.bmm(inside, weight[..., None])[..., 0] * plausible  # (M, H): inliers' weight
        top, h = score.max(-1)
        better = top > best_score
        best_score = torch.where(better, top, best_score)
        chosen = torch.stack([a.gather(1, h[:, None])[:, 0], b.gather(1, h[:, None])[:, 0],
                              torch.full((m,), float(flip), dtype=torch.complex64)], -1)
        best = torch.where(better[:, None], chosen, best)
    mirrored = best[:, 2].real > 0.5
    zz = torch.where(mirrored[:, None], z.conj(), z)
    a, b = best[:, 0], best[:, 1]
    for _ in range(refits + 1):
        inl = ((a[:, None] * zz + b[:, None] - t).abs() < tol) & voting  # (M, P)
        a_fit, b_fit = _fit(zz, t, weight * inl)
        ok = (inl.sum(-1) >= 3) & (a_fit.abs() >= scale_range[0]) & (a_fit.abs() <= scale_range[1])
        a, b = torch.where(ok, a_fit, a), torch.where(ok, b_fit, b)
    inl = ((a[:, None] * zz + b[:, None] - t).abs() < tol) & voting
    score = (weight * inl).sum(-1) * (inl.sum(-1) >= 3)
    return Verified(score, inl & (score[:, None] > 0), torch.stack([a, b, mirrored.to(torch.complex64)], -1))


ALIGN_BYTES = 64 << 20  # bound on the cell similarities align_translation holds at once


@dataclass
class Alignment:
    """The best translation of a query grid over each of M candidate grids."""

    score: torch.Tensor  # (M,) mean cosine of the query's cells and the candidate cells under them (0 off the grid)
    offset: torch.Tensor  # (M, 3) long: (dy, dx) of the query's first cell on the candidate grid, mirrored (0/1)


def align_translation(query: PatchSet, cand: PatchSet, mirror: bool = True) -> Alignment:
    """Exhaustive search over every translation of the query's (hq, wq) grid on each candidate's
    (hc, wc) grid, overlapping by at least one cell: a correlation of the descriptor maps (what a
    conv2d with the query grid as its kernel computes). Where RANSAC needs a few dozen tentative
    matches, this uses every cell of the query: what a region of 4 x 4 cells has (a region at 1/16
    of its target's area).

    Computed from the cell similarities (one matmul), each query cell's map of them summed in at
    its shift (F.fold: blocks of the candidate's size laid on the query's grid, reversed): the
    channels are reduced once instead of at every offset, and the mirrored query is the same
    similarities with its columns read backwards."""
    (hq, wq), (hc, wc) = query.grid, cand.grid
    m = cand.desc.shape[0]
    best, offset = torch.full((m,), -2.0), torch.zeros(m, 3, dtype=torch.long)
    step = max(1, ALIGN_BYTES // (8 * hc * wc * hq * wq))  # candidates at once: their similarities and a flipped copy
    for start in range(0, m, step):
        part = slice(start, start + step)
        sim = (cand.desc[part] @ query.desc[0].T).view(-1, hc * wc, hq, wq)  # (M', Nc, hq, wq)
        for flip in (False, True) if mirror else (False,):
            # a block at (ly, lx) of the query grid is query cell (hq - 1 - ly, wq - 1 - lx): offset (dy, dx) lands
            # at (dy + hq - 1, dx + wq - 1); mirrored, the query's columns are reversed, which cancels the x flip
            blocks = sim.flip(-2) if flip else sim.flip(-2, -1)
            corr = F.fold(blocks.flatten(2), (hc + hq - 1, wc + wq - 1), (hc, wc))[:, 0] / (hq * wq)
            top, at = corr.flatten(1).max(-1)  # (M',): over the (hc + hq - 1, wc + wq - 1) offsets
            better = top > best[part]
            width = corr.shape[-1]
            chosen = torch.stack([at // width - (hq - 1), at % width - (wq - 1), torch.full_like(at, int(flip))], -1)
            best[part], offset[part] = torch.where(better, top, best[part]), torch.where(better[:, None], chosen, offset[part])
    return Alignment(best, offset)


def alignment_transform(query: PatchSet, cand: PatchSet, offset: torch.Tensor) -> torch.Tensor:
    """The similarity each alignment `offset` (M, 3) of the query's grid on the candidates' implies,
    in Verified.transform's form (M, 3) complex: a query point z in units of its longer side lands at
    a * (conj(z) if mirrored else z) + b in candidate i's units. A least-squares fit over every query
    cell, off the candidate's grid too (its centres extended linearly): grids squash their images to a
    square, so the exact map is a scale per axis; a similarity is what a picture's crop or paste is."""
    (hq, wq), (hc, wc) = query.grid, cand.grid
    ys, xs = torch.meshgrid(torch.arange(hq), torch.arange(wq), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (Nq,): query cells in xy's order
    dy, dx, flip = offset[:, 0, None], offset[:, 1, None], offset[:, 2, None].bool()  # (M, 1) each
    tx, ty = torch.where(flip, wq - 1 - xs, xs) + dx, ys + dy  # (M, Nq): the candidate cell under each
    sizes = cand.sizes.float()
    unit = sizes / sizes.max(-1, keepdim=True).values  # (M, 2): width, height in units of the longer side
    dst = torch.complex((tx + 0.5) / wc * unit[:, :1], (ty + 0.5) / hc * unit[:, 1:])  # (M, Nq)
    src = torch.complex(query.xy[0, :, 0], query.xy[0, :, 1])[None]  # (1, Nq)
    u = torch.where(flip, src.conj(), src)  # (M, Nq)
    du, dd = u - u.mean(-1, keepdim=True), dst - dst.mean(-1, keepdim=True)
    a = (du.conj() * dd).sum(-1) / du.abs().pow(2).sum(-1).clamp_min(1e-12)  # (M,)
    b = dst.mean(-1) - a * u.mean(-1)
    return torch.stack([a, b, flip[:, 0].to(a.dtype)], -1)


def aligned_cells(query: PatchSet, cand: PatchSet, i: int, offset, min_sim: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Query cells and the cells of candidate i under them at `offset` (dy, dx, mirrored) whose cosine
    reaches min_sim -> (P,) query cell and (P,) candidate cell indices, most similar first."""
    (hq, wq), (hc, wc) = query.grid, cand.grid
    dy, dx, flip = (int(v) for v in offset)
    ys, xs = torch.meshgrid(torch.arange(hq), torch.arange(wq), indexing="ij")
    ty, tx = ys + dy, (wq - 1 - xs if flip else xs) + dx  # a mirrored kernel reads the query's columns reversed
    on = (ty >= 0) & (ty < hc) & (tx >= 0) & (tx < wc)
    q_cells, c_cells = (ys * wq + xs)[on], (ty * wc + tx)[on]
    sim = (query.desc[0, q_cells] * cand.desc[i, c_cells]).sum(-1)
    keep = (sim >= min_sim).nonzero()[:, 0]
    keep = keep[sim[keep].argsort(descending=True)]
    return q_cells[keep], c_cells[keep]


@dataclass
class Verification:
    """The verdict on M candidates against one query."""

    score: torch.Tensor  # (M,) share of the query's saliency mass that the inliers cover, in [0, 1]
    inliers: torch.Tensor  # (M,) number of inlier correspondences
    pairs: list  # per candidate: (P, 4) float32 numpy, query (x, y) and candidate (x, y) in pixels, best first
    # (M, 3) complex, the best view pair's similarity (Verified.transform); an alignment's: alignment_transform
    transform: torch.Tensor | None = None


class GeometricVerifier:
    """Tentative matches + RANSAC over every (query view, candidate view) pair; the best pair counts.

    Configuration is data (`default_conf`); tol is in cells of the candidate view's grid."""

    default_conf = dict(
        min_sim=0.3,  # cosine floor of a tentative match
        ratio=0.95,  # Lowe's ratio on distances, second best outside the best's 3 x 3 cells
        tol_cells=1.5,  # inlier radius, in cells of the candidate's grid
        hypotheses=128,  # 2-point samples per candidate (and per mirror state)
        mirror=True,  # also fit mirrored similarities (a flipped copy is a copy)
        pool_candidates=True,  # also verify against the candidates' 2 x 2 pooled grid (pastes)
        max_pairs=64,  # correspondences returned per candidate
        seed=0,
    )

    def __init__(self, **conf):
        unknown = set(conf) - set(self.default_conf)
        if unknown:
            raise ValueError(f"unknown verifier options: {', '.join(sorted(unknown))}")
        self.conf = {**self.default_conf, **conf}

    def __call__(self, query_views: list[PatchSet], cand: PatchSet) -> Verification:
        c = self.conf
        m = cand.desc.shape[0]
        cand_views = [cand, cand.pooled(2)] if c["pool_candidates"] and min(cand.grid) >= 4 else [cand]
        best = torch.full((m,), -1.0)
        count = torch.zeros(m, dtype=torch.long)
        pairs = torch.zeros(m, c["max_pairs"], 4)  # (M, K, 4) the best view pair's inliers, most voting first
        shown = torch.zeros(m, dtype=torch.long)  # (M,) how many of them are real
        transform = torch.zeros(m, 3, dtype=torch.complex64)
        for qv in query_views:
            mass = qv.total()[0].clamp_min(1e-9)
            for cv in cand_views:
                tent = tentative_matches(qv, cv, c["min_sim"], c["ratio"])
                src = qv.xy.expand(m, -1, -1)  # (M, Nq, 2)
                dst = cv.xy.gather(1, tent.target[..., None].expand(-1, -1, 2))  # (M, Nq, 2)
                ver = ransac_similarity(src, dst, tent.weight, c["tol_cells"] / max(cv.grid), c["hypotheses"],
                                        c["mirror"], seed=c["seed"])
                score = ver.score / mass
                better = score > best  # (M,)
                n = ver.inliers.sum(-1)  # (M,)
                k = min(c["max_pairs"], ver.inliers.shape[1])
                slots = torch.where(ver.inliers, tent.weight, -1.0).topk(k, dim=-1).indices  # (M, K')
                at = lambda xy: xy.gather(1, slots[..., None].expand(-1, -1, 2))  # noqa: E731  (M, K', 2)
                found = torch.cat([at(src) * qv.sizes[0].max(), at(dst) * cv.sizes.max(-1).values[:, None, None]], -1)
                best, count = torch.where(better, score, best), torch.where(better, n, count)
                pairs[:, :k] = torch.where(better[:, None, None], found, pairs[:, :k])
                shown = torch.where(better, n.clamp_max(k), shown)
                transform = torch.where(better[:, None], ver.transform, transform)
        pairs_np = pairs.numpy()
        return Verification(best.clamp_min(0), count, [pairs_np[i, :s] for i, s in enumerate(shown.tolist())], transform)

    def align(self, query_views: list[PatchSet], cand: PatchSet) -> Verification:
        """A region's verification: the best translation of any query view over each candidate's
        stored grid (align_translation; the views give the scale). score: the aligned cells' mean
        cosine; inliers: the aligned cells at min_sim or more, returned as the correspondences;
        transform: the similarity the alignment implies (alignment_transform)."""
        c = self.conf
        m = cand.desc.shape[0]
        best, offsets, view = torch.full((m,), -2.0), torch.zeros(m, 3, dtype=torch.long), [0] * m
        for v, qv in enumerate(query_views):
            al = align_translation(qv, cand, c["mirror"])
            for i in (al.score > best).nonzero()[:, 0].tolist():
                best[i], offsets[i], view[i] = al.score[i], al.offset[i], v
        count, pairs = torch.zeros(m, dtype=torch.long), []
        transform = torch.zeros(m, 3, dtype=torch.complex64)
        for v in set(view):
            chosen = torch.tensor([i for i in range(m) if view[i] == v])
            sub = PatchSet(cand.desc[chosen], cand.weight[chosen], cand.xy[chosen], cand.grid, cand.sizes[chosen])
            transform[chosen] = alignment_transform(query_views[v], sub, offsets[chosen])
        for i in range(m):
            qv = query_views[view[i]]
            q_cells, c_cells = aligned_cells(qv, cand, i, offsets[i], c["min_sim"])
            count[i] = len(q_cells)
            q_cells, c_cells = q_cells[: c["max_pairs"]], c_cells[: c["max_pairs"]]
            pairs.append(torch.cat([qv.xy[0, q_cells] * qv.sizes[0].max(), cand.xy[i, c_cells] * cand.sizes[i].max()],
                                   -1).numpy().astype("float32"))
        return Verification(best.clamp_min(0), count, pairs, transform)
