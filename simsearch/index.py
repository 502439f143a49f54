"""`Index`: the Python API behind every CLI command.

    from simsearch import Index
    idx = Index("photos.db")                 # opens it, or prepares a new one
    idx.add_folder("photos/")                # incremental; returns an IndexReport
    for hit in idx.search("query.jpg", k=5, mode="style"):
        print(hit.rank, hit.score, hit.path)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from . import ann, catchup
from .backbones.runtime import check_runtime, recorded_choice
from .compact import CompactSource
from .descriptors.codec import COMPACT_CODECS, DenseFormat
from .embedder import DescriptorConfig, Embedder
from .errors import ConfigMismatchError, EmptyIndexError, ImageError, SimsearchError
from .images import _to_rgb, grey_thumbnail, open_image, preshrink
from .indexers import check_source
from .rerank import DEFAULT_RERANKER, RERANKERS
from .store import KEEP_VERSIONS, VECTOR_COLUMNS, ImageStore

MODES = VECTOR_COLUMNS  # "content", "style"
DENSE_CODECS = ("raw", *COMPACT_CODECS)
DEFAULT_DENSE_CODEC = "raw"
DEFAULT_DB = "simsearch.db"
MAX_CANDIDATES = 1000  # first-stage hits one query may rerank (the server answers 422 above it)
CANDIDATES = 50  # first-stage hits an image query reranks unless told (a region's: region.CANDIDATES)
RERANK_CHUNK = 64  # candidates read, decoded and scored at once: a rerank holds this many dense tensors
VIEW_SCALES = (0.5,)
MIN_BOX = 16  # pixels a side of a region query
PRIOR_ROWS = 64  # rows sampled for the positional prior of verification  # verification also describes a query at these fractions of the input size


@dataclass
class Hit:
    rank: int
    score: float
    path: str
    id: str
    key: int
    scores: dict[str, float] = field(default_factory=dict)  # per-stage scores when reranked
    # verified reranking: inlier correspondences, query (x, y) -> hit (x, y) in each image's pixels
    matches: list[tuple[float, float, float, float]] = field(default_factory=list)
    table_version: int | None = None  # the table version its row was read at (None: the latest)

    def to_dict(self) -> dict:
        d = {"rank": self.rank, "score": round(self.score, 6), "path": self.path, "id": self.id}
        if self.scores:
            d["scores"] = {k: round(v, 6) for k, v in self.scores.items()}
        if self.matches:
            d["matches"] = [{"query": [round(qx, 1), round(qy, 1)], "hit": [round(hx, 1), round(hy, 1)]}
                            for qx, qy, hx, hy in self.matches]
        return d


def check_box(box, size: tuple[int, int], name) -> tuple[int, int, int, int]:
    """A region box, "x0,y0,x1,y1" or four numbers, in pixels of an image of `size` named `name`
    -> (x0, y0, x1, y1), or ImageError naming the reason. The one check the CLI, the server and
    `search_region` share."""
    parts = box.split(",") if isinstance(box, str) else box
    try:
        x0, y0, x1, y1 = (int(p) if isinstance(p, int) else int(str(p).strip()) for p in parts)
    except (TypeError, ValueError):
        raise ImageError(name, f"box {str(box)[:60]!r}: expected four integers x0,y0,x1,y1") from None
    w, h = size
    if not (x0 < x1 and y0 < y1):
        raise ImageError(name, f"box {x0},{y0},{x1},{y1} is empty: needs x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise ImageError(name, f"box {x0},{y0},{x1},{y1} is outside the {w}x{h} pixels of the image")
    if min(x1 - x0, y1 - y0) < MIN_BOX:
        raise ImageError(name, f"box {x0},{y0},{x1},{y1} is smaller than {MIN_BOX} pixels a side")
    return x0, y0, x1, y1


def _local_or_name(name: str) -> str:
    """A local checkpoint (folder or file) is recorded as an absolute path, so the database works from
    any cwd; registry names and hub ids stay as they are."""
    from .backbones import MODELS

    path = Path(name).expanduser()
    return str(path.resolve()) if name not in MODELS and path.exists() else name


def rerank_candidates(candidates: int | None, region: bool = False) -> int:
    """First-stage hits a query reranks: `candidates`, or unless told CANDIDATES for an image and
    region.CANDIDATES for a region (its cell search reaches a small region's image lower down)."""
    if candidates is not None:
        return candidates
    if region:
        from .region import CANDIDATES as REGION_CANDIDATES

        return REGION_CANDIDATES
    return CANDIDATES


class Index:
    def __init__(self, db: str | Path = DEFAULT_DB, model: str | None = None, device: str = "auto",
                 conf: DescriptorConfig | None = None, ivf_threshold: int = ann.IVF_THRESHOLD,
                 nprobe: int | None = ann.NPROBE, embedder: Embedder | None = None,
                 keep_versions: timedelta = KEEP_VERSIONS, dense_codec: str | None = None, runtime: str = "auto",
                 **overrides):
        """Open the database at `db`, or prepare one to be created by the first `add_folder`.

        `model`, `conf` or DescriptorConfig fields given as keywords state what the caller expects;
        for an existing database they must match what it was built with, else ConfigMismatchError
        names both configurations. `ivf_threshold` and `nprobe` set the FAISS index kind (see
        simsearch.ann, simsearch.catchup). `embedder` shares an already loaded model (its configuration must be this
        index's). `keep_versions`: how long old table versions stay on disk (time travel).
        `dense_codec`: how a new table stores dense tensors: "raw" (config.dense_dtype) or a compact
        learned codec "pca" (simsearch.descriptors.quant, <= 64 KB per image); an existing table keeps its own.
        `runtime`: how the model runs (simsearch.backbones.runtime: auto, torch, torch-bf16, onnx); any
        runtime queries a table built with any other.
        """
        self.root = Path(db).expanduser()
        self.store = ImageStore(self.root, keep_versions)
        self.device = device
        self.runtime = check_runtime(runtime)
        self.nprobe = nprobe
        sources = {"content": catchup.Source("content"), "style": CompactSource("style")}  # style: 5,184 floats a row
        self.ann_indexes = {c: catchup.FollowedIndex(self.store, sources[c], ivf_threshold) for c in VECTOR_COLUMNS}
        if dense_codec is not None and dense_codec not in DENSE_CODECS:
            raise SimsearchError(f"unknown dense codec '{dense_codec}' (choose from {', '.join(DENSE_CODECS)})")
        self.dense_codec = dense_codec
        self._dense_format: DenseFormat | None = None
        if model is not None:
            overrides["model"] = _local_or_name(model)
        if overrides.get("ip_adapter"):
            overrides["ip_adapter"] = _local_or_name(overrides["ip_adapter"])
        if embedder is not None and conf is None and not overrides:
            conf = embedder.conf
        self._requested = conf, overrides
        if self.store.exists():
            self.conf = self._check_config(DescriptorConfig.from_dict(self.store.meta["config"]))
        else:
            self.conf = conf or DescriptorConfig.for_model(**overrides)
        stored = DenseFormat.of_table(self.store.meta, None).kind if self.store.exists() else None
        if stored is not None and dense_codec not in (None, stored):
            raise ConfigMismatchError(f"{self.root} stores dense tensors as {stored}, not {dense_codec}")
        if embedder is not None and embedder.conf != self.conf:
            raise ConfigMismatchError(f"the shared embedder has {embedder.conf.describe()}, the index {self.conf.describe()}")
        self._embedder: Embedder | None = embedder
        self._prior = None
        self._region = None

    def _check_config(self, stored: DescriptorConfig) -> DescriptorConfig:
        conf, overrides = self._requested
        wanted = conf or replace(stored, **overrides)
        if wanted != stored:
            raise ConfigMismatchError(
                f"{self.root} was built with {stored.describe()}; requested {wanted.describe()}. "
                f"Use another database or the same configuration.")
        return stored

    # -- model -------------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            # the recorded fingerprint lets a cached ONNX graph answer without loading the model
            weights = self.store.meta.get("weights") if self.store.exists() else None
            self._embedder = Embedder(self.conf, self.device, self.runtime, weights)
        if self.store.exists():
            self._check_weights(self._embedder)
        return self._embedder

    def _check_weights(self, emb: Embedder) -> None:
        stored = self.store.meta.get("weights")
        if stored != emb.fingerprint:
            raise ConfigMismatchError(
                f"{self.root} was built with weights {stored} of '{self.conf.model}', "
                f"but those weights now fingerprint as {emb.fingerprint}; re-index into a new database")

    @property
    def dense_format(self) -> DenseFormat:
        """How the table stores dense tensors (with its compact codec once one is fitted)."""
        if self._dense_format is None or self._dense_format.needs_fit:
            self._dense_format = DenseFormat.of_table(self.store.meta, self.store.codec_blob())
        return self._dense_format

    def encode_dense(self, x: np.ndarray) -> list[bytes]:
        """Dense tensors (N, T, C) -> the bytes the table stores. A compact codec not fitted yet is
        fitted on `x` (the first rows written), weighing coding errors as the rerankers' attention
        projections see them; if another writer saved one first, that one is used."""
        if self.dense_format.needs_fit:
            from .descriptors.quant import fit

            codec = fit(x, metric=self.embedder.backbone.dense_metric(self.conf.dense_layer))
            self.store.save_codec(codec.kind, codec.to_bytes())
        return self.dense_format.encode(x)

    def ensure_table(self) -> ImageStore:
        """Create the database, or open it when another process created it first; either way it
        must hold this index's configuration and weights."""
        if not self.store.exists():
            emb = self.embedder
            meta = {"config": self.conf.to_dict(), "weights": emb.fingerprint, "dense_shape": list(emb.dense_shape),
                    "dense_codec": self.dense_codec or DEFAULT_DENSE_CODEC}
            self.store.create(meta, emb.dims["content"], emb.dims["style"])
            self.conf = self._check_config(DescriptorConfig.from_dict(self.store.meta["config"]))
            self._check_weights(emb)
        return self.store

    # -- indexing ----------------------------------------------------------------------------
    def add_folder(self, folder: str | Path, batch_size: int = 16, prune: bool = False, engine: str = "local", **kwargs):
        """Embed every image under `folder` (see indexers.local.index_folder for the options).
        engine="ray": on a Ray cluster, `folder` may be a URI (see indexers.distributed.index_with_ray)."""
        check_source(folder, engine)
        if engine == "ray":
            from .indexers.distributed import index_with_ray

            return index_with_ray(self, folder, batch_size=batch_size, prune=prune, **kwargs)
        from .indexers.local import index_folder

        report = index_folder(self, folder, batch_size=batch_size, prune=prune, **kwargs)
        self.compile_for_queries()
        return report

    def compile_for_queries(self) -> bool:
        """Cache this configuration's ONNX graph so later cold queries load neither torch nor the model's
        library (backbones.runtime), and the graphs of a reranked query's views; a no-op once they exist,
        on CUDA, or for models it does not cover."""
        try:
            if self.embedder.export_graph() is None:
                return False
            for side in self.view_sides():  # and a reranked query's views (Embedder.view_runner)
                self.embedder.view_runner(side)
            return True
        except (SimsearchError, RuntimeError, OSError) as e:  # a cache that cannot be written costs speed, not the index run
            import logging

            logging.getLogger(__name__).warning("no compiled query graph for %s: %s", self.conf.model, e)
            return False

    def refresh_ann(self) -> dict[str, bool]:
        """Bring every FAISS index up to the table's version (by the rows changed since the version
        it reflects, or a full rebuild when due). -> {column: rebuilt in full}"""
        self.store.refresh()
        return {column: followed.catch_up() for column, followed in self.ann_indexes.items()}

    def vector_index(self, mode: str) -> ann.VectorIndex:
        """The FAISS index of `mode` ("content" or "style"), brought up to the table's version (while an index
        run holds the write lock, the last consistent one: see catchup.FollowedIndex.catch_up)."""
        return self.ann_indexes[mode].get().vectors

    # -- search ------------------------------------------------------------------------------
    def embed_image(self, image: str | Path | Image.Image):
        emb = self.embedder
        if isinstance(image, Image.Image):  # prepared as the indexer prepares files
            img = _to_rgb(ImageOps.exif_transpose(image))
        else:
            img = open_image(Path(image).expanduser(), max_side=self.conf.image_size).image
        return emb.embed(emb.preprocess(img)[None])

    def load_query(self, image: str | Path | Image.Image, full: bool = False) -> Image.Image:
        """A query image prepared as the indexer prepares files (`full`: at its own size, for boxes
        given in its pixels)."""
        if isinstance(image, Image.Image):
            img = _to_rgb(ImageOps.exif_transpose(image))
            return img if full else preshrink(img, self.conf.image_size)
        return open_image(Path(image).expanduser(), max_side=None if full else self.conf.image_size).image

    def search(self, image: str | Path | Image.Image, k: int = 10, mode: str = "content",
               where: str | None = None, rerank: str | None = None, candidates: int | None = None,
               box: tuple[int, int, int, int] | None = None) -> list[Hit]:
        """Top-k images like `image`. mode: "content" or "style"; where: a SQL filter on the table;
        rerank: "verified", "aas", "matches" or "both" reorders the first `candidates` hits (see
        simsearch.rerank; None: `rerank_candidates`). box: (x0, y0, x1, y1) pixels of `image`: the
        images that contain that region instead (`search_region`)."""
        if box is not None:
            return self.search_region(image, box, k, where, rerank or DEFAULT_RERANKER, candidates)
        candidates = rerank_candidates(candidates)
        self.check_query(k, mode, rerank, candidates)
        img = self.load_query(image)
        emb = self.embed_image(img)
        query = self.rerank_query(img, emb.dense[0], rerank) if rerank else None
        return self.search_embedded(getattr(emb, mode)[0], query, k, mode, where, rerank, candidates)

    def rerank_query(self, img: Image.Image, dense: np.ndarray, method: str = DEFAULT_RERANKER):
        """What the second stage needs of a query image whose dense tensor is `dense`: for
        verification also its dense tensors at VIEW_SCALES of the input size (a crop meets its
        original's patches at their scale) and its grey thumbnail (flat cells do not vote)."""
        from .rerank import RerankQuery

        if method != "verified":
            return RerankQuery(np.asarray(dense, np.float32), img.size)
        views = [self.embedder.dense_view(img, side) for side in self.view_sides()]
        return RerankQuery(np.asarray(dense, np.float32), img.size, views, grey=grey_thumbnail(img))

    def view_sides(self) -> list[int]:
        """Input sides of a query's verification views (VIEW_SCALES of the index's input size)."""
        bb = self.embedder.backbone
        return [bb.view_size(round(self.conf.image_size * scale)) for scale in VIEW_SCALES]

    def check_query(self, k: int, mode: str = "content", rerank: str | None = None, candidates: int = 1) -> None:
        """Refuse a query before any forward: unknown mode or reranker, k outside 1..rows, more
        candidates to rerank than MAX_CANDIDATES."""
        if mode not in MODES:
            raise SimsearchError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
        n = self.count()
        if n == 0:
            raise EmptyIndexError(f"{self.root}: the index holds no images", db=self.root)
        if k < 1:
            raise SimsearchError(f"k must be at least 1 (got {k})")
        if k > n:
            raise SimsearchError(f"k={k} is larger than the {n} images in {self.root}: ask for {n} or fewer")
        if rerank is not None:
            if rerank not in RERANKERS:
                raise SimsearchError(f"unknown reranker '{rerank}' (choose from {', '.join(RERANKERS)})")
            if not 1 <= candidates <= MAX_CANDIDATES:
                raise SimsearchError(f"candidates={candidates}: a query reranks 1 to {MAX_CANDIDATES} first-stage hits")

    def search_embedded(self, vector: np.ndarray, query, k: int = 10, mode: str = "content",
                        where: str | None = None, rerank: str | None = None, candidates: int = CANDIDATES) -> list[Hit]:
        """`search` for a query already embedded: its `mode` vector and (to rerank) a RerankQuery or
        its bare dense tensor (T, C)."""
        if rerank is None:
            return self.search_vector(vector, k, mode, where)
        if not 1 <= candidates <= MAX_CANDIDATES:
            raise SimsearchError(f"candidates={candidates}: a query reranks 1 to {MAX_CANDIDATES} first-stage hits")
        hits = self.search_vector(vector, max(k, min(candidates, self.count())), mode, where)
        return self.rerank(query, hits, rerank)[:k]

    def stored_query(self, key: int, mode: str = "content"):
        """The `mode` vector and the RerankQuery stored for row `key`, to search from an indexed
        image without its file (MissingRowsError when the row is gone)."""
        from .rerank import RerankQuery

        row = self.store.rows([key], [mode, "dense", "width", "height", "thumb"])[0]
        query = RerankQuery(self._decode_dense([row])[0], (row["width"], row["height"]), grey=grey_thumbnail(row["thumb"]))
        return np.asarray(row[mode], dtype=np.float32), query

    def rerank(self, query, hits: list[Hit], method: str = DEFAULT_RERANKER) -> list[Hit]:
        """Reorder `hits` by the first-stage score fused with a second-stage score computed from the
        stored dense tensors (simsearch.rerank), read at the table version the hits were.
        `query`: a RerankQuery or a bare dense tensor (T, C). Hits whose rows are not there (that
        version cleaned up since and the rows deleted) are dropped, so no score lands on another hit.
        Returns new hits; the given ones keep their first-stage scores. Candidates are read and
        scored RERANK_CHUNK at a time (each candidate's scores are its own), so memory is bounded
        by the chunk, not by how many there are."""
        from .rerank import agreement_candidates, fuse, rerank_scores, top_agreement

        version, prior = hits[0].table_version if hits else None, self.positional_prior() if method == "verified" else None
        # verification also compares the query's thumbnail with the candidates' (rerank.photometric):
        # a region's with every candidate's, a copy's with its best few once all are scored
        thumbs = method == "verified" and getattr(query, "grey", None) is not None
        region = thumbs and query.region
        kept, parts = [], []
        for start in range(0, len(hits), RERANK_CHUNK):
            found = self.store.find([h.key for h in hits[start:start + RERANK_CHUNK]],
                                    ["dense", "width", "height", *(["thumb"] if region else [])], version=version)
            chunk = [h for h in hits[start:start + RERANK_CHUNK] if h.key in found]
            if chunk:
                rows = [found[h.key] for h in chunk]
                parts.append(rerank_scores(self.embedder.backbone, self.conf.dense_layer, query, self._decode_dense(rows, as_stored=True),
                                           method, [(r["width"], r["height"]) for r in rows], prior=prior,
                                           cand_greys=[grey_thumbnail(r["thumb"]) for r in rows] if region else None))
                kept += chunk
        hits = kept
        if not hits:
            return hits
        scores = {name: np.concatenate([p[name] for p in parts]) if isinstance(parts[0][name], np.ndarray)
                  else [x for p in parts for x in p[name]] for name in parts[0]}  # the chunks' per-candidate scores as one
        if thumbs and not region:
            chosen = agreement_candidates(np.array([h.score for h in hits]), scores)
            found = self.store.find([hits[i].key for i in chosen], ["thumb"], version=version)
            greys = [grey_thumbnail(found[hits[i].key]["thumb"]) if hits[i].key in found else None for i in chosen]
            scores["agreement"] = top_agreement(len(hits), chosen, scores["transform"], query.grey, greys)
        final = fuse([h.score for h in hits], scores, method)
        pairs, _ = scores.pop("pairs", None), scores.pop("transform", None)
        reranked = [replace(h, score=float(final[i]),
                            scores={"first_stage": h.score, **{name: float(v[i]) for name, v in scores.items()}},
                            matches=[tuple(float(v) for v in row) for row in pairs[i]] if pairs and pairs[i] is not None else [])
                    for i, h in enumerate(hits)]
        ordered = sorted(reranked, key=lambda h: -h.score)
        return [replace(h, rank=rank) for rank, h in enumerate(ordered, 1)]

    def positional_prior(self):
        """The table's mean patch key per cell (rerank.positional_prior) over its first PRIOR_ROWS rows:
        computed once per table and kept beside its indexes (the region index is built with it), or
        once per Index where that folder cannot be written."""
        if self._prior is None:
            import torch

            from .rerank import positional_prior

            file = self.root / "ann" / f"prior-{self.store.meta.get('uuid', 'v1')}.pt"
            try:
                self._prior = torch.load(file, weights_only=True)
            except (OSError, RuntimeError, EOFError):
                sample = self._decode_dense(self.store.head(["dense"], PRIOR_ROWS))
                self._prior = positional_prior(self.embedder.backbone, self.conf.dense_layer, sample)
                try:
                    file.parent.mkdir(parents=True, exist_ok=True)
                    tmp = file.with_suffix(".tmp")
                    torch.save(self._prior, tmp)
                    tmp.replace(file)
                except OSError:
                    pass
        return self._prior

    # -- region search -----------------------------------------------------------------------
    @staticmethod
    def _region_scores(vi, cell_sets: list[np.ndarray]) -> dict[int, float]:
        """Row prefix -> best MaxSim over the query's cell sets (simsearch.region)."""
        from .region import CELL_K, PROBES, maxsim

        best: dict[int, float] = {}
        for cells in cell_sets:
            scores, ids = vi.search(cells, CELL_K, nprobe=PROBES)
            for row, score in maxsim(scores, ids).items():
                best[row] = max(score, best.get(row, 0.0))
        return best

    @property
    def region_index(self):
        """The region index (simsearch.region), followed like the vector indexes; built on first use."""
        if self._region is None:
            from .region import IVF_CELLS, RegionDescriber, RegionSource

            describer = RegionDescriber(self.embedder.backbone, self.conf.dense_layer, self.positional_prior())
            describe = lambda rows: describer.cells(self._decode_dense(rows), [(r["width"], r["height"]) for r in rows])  # noqa: E731
            source = RegionSource(describe=describe, d=describer.prior.shape[1])
            self._region = (describer, catchup.FollowedIndex(self.store, source, IVF_CELLS))
        return self._region

    def region_views(self, region: Image.Image) -> list[np.ndarray]:
        """A query region's dense tensors [(T_i, C)] at each side it is described at
        (region.RegionDescriber.query_sides), the index's input size first. In torch: compiled, its five
        sides would hold five sessions of the weights (~120 ms faster a query for DINOv2-S/14 at 224 px)."""
        return [self.embedder.dense_view(region, side, compiled=False)
                for side in self.region_index[0].query_sides(self.conf.image_size)]

    def search_region(self, image: str | Path | Image.Image, box: tuple[int, int, int, int], k: int = 10,
                      where: str | None = None, rerank: str | None = DEFAULT_RERANKER,
                      candidates: int | None = None) -> list[Hit]:
        """The images that contain the `box` (x0, y0, x1, y1, pixels) of `image`, even at 1/16 of their
        area or pasted into another picture: region cells retrieve `candidates` (None: region.CANDIDATES;
        simsearch.region), the reranker (verified by default; None: none) checks them against the region."""
        from .region import CELL_BITS, prefix_of
        from .rerank import RerankQuery

        candidates = rerank_candidates(candidates, region=True)
        self.check_query(k, "content", rerank, candidates)
        name = image if not isinstance(image, Image.Image) else "query image"
        img = self.load_query(image, full=True)
        box = check_box(box, img.size, name)
        region = img.crop(box)
        describer, followed = self.region_index
        vi = followed.get().vectors
        views = self.region_views(region)
        best = self._region_scores(vi, describer.cells_of_views(views, region.size))
        allowed = set(prefix_of(self.store.keys_where(where))) if where else None
        ranked = sorted((p for p in best if allowed is None or p in allowed), key=lambda p: -best[p])
        rows = {int(prefix_of(r["key"])): r for r in self.store.rows_by_prefix(
            ranked[:max(k, candidates)], CELL_BITS, ["path", "id"])}
        hits = [Hit(rank=i, score=best[p], path=rows[p]["path"], id=rows[p]["id"], key=rows[p]["key"])
                for i, p in enumerate((p for p in ranked if p in rows), 1)]
        if rerank is None or not hits:
            return hits[:k]
        query = RerankQuery(views[0], region.size, views[1:], region=True, grey=grey_thumbnail(region))
        hits = self.rerank(query, hits[:max(k, candidates)], rerank)[:k]
        x0, y0 = box[0], box[1]  # correspondences in the query image's pixels, not the region's
        return [replace(h, matches=[(qx + x0, qy + y0, hx, hy) for qx, qy, hx, hy in h.matches]) for h in hits]

    def search_vector(self, vector: np.ndarray, k: int, mode: str = "content", where: str | None = None) -> list[Hit]:
        """Nearest rows to `vector`, read at the table version the FAISS index reflects, so the hits
        are rows of one committed version (README, "What a reader sees"); ranks count only rows found
        (no gaps, should that version have been cleaned up meanwhile). With `where`, k hits whenever k
        rows match: a small matching set is scored exactly from its stored vectors (latest version),
        a large one searched with more IVF lists probed until k are found."""
        index = self.vector_index(mode)
        allowed = self.store.keys_where(where) if where else None
        if allowed is not None and len(allowed) == 0:
            return []
        if allowed is not None and index.kind != "flat" and len(allowed) <= ann.EXACT_FILTER_ROWS:
            keys, vectors = self.store.vectors_of(allowed, mode)
            scores = vectors @ np.asarray(vector, np.float32)
            top = np.argsort(-scores, kind="stable")[:k]
            scores, keys, version = scores[top][None], keys[top][None], None
        else:
            scores, keys, version = self.ann_indexes[mode].search(vector[None], k, allowed, nprobe=self.nprobe)
        pairs = [(float(s), int(key)) for s, key in zip(scores[0], keys[0]) if key >= 0]
        rows = self.store.find([key for _, key in pairs], ["path", "id"], version=version)
        kept = [(s, key) for s, key in pairs if key in rows]
        return [Hit(rank=i, score=s, path=rows[key]["path"], id=rows[key]["id"], key=key, table_version=version)
                for i, (s, key) in enumerate(kept, 1)]

    # -- state -------------------------------------------------------------------------------
    def count(self) -> int:
        return self.store.count()

    def info(self) -> dict:
        """Rows, configuration, index state and storage per image. Does not load the model."""
        if not self.store.exists():
            raise EmptyIndexError(f"{self.root}: no simsearch database here", db=self.root)
        meta = self.store.meta
        rows = self.count()
        tokens, dim = meta["dense_shape"]
        disk = self.store.disk_bytes()
        return {
            "db": str(self.root), "rows": rows, "table_version": self.store.version,
            "config": meta["config"], "weights": meta["weights"],
            "dense": {"shape": [tokens, dim],
                      "dtype": self.dense_format.name, "bytes_per_image": self.dense_format.nbytes},
            "disk_bytes": disk, "disk_bytes_per_image": disk // rows if rows else 0,
            "ann": {c: catchup.index_state(self.store, c) for c in VECTOR_COLUMNS},
            "runtime": {"requested": self.runtime, "auto_on_this_machine": (recorded_choice() or {}).get("choice", "not measured yet")},
        }

    def dense(self, keys) -> np.ndarray:
        """Stored dense tensors for `keys`, (len(keys), T, C) float32, in key order (MissingRowsError
        if a key is not in the table)."""
        return self._decode_dense(self.store.rows(keys, ["dense"]))

    def _decode_dense(self, rows: list[dict], as_stored: bool = False) -> np.ndarray:
        return self.dense_format.decode([r["dense"] for r in rows], as_stored)
