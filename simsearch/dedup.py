"""Duplicate groups of an index: exact copies by content hash, near copies verified geometrically.

    from simsearch import Index
    from simsearch.dedup import find_duplicates
    result = find_duplicates(Index("photos.db"), under="/photos/2019")
    for group in result.groups: ...

Steps (hloc's shape: retrieval, then matching and verification, then grouping):
1. exact: rows sharing a content id (blake2b of the file's bytes) are one *content*; its copies are
   exact duplicates, found without a model;
2. candidates: each content's stored content vector queries the FAISS index in batches for its k
   nearest rows, pairs at cosine >= min_cosine, and its style vector the style index for its STYLE_K
   nearest, pairs at style cosine >= MIN_STYLE (`candidates`). Never an N x N matrix: at most
   k + STYLE_K pairs per row, cost ~ 2n FAISS queries;
3. verification: `verify_pairs` runs the reranker's geometric check (rerank.verify, on the patch
   sets of rerank.scores) on the stored dense tensors, the image of fewer pixels as the query: the
   pair's score is the share of its salient patches that maps onto the other (a crop, or a small copy,
   is covered by its original; the reverse share is at most the crop's part). Then its stored grey
   thumbnail is warped onto the other's by the verified similarity and compared block by block
   (rerank.photometric): diagrams from one template or cards of one deck verify like copies, but
   their pixels disagree. A pair is a copy at score >= threshold and agreement >= min_agreement.
   Pairs are taken anchor by anchor, in chunks whose dense tensors are read once per chunk
   (CHUNK_ROWS bounds the memory);
4. groups around representatives, never chains. The KEEP RULE orders images: the larger resolution
   of what they show, then the more verified copies, then a lossless format (PNG, TIFF, BMP, lossless
   WebP) before a lossy one, then the larger file, then the oldest (mtime), then the path. Resolution
   is read from the verified transforms (content_tiers): a copy at half size shows the content at half
   the linear resolution, a rotated copy on a larger canvas, or a copy with a border, at the same one,
   however many pixels it has; within RESOLUTION_TOLERANCE it is a tie. The count of verified copies
   comes before the file's format and size because an edited copy (text stamped over it, colours
   changed) is often the larger file, or a PNG, yet verifies against fewer of the others than the
   original does: kept first, it split the others into a second group (held-out proxy, group recall
   0.40 with the edited copy kept in most groups, 0.63 with this order; benchmarks/dedup.py). Walking
   images in that order, each image not yet in a group becomes a representative and takes every image
   not yet grouped whose pair with IT is a copy. A~B and B~C with A and C unmatched: when A comes first,
   A takes B and C stays alone (single linkage would join A and C through B); when B comes first, A and C
   are each a copy of the one kept.

Stored pair scores (`PairCache`, ROOT/dedup/): every verified pair with the table version it
reflects, so another threshold re-groups without a model, and a later run verifies only the pairs
of rows changed since (store.changed_since). They are saved in parts as the run goes: a stopped run
resumes at the part it was in. Nothing here deletes, moves or writes an image file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import ConfigMismatchError, EmptyIndexError, SimsearchError
from .paths import database_exists, normalize

# Candidate floor, neighbours per image, the verified-score threshold and the thumbnails' agreement: fitted on the tuning split
# of the copy-detection proxy (benchmarks/dedup.py, README "Duplicates").
DEFAULT_CONF = dict(k=30, min_cosine=0.8, threshold=0.1, min_agreement=0.7)
# Style neighbours per image and their style-cosine floor (candidates besides the content ones, `candidates`),
# fitted on the same tuning split.
STYLE_K, MIN_STYLE = 10, 0.7
AGREEMENT_FROM = 0.1  # verified score from which a pair's thumbnails are compared (below: agreement 0)
RESOLUTION_TOLERANCE = 1.15  # content shown within 15 % of the same linear scale counts as the same resolution
QUERY_BATCH = 1024  # FAISS queries per search call
# IVF lists probed for candidates: near copies sit in their query's own list or next to it. A fixed count
# keeps each query's scan at ~16 n / nlist vectors, which still grows as sqrt(n) with the index's 4 sqrt(n)
# lists (and with their imbalance: 16,499 vectors a query at 1M synthetic rows, README "Duplicates"); a
# query's default probes a share of the lists, 160 of 4,000 at 1M rows, 7.6x that scan.
CANDIDATE_NPROBE = 16
CHUNK_ROWS = 256  # rows decoded at once while verifying (dense float32 and patch sets: ~200 MB for DINOv2-S at 224 px)
# Contents searched and verified per cache part (`in_parts`): a stopped run loses at most one part's work.
PART_NODES, MAX_PARTS = 4096, 16
PART_NAME = re.compile(r"part-(\d+)\.parquet")
LOSSLESS = frozenset({".png", ".tif", ".tiff", ".bmp"})  # .webp: lossless when its first chunk is VP8L
CACHE_DIR = "dedup"


# -- verification of stored pairs --------------------------------------------------------------------
def verify_pairs(index, anchors: np.ndarray, partners: np.ndarray, other=None, chunk_rows: int = CHUNK_ROWS,
                 on_advance: Callable[[int], None] | None = None, model=None) -> dict[str, np.ndarray]:
    """Geometric and photometric verification of stored rows by key: anchor (a row of `index`) as the
    query, partner (a row of `other`, default `index`, of the same configuration) as the candidate,
    with the verifier and patch sets the reranker uses (rerank.scores.patch_set,
    rerank.verify.GeometricVerifier), then the anchor's stored thumbnail warped onto the partner's by
    the verified transform (rerank.photometric). Pairs are taken anchor by anchor (one verifier call per
    anchor and all its partners), chunk by chunk: every dense tensor a chunk needs is read, decoded
    and made a patch set once, about `chunk_rows` at a time. `model`: the Index whose backbone and
    positional prior describe both (default `index`).

    -> per pair, in the order given: "score" (P,) float32, the share of the anchor's salient patches
    that map onto the partner (NaN where a row has gone); "inliers" (P,) int32; "agreement" (P,)
    float32, the thumbnails' block correlation under the transform (rerank.photometric; 0 for pairs
    that verified below AGREEMENT_FROM, which no threshold makes a copy); "scale" (P,) float32, partner
    pixels per anchor pixel of what they share (the transform's scale)."""
    import torch

    from .rerank.photometric import photometric_agreement
    from .rerank.verify import GeometricVerifier

    other = other or index
    anchors, partners = np.asarray(anchors, np.int64), np.asarray(partners, np.int64)
    out = {"score": np.full(len(anchors), np.nan, np.float32), "inliers": np.zeros(len(anchors), np.int32),
           "agreement": np.zeros(len(anchors), np.float32), "scale": np.full(len(anchors), np.nan, np.float32)}
    if not len(anchors):
        return out
    verifier = GeometricVerifier()
    order = np.argsort(anchors, kind="stable")
    starts = np.flatnonzero(np.r_[True, anchors[order][1:] != anchors[order][:-1]])
    bounds = list(zip(starts, np.r_[starts[1:], len(order)]))
    i = 0
    while i < len(bounds):
        chunk, rows = [], 0
        while i < len(bounds) and (not chunk or rows + 1 + bounds[i][1] - bounds[i][0] <= chunk_rows):
            chunk.append(bounds[i])
            rows += 1 + bounds[i][1] - bounds[i][0]
            i += 1
        slots = np.concatenate([order[a:b] for a, b in chunk])
        if other is index:
            mine = theirs = _patch_sets(index, np.unique(np.r_[anchors[slots], partners[slots]]), model)
        else:
            mine = _patch_sets(index, np.unique(anchors[slots]), model)
            theirs = _patch_sets(other, np.unique(partners[slots]), model)
        for a, b in chunk:
            group = [s for s in order[a:b] if int(partners[s]) in theirs.at]
            anchor = mine.at.get(int(anchors[order[a]]))
            if anchor is None or not group:
                continue
            at = [theirs.at[int(partners[s])] for s in group]
            with torch.inference_mode():
                ver = verifier([_take(mine.sets, [anchor])], _take(theirs.sets, at))
                # the thumbnails' check costs ~30 warps a pair: only for pairs that verified like a copy may
                live = [j for j, (s, p) in enumerate(zip(ver.score.tolist(), at)) if s >= AGREEMENT_FROM and theirs.greys[p] is not None]
                if live and mine.greys[anchor] is not None:
                    found = photometric_agreement(mine.greys[anchor], [theirs.greys[at[j]] for j in live], ver.transform[live])
                    out["agreement"][[group[j] for j in live]] = found.numpy()
            longer = lambda sizes: sizes.max(-1).values  # noqa: E731  pixels of the longer side
            scale = ver.transform[:, 0].abs() * longer(theirs.sets.sizes[at]) / longer(mine.sets.sizes[anchor])
            out["scale"][group] = torch.where(ver.score > 0, scale, torch.nan).numpy()  # no transform without a score
            out["score"][group], out["inliers"][group] = ver.score.numpy(), ver.inliers.numpy()
        if on_advance:
            on_advance(len(slots))
    return out


@dataclass
class _Described:
    """Stored rows as the verifiers see them: patch sets, grey thumbnails, and each key's position."""
    at: dict  # key -> position
    sets: object  # rerank.verify.PatchSet of the rows, or None when none is left
    greys: list  # (H, W) uint8 grey thumbnail per position (None: no thumbnail)


def _patch_sets(index, keys: np.ndarray, model=None):
    """The verifiers' view (_Described) of those of `keys` still in the table, through the backbone and
    positional prior of `model` (default `index`; another Index of the same configuration and weights)."""
    import torch

    from .images import grey_thumbnail
    from .rerank.scores import patch_set, without_flat

    found = index.store.find(keys.tolist(), ["dense", "width", "height", "thumb"])
    if not found:
        return _Described({}, None, [])
    rows = list(found.values())
    dense = torch.as_tensor(index._decode_dense(rows))
    model = model or index
    backbone = model.embedder.backbone
    with torch.inference_mode():
        sets = patch_set(backbone, model.conf.dense_layer, dense, [(r["width"], r["height"]) for r in rows],
                         model.positional_prior())
    greys = [grey_thumbnail(r["thumb"]) for r in rows]
    return _Described({r["key"]: i for i, r in enumerate(rows)}, without_flat(sets, greys), greys)


def _take(sets, positions: list[int]):
    """The PatchSet of some of a batch's images."""
    import torch

    from .rerank.verify import PatchSet

    idx = torch.as_tensor(positions, dtype=torch.long)
    return PatchSet(sets.desc[idx], sets.weight[idx], sets.xy[idx], sets.grid, sets.sizes[idx],
                    None if sets.mass is None else sets.mass[idx])


# -- candidates ----------------------------------------------------------------------------------------
def candidate_pairs(vector_index, keys: np.ndarray, vectors: Iterator[tuple[np.ndarray, np.ndarray]],
                    k: int, min_cosine: float) -> pa.Table:
    """Pairs (a, b, cosine) from the k nearest rows (other than itself) of each query in
    `vector_index` (an ann.VectorIndex, CANDIDATE_NPROBE lists probed), at cosine >= min_cosine.
    `vectors` yields (keys, vectors) batches of the queries."""
    a_parts, b_parts, c_parts = [], [], []
    for qkeys, qvecs in vectors:
        for s in range(0, len(qkeys), QUERY_BATCH):
            q, qk = qvecs[s:s + QUERY_BATCH], qkeys[s:s + QUERY_BATCH]
            sims, nbrs = vector_index.search(q, min(k + 1, max(vector_index.ntotal, 1)), nprobe=CANDIDATE_NPROBE)
            a, b, c = np.repeat(qk, nbrs.shape[1]), nbrs.reshape(-1), sims.reshape(-1)
            keep = (b >= 0) & (c >= min_cosine) & (a != b)
            a_parts.append(a[keep])
            b_parts.append(b[keep])
            c_parts.append(c[keep])
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return pair_table(cat(a_parts, np.int64), cat(b_parts, np.int64), cat(c_parts, np.float32))


def candidates(index, keys: np.ndarray, k: int, min_cosine: float, other=None) -> pa.Table:
    """Candidate pairs (a: one of `keys`, rows of `index`; b: a row of `other`, default `index`): a's k
    content neighbours at content cosine >= min_cosine, and its STYLE_K style neighbours at style cosine
    >= MIN_STYLE. The style vector (channel statistics of the middle layers, pooled over the image) stays
    put where a copy is mirrored, recoloured or stamped with text and the CLS vector moves: on the tuning
    split of the copy-detection proxy (exact k-NN over its stored vectors, README "Duplicates") the content
    neighbours hold 0.71 of the true pairs, with the style ones 0.81, for 15 % more pairs.

    The style neighbours and their floor are the style index's own scores: exact below the compact index's
    projection threshold, then its projected (and 8-bit) ones, which run a little below the exact cosine
    (median -0.05 on real vectors in 100k synthetic rows, README). Re-scoring them exactly would read every
    candidate's 20 KB style vector. -> pair_table sorted by (a, b): cosine the content cosine of every
    pair, style the style index's score of those style found (NaN for the others)."""
    other = other or index
    by_content = candidate_pairs(other.vector_index("content"), keys, _vectors(index, keys, "content"), k, min_cosine)
    by_style = candidate_pairs(other.vector_index("style"), keys, _vectors(index, keys, "style"), STYLE_K, MIN_STYLE)
    t = by_content.select(["a", "b", "cosine"]).join(
        by_style.select(["a", "b", "cosine"]).rename_columns(["a", "b", "style"]), ["a", "b"], join_type="full outer",
        use_threads=False).sort_by([("a", "ascending"), ("b", "ascending")])
    a, b = t.column("a").to_numpy(), t.column("b").to_numpy()
    cosine, style = (t.column(c).fill_null(np.nan).to_numpy().astype(np.float32) for c in ("cosine", "style"))
    lack = np.isnan(cosine)  # found by style alone
    cosine[lack] = _cosines(index, other, a[lack], b[lack], "content")
    return pair_table(a, b, cosine, style=style)


def _cosines(index, other, a: np.ndarray, b: np.ndarray, column: str, chunk: int = 8 * QUERY_BATCH) -> np.ndarray:
    """The cosine of each pair's stored `column` vectors, a rows of `index`, b of `other`, `chunk` pairs'
    vectors read at a time; NaN where a row is gone (the FAISS index may be a version behind the table)."""
    out = np.full(len(a), np.nan, np.float32)
    for s in range(0, len(a), chunk):
        x, y = a[s:s + chunk], b[s:s + chunk]
        (ka, va), (kb, vb) = index.store.vectors_of(np.unique(x), column), other.store.vectors_of(np.unique(y), column)
        if not len(ka) or not len(kb):
            continue
        oa, ob = np.argsort(ka), np.argsort(kb)
        ia = oa[np.minimum(np.searchsorted(ka, x, sorter=oa), len(ka) - 1)]
        ib = ob[np.minimum(np.searchsorted(kb, y, sorter=ob), len(kb) - 1)]
        there = (ka[ia] == x) & (kb[ib] == y)
        va, vb = va[ia[there]], vb[ib[there]]
        out[s:s + chunk][there] = np.einsum("ij,ij->i", va, vb) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    return out


PAIR_COLUMNS = ("score", "inliers", "agreement", "scale")  # what verification adds to a candidate (a, b, cosine, style)


def pair_table(a, b, cosine, score=None, inliers=None, agreement=None, scale=None, style=None) -> pa.Table:
    """Pairs (a, b): content cosine, style cosine (NaN unless a style candidate), and what their
    verification found (verify_pairs; unverified: NaN score)."""
    n = len(a)
    col = lambda x, fill, dtype: pa.array(np.full(n, fill, dtype) if x is None else np.asarray(x, dtype))  # noqa: E731
    return pa.table({"a": col(a, 0, np.int64), "b": col(b, 0, np.int64), "cosine": col(cosine, 0, np.float32),
                     "style": col(style, np.nan, np.float32), "score": col(score, np.nan, np.float32), "inliers": col(inliers, 0, np.int32),
                     "agreement": col(agreement, 0, np.float32), "scale": col(scale, np.nan, np.float32)})


def verify_smaller_first(index, pairs: pa.Table, other=None, on_advance=None) -> pa.Table:
    """`pairs` (a, b) with what verify_pairs finds, the image of fewer pixels as the anchor: the share
    of ITS salient patches that maps onto the other (a crop or a small copy is covered by its original,
    not the other way round; ties: a); scale as b pixels per a pixel whichever was the anchor. a and b
    are rows of `index`, or a of `index` and b of `other`. Pairs with a row gone are dropped."""
    a, b = pairs.column("a").to_numpy(), pairs.column("b").to_numpy()
    found = {name: np.zeros(len(a), np.float32) for name in PAIR_COLUMNS}
    if len(a):
        pixels = _pixels(index, a)
        flip = _pixels(other or index, b) < pixels  # b smaller: b is the anchor
        parts = [(~flip, verify_pairs(index, a[~flip], b[~flip], other, on_advance=on_advance)),
                 (flip, verify_pairs(index, b[flip], a[flip], on_advance=on_advance) if other is None
                  else verify_pairs(other, b[flip], a[flip], index, on_advance=on_advance, model=index))]
        for where, part in parts:
            for name in PAIR_COLUMNS:
                found[name][where] = part[name]
        found["scale"][flip] = np.reciprocal(found["scale"][flip], where=found["scale"][flip] != 0, out=np.full(flip.sum(), np.inf, np.float32))
    kept = ~np.isnan(found["score"]) if len(a) else np.zeros(0, bool)
    return pair_table(a, b, pairs.column("cosine").to_numpy(), style=pairs.column("style").to_numpy(), **found).filter(pa.array(kept))


def _pixels(index, keys: np.ndarray) -> np.ndarray:
    """width x height of each key's row (0 for rows gone)."""
    found = index.store.find(np.unique(keys).tolist(), ["width", "height"])
    return np.array([found[k]["width"] * found[k]["height"] if k in found else 0 for k in keys.tolist()], np.int64)


# -- stored pair scores --------------------------------------------------------------------------------
class PairCache:
    """Verified pairs of one database (or of one database against another) in ROOT/dedup/<name>/, one
    parquet part per chunk of searched contents: the columns of pair_table; metadata: the identity they
    were made under (store uuid and weights, candidate settings, verifier), the table version(s) they
    reflect and the keys whose neighbours were searched ("queried"). Each part is written whole and
    atomically (a new file renamed into place), so a run stopped midway keeps the chunks it finished and
    the next one searches only the rest. `consolidate` replaces the parts by one, which names the parts
    it replaces: a kill between its write and their removal counts nothing twice."""

    def __init__(self, root: Path, name: str, identity: dict):
        self.dir = Path(root) / CACHE_DIR / name
        self.legacy = Path(root) / CACHE_DIR / f"{name}.parquet"  # the one file of earlier versions: read as a part
        self.identity = identity

    def _files(self) -> list[Path]:
        """The part files there are, in the order written, the earlier versions' one file last."""
        return sorted(p for p in self.dir.glob("part-*.parquet") if PART_NAME.fullmatch(p.name)) + \
            [p for p in (self.legacy,) if p.exists()]

    def parts(self) -> list[tuple[pa.Table, np.ndarray, dict]]:
        """(pairs, queried keys, versions) of each part made under this identity and not replaced by another."""
        parts, replaced = [], set()
        for path in self._files():
            try:
                table = pq.read_table(path)
                meta = json.loads(table.schema.metadata[b"simsearch"])
                queried = np.frombuffer(bytes.fromhex(meta.get("queried", "")), np.int64)
            except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
                continue
            if meta.get("identity") == self.identity:
                replaced.update(meta.get("replaces", ()))
                parts.append((path.name, table.replace_schema_metadata(None), queried, meta["versions"]))
        return [(t, q, v) for name, t, q, v in parts if name not in replaced]

    def load(self, current: Callable[[pa.Table, np.ndarray, dict], tuple[pa.Table, np.ndarray] | None] | None = None
             ) -> tuple[pa.Table, np.ndarray]:
        """The parts' pairs and queried keys together, each part as `current(pairs, queried, versions)`
        brings it up to date (None: a part that cannot be; default: as it is). Each part is brought
        from its own versions: a part written after a change holds pairs verified after it."""
        kept = [x for part in self.parts() if (x := part[:2] if current is None else current(*part)) is not None]
        if not kept:
            return pair_table([], [], []), np.zeros(0, np.int64)
        return pa.concat_tables([t for t, _ in kept]), np.unique(np.concatenate([q for _, q in kept]))

    def add(self, pairs: pa.Table, queried: np.ndarray, versions: dict, replaces: tuple[str, ...] = ()) -> None:
        """A new part: `pairs`, found by searching the neighbours of `queried`, at table `versions`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        numbers = [int(PART_NAME.fullmatch(p.name)[1]) for p in self._files() if p != self.legacy]
        path = self.dir / f"part-{max(numbers, default=0) + 1:06d}.parquet"
        queried = np.unique(np.asarray(queried, np.int64))
        meta = {"identity": self.identity, "versions": versions, "queried": queried.tobytes().hex(), "replaces": list(replaces)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.dir)
        os.close(fd)
        pq.write_table(pairs.replace_schema_metadata({b"simsearch": json.dumps(meta).encode()}), tmp)
        os.replace(tmp, path)

    def consolidate(self, pairs: pa.Table, queried: np.ndarray, versions: dict) -> None:
        """One part holding `pairs` (what every part holds now, with what a change removed) in place of
        the parts there are; a cache already in one part at `versions` stays. The caller holds the
        store's lock, so a temporary file left here was left by a writer that was killed."""
        for tmp in self.dir.glob(".part-*.tmp"):
            tmp.unlink(missing_ok=True)
        old = self._files()
        if len(old) == 1 and old[0] != self.legacy and json.loads(pq.read_schema(old[0]).metadata[b"simsearch"])["versions"] == versions:
            return
        self.add(pairs, queried, versions, replaces=tuple(p.name for p in old))
        for p in old:
            p.unlink(missing_ok=True)


def in_parts(cache: PairCache, store, todo: np.ndarray, versions: dict, verify: Callable[[np.ndarray], pa.Table]) -> list[pa.Table]:
    """`verify(nodes)` -> their verified pairs, over `todo` in at most MAX_PARTS chunks of at least
    PART_NODES, each saved as a cache part when done (a stopped run resumes at the chunk it was in).
    Fewer, larger chunks: each one's pairs are told apart from those verified before it by a join
    over all of those (cost ~ chunks x pairs)."""
    size = max(PART_NODES, -(-len(todo) // MAX_PARTS))
    done = []
    for s in range(0, len(todo), size):
        chunk = todo[s:s + size]
        done.append(verify(chunk))
        with store.lock:  # one writer of the cache at a time
            cache.add(done[-1], chunk, versions)
    return done


def unseen(pairs: pa.Table, known: pa.Table) -> pa.Table:
    """The rows of `pairs` whose (a, b) is not among `known`'s."""
    seen = pa.table({"a": known.column("a"), "b": known.column("b"), "seen": pa.array(np.ones(known.num_rows, bool))})
    return pairs.join(seen, ["a", "b"], join_type="left outer").filter(pc.is_null(pc.field("seen"))).drop_columns(["seen"])


# -- the keep rule -------------------------------------------------------------------------------------
def is_lossless(path: str) -> bool:
    """PNG, TIFF, BMP, or a WebP whose first chunk is VP8L (lossless); by name and, for WebP, its header."""
    suffix = Path(path).suffix.lower()
    if suffix in LOSSLESS:
        return True
    if suffix != ".webp":
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP" and head[12:16] == b"VP8L"


def keep_order(rows: list[dict]) -> list[dict]:
    """`rows` (path, width, height, size, mtime_ns) sorted by the keep rule (module docstring): the
    one to keep first."""
    return sorted(rows, key=_rank)


# -- results -------------------------------------------------------------------------------------------
@dataclass
class Member:
    key: int
    path: str
    role: str  # keep | duplicate | exact
    score: float  # verified score of the pair with the representative (1.0 for exact copies and the keep)
    inliers: int  # inlier correspondences of that pair (0 for exact copies: nothing to verify)
    bytes: int  # reclaimable: the file's size, 0 for the one to keep
    set: str = "self"  # against another set: "self" (this database) or "ref"
    agreement: float = 1.0  # the thumbnails' agreement of that pair (rerank.photometric; 1.0 for exact copies and the keep)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["key"], d["score"], d["agreement"] = str(self.key), round(float(self.score), 4), round(float(self.agreement), 4)  # 63-bit keys: strings stay exact in JS
        return d


@dataclass
class Group:
    group: int
    representative: int
    members: list[Member]

    @property
    def reclaimable_bytes(self) -> int:
        return sum(m.bytes for m in self.members)

    def to_dict(self) -> dict:
        return {"group": self.group, "representative": str(self.representative),
                "members": [m.to_dict() for m in self.members]}


@dataclass
class DedupResult:
    groups: list[Group]
    pairs_verified: int  # candidate pairs with a verified score behind these groups
    new_pairs_verified: int  # of them, verified by this call (0: re-grouped from stored scores)
    table_version: int
    threshold: float
    images: int  # images in scope
    min_agreement: float = 0.0  # the thumbnails' agreement a pair needed beside the threshold
    failed: list[tuple[str, str]] = field(default_factory=list)  # files the indexing step could not read

    @property
    def reclaimable_bytes(self) -> int:
        return sum(g.reclaimable_bytes for g in self.groups)

    def to_dict(self, limit: int | None = None, offset: int = 0) -> dict:
        groups = self.groups[offset:None if limit is None else offset + limit]
        return {"groups": [g.to_dict() for g in groups], "total_groups": len(self.groups),
                "reclaimable_bytes": self.reclaimable_bytes, "pairs_verified": self.pairs_verified,
                "new_pairs_verified": self.new_pairs_verified, "table_version": self.table_version,
                "threshold": self.threshold, "min_agreement": self.min_agreement, "images": self.images,
                "failed": [{"path": p, "reason": r} for p, r in self.failed]}

    def rows(self) -> Iterator[dict]:
        """One flat row per member: the CSV columns."""
        for g in self.groups:
            for m in g.members:
                yield {"group": g.group, "member": m.path, "role": m.role, "score": round(float(m.score), 4),
                       "inliers": m.inliers, "agreement": round(float(m.agreement), 4), "bytes_reclaimable": m.bytes}


CSV_COLUMNS = ("group", "member", "role", "score", "inliers", "agreement", "bytes_reclaimable")


# -- the scope -----------------------------------------------------------------------------------------
@dataclass
class Scope:
    """The rows a run looks at and the content each stands for: a content's *node* is the smallest
    key among its rows in the scope (exact copies have one vector, so one node searches for all)."""
    keys: np.ndarray  # (n,) int64, sorted
    content: np.ndarray  # (n,) int: equal for rows of equal content id

    def __post_init__(self):
        _, first, inverse = np.unique(self.content, return_index=True, return_inverse=True)
        self.node = self.keys[first][inverse]  # keys are sorted: the first row is the smallest key
        self.copies = self.node != self.keys  # rows whose content another row already stands for

    def nodes(self) -> np.ndarray:
        return self.keys[~self.copies]

    def contains(self, keys: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(self.keys, keys), 0, len(self.keys) - 1)
        return self.keys[pos] == keys

    def node_of(self, keys: np.ndarray) -> np.ndarray:
        """The node of each key in the scope; keys outside it stay as they are."""
        keys = np.asarray(keys, np.int64)
        pos = np.clip(np.searchsorted(self.keys, keys), 0, len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.node[pos], keys)


def settings(k: int | None, min_cosine: float | None, threshold: float | None,
             min_agreement: float | None) -> tuple[int, float, float, float]:
    """The given candidate and grouping settings, DEFAULT_CONF for those not given."""
    given = dict(k=k, min_cosine=min_cosine, threshold=threshold, min_agreement=min_agreement)
    return tuple(DEFAULT_CONF[name] if value is None else value for name, value in given.items())


def scope_of(index, under: str | None) -> Scope:
    """The catalogued rows at or below folder `under` (all rows without), read through the path index;
    EmptyIndexError when there are none."""
    if not index.store.exists():
        raise EmptyIndexError(f"{index.root}: no simsearch database here", db=index.root)
    under = normalize(under) if under is not None else None
    parts = list(index.store.scan(["key", "id"], under))
    t = pa.Table.from_batches(parts) if parts else pa.table({"key": pa.array([], pa.int64()), "id": pa.array([], pa.string())})
    if not t.num_rows:
        raise EmptyIndexError(f"{under}: no indexed images under it" if under else f"{index.root}: the index holds no images")
    t = t.sort_by("key")
    return Scope(t.column("key").to_numpy(), t.column("id").combine_chunks().dictionary_encode().indices.to_numpy())


def _vectors(index, keys: np.ndarray, column: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for s in range(0, len(keys), 8 * QUERY_BATCH):
        yield index.store.vectors_of(keys[s:s + 8 * QUERY_BATCH], column)


# -- the run -------------------------------------------------------------------------------------------
def identity(index, k: int, min_cosine: float, other=None) -> dict:
    from .rerank.verify import GeometricVerifier

    from .rerank import photometric

    ident = {"uuid": index.store.meta.get("uuid", ""), "weights": index.store.meta["weights"], "k": k,
             "min_cosine": min_cosine, "style_k": STYLE_K, "min_style": MIN_STYLE, "verifier": GeometricVerifier.default_conf,
             "photometric": {"block": photometric.BLOCK, "min_std": photometric.MIN_STD, "from": AGREEMENT_FROM,
                             "refine": [photometric.REFINE_STEPS, photometric.REFINE_LR], "mirrors": [photometric.MIRRORS, photometric.MIRROR_MARGIN]}}
    if other is not None:
        ident["ref"] = {"root": str(other.root.resolve()), "uuid": other.store.meta.get("uuid", "")}
    return ident


def as_nodes(pairs: pa.Table, scope: Scope) -> pa.Table:
    """`pairs` between the scope's contents: each end replaced by its content's node, pairs with an end
    outside the scope or within one content dropped, each unordered pair once (its best score; a pair
    turned round has its scale inverted)."""
    a, b = scope.node_of(pairs.column("a").to_numpy()), scope.node_of(pairs.column("b").to_numpy())
    inside = scope.contains(a) & scope.contains(b) & (a != b)
    scale = pairs.column("scale").to_numpy()
    t = pa.table({"a": np.minimum(a, b)[inside], "b": np.maximum(a, b)[inside],
                  "cosine": pairs.column("cosine").to_numpy()[inside], "style": pairs.column("style").to_numpy()[inside],
                  **{name: pairs.column(name).to_numpy()[inside] for name in PAIR_COLUMNS if name != "scale"},
                  "scale": np.where(a > b, np.reciprocal(scale, where=scale != 0, out=np.full_like(scale, np.inf)), scale)[inside]})
    return best_of(t)


def best_of(pairs: pa.Table) -> pa.Table:
    """Each (a, b) of `pairs` once: the row of its best verified score, the largest style score."""
    style = pairs.column("style").to_numpy()
    t = pairs.set_column(pairs.schema.get_field_index("style"), "style", pa.array(style, mask=np.isnan(style)))  # null: skipped by max
    t = t.sort_by([("score", "descending")])
    rest = ("cosine", *PAIR_COLUMNS)
    agg = t.group_by(["a", "b"], use_threads=False).aggregate([(name, "first") for name in rest] + [("style", "max")])
    return pair_table(agg.column("a").to_numpy(), agg.column("b").to_numpy(), style=agg.column("style_max").fill_null(np.nan).to_numpy(),
                      **{name: agg.column(f"{name}_first").to_numpy() for name in rest})


def stored_pairs(index, scope: Scope, k: int, min_cosine: float, on_advance=None) -> tuple[pa.Table, int]:
    """Verified pairs between the contents of `scope`, from the cache, verifying what it lacks: the
    neighbours (in the whole table) of every content none of whose rows was searched at the version of
    the cache part that holds it, or changed since, are searched and the new pairs verified, in parts saved as they are done
    (`in_parts`), then the cache consolidated; the rest of the cache stands. -> (pairs as nodes, pairs
    verified now)"""
    store = index.store
    version = store.stable_version()
    cache = PairCache(index.root, "pairs", identity(index, k, min_cosine))
    changes = functools.cache(store.changed_since)  # the parts of one run share a version

    def current(pairs: pa.Table, queried: np.ndarray, versions: dict):
        changed = changes(versions["self"])
        if changed is None:  # the change log does not reach back: search again
            return None
        if len(changed):
            touched = pa.array(changed)
            pairs = pairs.filter(pc.invert(pc.or_(pc.is_in(pairs.column("a"), touched), pc.is_in(pairs.column("b"), touched))))
        return pairs, np.setdiff1d(queried, changed)

    pairs, queried = cache.load(current)
    covered = np.unique(scope.node_of(queried[scope.contains(queried)]))
    todo = np.setdiff1d(scope.nodes(), covered)
    known = as_nodes(pairs, scope).select(["a", "b"])  # node pairs verified before
    verified_now = 0

    def verify(nodes: np.ndarray) -> pa.Table:
        nonlocal known, verified_now
        new = unseen(as_nodes(candidates(index, nodes, k, min_cosine), scope), known)
        known = pa.concat_tables([known, new.select(["a", "b"])])
        verified_now += new.num_rows
        new = pair_table(*(new.column(c).to_numpy() for c in ("a", "b", "cosine")), style=new.column("style").to_numpy())
        return verify_smaller_first(index, new, on_advance=on_advance)

    if len(todo):
        pairs = pa.concat_tables([pairs, *in_parts(cache, store, todo, {"self": version}, verify)])
        with store.lock:
            cache.consolidate(pairs, np.union1d(queried, todo), {"self": version})
    return as_nodes(pairs, scope), verified_now


def find_duplicates(index, under: str | None = None, threshold: float | None = None, k: int | None = None,
                    min_cosine: float | None = None, min_agreement: float | None = None, on_advance=None) -> DedupResult:
    """Exact and verified near-duplicate groups among the rows of `index` at or below folder `under`
    (all rows when None), grouped around representatives by the keep rule (module docstring).
    `threshold` and `min_agreement` apply to stored pair scores: changing them verifies nothing."""
    k, min_cosine, threshold, min_agreement = settings(k, min_cosine, threshold, min_agreement)
    scope = scope_of(index, under)
    pairs, verified_now = stored_pairs(index, scope, k, min_cosine, on_advance)
    groups = build_groups(index, scope, pairs, threshold, min_agreement)
    return DedupResult(groups, pairs.num_rows, verified_now, index.store.version, threshold, len(scope.keys), min_agreement)


def strong_pairs(pairs: pa.Table, threshold: float, min_agreement: float) -> pa.Table:
    """The pairs that count as copies: verified score >= threshold and thumbnails agreeing >= min_agreement."""
    return pairs.filter(pc.and_(pc.greater_equal(pairs.column("score"), threshold),
                                pc.greater_equal(pairs.column("agreement"), min_agreement)))


def content_tiers(a: np.ndarray, b: np.ndarray, scale: np.ndarray, fallback: np.ndarray) -> dict[int, int]:
    """Node -> its tier of content resolution among the nodes it is connected to by pairs (a, b) whose
    shared content b shows at `scale` times a's pixels (linear; where not finite: `fallback`, the
    ratio of their longer sides). Within a connected set each node gets the log scale its path from
    the set's first node (breadth first, pairs in the given order) adds up to; walking those from the
    finest, a new tier starts where one falls more than RESOLUTION_TOLERANCE below its tier's finest.
    Tier 0 is the finest: the keep rule's resolution."""
    step = np.log(np.where(np.isfinite(scale) & (scale > 0), scale, fallback))
    nbrs: dict[int, list[tuple[int, float]]] = {}
    for x, y, d in zip(a.tolist(), b.tolist(), step.tolist()):
        nbrs.setdefault(x, []).append((y, d))
        nbrs.setdefault(y, []).append((x, -d))
    level: dict[int, float] = {}
    tiers: dict[int, int] = {}
    for root in nbrs:
        if root in level:
            continue
        level[root], queue = 0.0, [root]
        for x in queue:  # grows while it is walked: breadth first
            for y, d in nbrs[x]:
                if y not in level:
                    level[y] = level[x] + d
                    queue.append(y)
        tier, top = 0, None
        for x in sorted(queue, key=lambda n: -level[n]):
            if top is not None and level[x] < top - np.log(RESOLUTION_TOLERANCE):
                tier, top = tier + 1, level[x]
            top = level[x] if top is None else top
            tiers[x] = tier
    return tiers


def build_groups(index, scope: Scope, pairs: pa.Table, threshold: float, min_agreement: float) -> list[Group]:
    """Groups around representatives (module docstring) from verified `pairs` between scope nodes."""
    strong = strong_pairs(pairs, threshold, min_agreement)
    a, b = strong.column("a").to_numpy(), strong.column("b").to_numpy()
    score, inl, agree = (strong.column(c).to_numpy() for c in ("score", "inliers", "agreement"))
    edges: dict[int, dict[int, tuple[float, int, float]]] = {}
    for x, y, s, n, g in zip(a.tolist(), b.tolist(), score.tolist(), inl.tolist(), agree.tolist()):
        edges.setdefault(x, {})[y] = (s, n, g)
        edges.setdefault(y, {})[x] = (s, n, g)
    copied = set(scope.node[scope.copies].tolist())  # nodes with exact copies
    involved = sorted(set(edges) | copied)
    members_of: dict[int, list[int]] = {}
    for key, node in zip(scope.keys[np.isin(scope.node, involved)].tolist(), scope.node[np.isin(scope.node, involved)].tolist()):
        members_of.setdefault(node, []).append(key)
    info = _file_info(index, [key for keys in members_of.values() for key in keys])
    # every content: its copies in keep order; contents in the keep rule's order (tier, verified copies, best file)
    copies = {n: keep_order([info[key] for key in keys if key in info]) for n, keys in members_of.items()}
    copies = {n: c for n, c in copies.items() if c}
    side = lambda n: max(copies[n][0]["width"], copies[n][0]["height"]) if n in copies else 1  # noqa: E731
    tiers = content_tiers(a, b, strong.column("scale").to_numpy(),
                          np.array([side(y) / side(x) for x, y in zip(a.tolist(), b.tolist())], np.float64))
    walk = sorted(copies, key=lambda n: (tiers.get(n, 0), -len(edges.get(n, ())), *_rank(copies[n][0])[1:]))
    grouped: set[int] = set()
    groups: list[Group] = []
    for rep in walk:
        if rep in grouped:
            continue
        takes = [n for n in edges.get(rep, {}) if n not in grouped and n in copies]
        if not takes and len(copies[rep]) < 2:
            continue
        grouped.update([rep, *takes])
        keep, *same = copies[rep]
        members = [Member(keep["key"], keep["path"], "keep", 1.0, 0, 0)]
        members += [Member(r["key"], r["path"], "exact", 1.0, 0, r["size"]) for r in same]
        for n in sorted(takes, key=lambda n: -edges[rep][n][0]):
            s, count, g = edges[rep][n]
            members += [Member(r["key"], r["path"], "duplicate", s, count, r["size"], agreement=g) for r in copies[n]]
        groups.append(Group(len(groups) + 1, keep["key"], members))
    return groups


def _rank(row: dict) -> tuple:
    """The keep rule's order of one image on its own: pixels, lossless, file size, oldest, path."""
    return (-(row["width"] * row["height"]), not is_lossless(row["path"]), -row["size"], row["mtime_ns"], row["path"])


def _file_info(index, keys: list[int]) -> dict[int, dict]:
    """key -> {key, path, width, height, size, mtime_ns} from the payload and the catalog."""
    rows = index.store.find(keys, ["path", "width", "height"])
    stats = index.store.files_of([r["path"] for r in rows.values()])
    return {k: {**r, "size": stats[r["path"]][1], "mtime_ns": stats[r["path"]][2]}
            for k, r in rows.items() if r["path"] in stats}


# -- one set against another ----------------------------------------------------------------------------
def open_reference(index, ref: str | Path, on_total=None, on_advance=None):
    """The Index to compare `index` against: the database at `ref`, or for a folder a database of it
    kept in ROOT/dedup/against/<digest of the folder's path> (indexed incrementally, same
    configuration, sharing the model). -> (Index, IndexReport or None)"""
    from .errors import ImageError
    from .index import Index

    ref_path = Path(ref).expanduser()
    if database_exists(ref_path):
        other = Index(ref_path, conf=index.conf)  # ConfigMismatchError for another model or configuration
        if other.root.resolve() == index.root.resolve():
            raise SimsearchError(f"{ref_path}: is the database itself; compare it with another set")
        if other.store.meta["weights"] != index.store.meta["weights"]:
            raise ConfigMismatchError(f"{ref_path} was built with weights {other.store.meta['weights']}, "
                                      f"{index.root} with {index.store.meta['weights']}")
        return other, None
    if not ref_path.exists():
        raise ImageError(ref_path, "no such file or directory")
    if not ref_path.is_dir():
        raise ImageError(ref_path, "neither a folder of images nor a simsearch database")
    digest = hashlib.blake2b(normalize(ref_path).encode(), digest_size=8).hexdigest()
    other = Index(index.root / CACHE_DIR / "against" / digest, conf=index.conf, embedder=index.embedder)
    report = other.add_folder(ref_path, on_total=on_total, on_advance=on_advance)
    if not other.count():
        raise EmptyIndexError(f"{ref_path}: no images to compare against")
    return other, report


def find_copies_in(index, other, under: str | None = None, threshold: float | None = None, k: int | None = None,
                   min_cosine: float | None = None, min_agreement: float | None = None, on_advance=None) -> DedupResult:
    """Which images of `index` (at or below folder `under`) have a copy in `other` (an Index of the
    same configuration): train/test leakage, "was this image already used". Each image of this set
    goes to its best-verified copy in `other` (an equal content id is an exact copy); the groups are
    those copies (role keep, set "ref") with the images of this set that copy them (duplicate or
    exact, set "self", bytes: their size)."""
    k, min_cosine, threshold, min_agreement = settings(k, min_cosine, threshold, min_agreement)
    scope = scope_of(index, under)
    pairs, verified_now = _cross_pairs(index, other, scope, k, min_cosine, on_advance)
    strong = strong_pairs(pairs, threshold, min_agreement).sort_by([("score", "descending")])
    best: dict[int, tuple[int, float, int, float]] = {}  # this node -> (ref key, score, inliers, agreement)
    for a, b, s, n, g in zip(*(strong.column(c).to_pylist() for c in ("a", "b", "score", "inliers", "agreement"))):
        best.setdefault(a, (b, s, n, g))
    mine = {n: [] for n in best}
    for key, node in zip(scope.keys.tolist(), scope.node.tolist()):
        if node in mine:
            mine[node].append(key)
    info = _file_info(index, [key for keys in mine.values() for key in keys])
    ref_info = _file_info(other, sorted({b for b, *_ in best.values()}))
    by_ref: dict[int, list[int]] = {}
    for node, (b, *_) in best.items():
        if b in ref_info:
            by_ref.setdefault(b, []).append(node)
    groups = []
    for b, nodes in sorted(by_ref.items(), key=lambda kv: -max(best[n][1] for n in kv[1])):
        r = ref_info[b]
        members = [Member(b, r["path"], "keep", 1.0, 0, 0, set="ref")]
        for node in sorted(nodes, key=lambda n: -best[n][1]):
            _, s, n, g = best[node]
            role = "exact" if s >= EXACT_SCORE else "duplicate"
            members += [Member(row["key"], row["path"], role, min(s, 1.0), n, row["size"], set="self", agreement=g)
                        for row in keep_order([info[key] for key in mine[node] if key in info])]
        groups.append(Group(len(groups) + 1, b, members))
    return DedupResult(groups, pairs.num_rows, verified_now, index.store.version, threshold, len(scope.keys), min_agreement)


EXACT_SCORE = 2.0  # stored for a pair of equal content ids: above any verified share, never re-verified


def _cross_pairs(index, other, scope: Scope, k: int, min_cosine: float, on_advance=None) -> tuple[pa.Table, int]:
    """Verified pairs (a: a node of `scope` in `index`, b: a row of `other`), from the cache
    ROOT/dedup/against-<digest>/, verifying what it lacks (in parts, as `stored_pairs`). Rows of this set changed since are
    searched again; when `other` changed, every node is searched again (a new reference row may copy
    any of them), but only pairs not in the cache are verified."""
    version, ref_version = index.store.stable_version(), other.store.stable_version()
    ident = identity(index, k, min_cosine, other)
    name = "against-" + hashlib.blake2b(json.dumps(ident["ref"]).encode(), digest_size=8).hexdigest()
    cache = PairCache(index.root, name, ident)
    mine, theirs = functools.cache(index.store.changed_since), functools.cache(other.store.changed_since)

    def current(pairs: pa.Table, queried: np.ndarray, versions: dict):
        changed, changed_ref = mine(versions["self"]), theirs(versions["ref"])
        if changed is None or changed_ref is None:
            return None
        drop = pc.or_(pc.is_in(pairs.column("a"), pa.array(changed)), pc.is_in(pairs.column("b"), pa.array(changed_ref)))
        return pairs.filter(pc.invert(drop)), np.setdiff1d(queried, changed) if not len(changed_ref) else np.zeros(0, np.int64)

    pairs, queried = cache.load(current)
    pairs = best_of(pairs)  # two runs at once may both have verified a pair
    covered = np.unique(scope.node_of(queried[scope.contains(queried)]))
    todo = np.setdiff1d(scope.nodes(), covered)
    known = pairs.select(["a", "b"])  # a chunk's pairs start at its own nodes: only the cache's can repeat them
    verified_now = 0

    def verify(nodes: np.ndarray) -> pa.Table:
        nonlocal verified_now
        new = unseen(candidates(index, nodes, k, min_cosine, other), known)
        a, b = new.column("a").to_numpy(), new.column("b").to_numpy()
        ids = {r["key"]: r["id"] for r in index.store.find(np.unique(a).tolist(), ["id"]).values()}
        ref_ids = {r["key"]: r["id"] for r in other.store.find(np.unique(b).tolist(), ["id"]).values()}
        exact = np.array([ids.get(x) is not None and ids.get(x) == ref_ids.get(y) for x, y in zip(a.tolist(), b.tolist())], bool)
        cos, style = new.column("cosine").to_numpy(), new.column("style").to_numpy()
        same = pair_table(a[exact], b[exact], cos[exact], np.full(exact.sum(), EXACT_SCORE), np.zeros(exact.sum()),
                          np.ones(exact.sum()), np.ones(exact.sum()), style=style[exact])
        verified_now += int((~exact).sum())
        return pa.concat_tables([same, verify_smaller_first(index, pair_table(a[~exact], b[~exact], cos[~exact], style=style[~exact]),
                                                            other, on_advance)])

    if len(todo):
        versions = {"self": version, "ref": ref_version}
        pairs = pa.concat_tables([pairs, *in_parts(cache, index.store, todo, versions, verify)])
        with index.store.lock:
            cache.consolidate(pairs, np.union1d(queried, todo), versions)
    a = scope.node_of(pairs.column("a").to_numpy())
    inside = scope.contains(a)
    pairs = pairs.set_column(0, "a", pa.array(a)).filter(pa.array(inside))
    return pairs, verified_now
