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

from . import ann
from .descriptors.codec import COMPACT_CODECS
from .backbones.runtime import check_runtime, recorded_choice
from .embedder import DescriptorConfig, Embedder
from .errors import ConfigMismatchError, EmptyIndexError, SimsearchError
from .images import _to_rgb, open_image
from .store import KEEP_VERSIONS, VECTOR_COLUMNS, ImageStore

MODES = VECTOR_COLUMNS  # "content", "style"
DENSE_CODECS = ("raw", *COMPACT_CODECS)
DEFAULT_DENSE_CODEC = "raw"
DEFAULT_DB = "simsearch.db"


@dataclass
class Hit:
    rank: int
    score: float
    path: str
    id: str
    key: int
    scores: dict[str, float] = field(default_factory=dict)  # per-stage scores when reranked

    def to_dict(self) -> dict:
        d = {"rank": self.rank, "score": round(self.score, 6), "path": self.path, "id": self.id}
        if self.scores:
            d["scores"] = {k: round(v, 6) for k, v in self.scores.items()}
        return d


def _local_or_name(name: str) -> str:
    """A local checkpoint (folder or file) is recorded as an absolute path, so the database works from
    any cwd; registry names and hub ids stay as they are."""
    from .backbones import MODELS

    path = Path(name).expanduser()
    return str(path.resolve()) if name not in MODELS and path.exists() else name


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
        simsearch.ann). `embedder` shares an already loaded model (its configuration must be this
        index's). `keep_versions`: how long old table versions stay on disk (time travel).
        `dense_codec`: how a new table stores dense tensors: "raw" (config.dense_dtype) or a compact
        learned codec "pca" (simsearch.descriptors.quant, <= 64 KB per image); an existing table keeps its own.
        `runtime`: how the model runs (simsearch.backbones.runtime: auto, torch, torch-bf16, onnx); any
        runtime queries a table built with any other.
        """
        self.root = Path(db).expanduser()
        self.store = ImageStore(self.root, keep_versions)
        self.store.codec_metric = self._dense_metric
        self.device = device
        self.runtime = check_runtime(runtime)
        self.ivf_threshold = ivf_threshold
        self.nprobe = nprobe
        self._ann: dict[str, ann.VectorIndex] = {}
        if dense_codec is not None and dense_codec not in DENSE_CODECS:
            raise SimsearchError(f"unknown dense codec '{dense_codec}' (choose from {', '.join(DENSE_CODECS)})")
        self.dense_codec = dense_codec
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
        if self.store.exists() and dense_codec not in (None, self.store.dense_format):
            raise ConfigMismatchError(f"{self.root} stores dense tensors as {self.store.dense_format}, not {dense_codec}")
        if embedder is not None and embedder.conf != self.conf:
            raise ConfigMismatchError(f"the shared embedder has {embedder.conf.describe()}, the index {self.conf.describe()}")
        self._embedder: Embedder | None = embedder

    def _check_config(self, stored: DescriptorConfig) -> DescriptorConfig:
        conf, overrides = self._requested
        wanted = conf or replace(stored, **overrides)
        if wanted != stored:
            raise ConfigMismatchError(
                f"{self.root} was built with {stored.describe()}; requested {wanted.describe()}. "
                f"Use another --db or the same configuration.")
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
                f"but those weights now fingerprint as {emb.fingerprint}; re-index into a new --db")

    def _dense_metric(self):
        """How a compact codec weighs coding errors: as the rerankers' attention projections see them."""
        return self.embedder.backbone.dense_metric(self.conf.dense_layer)

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
        if engine == "ray":
            from .indexers.distributed import index_with_ray

            return index_with_ray(self, folder, batch_size=batch_size, prune=prune, **kwargs)
        if engine != "local":
            raise SimsearchError(f"unknown engine '{engine}' (choose from local, ray)")
        from .indexers.local import index_folder

        report = index_folder(self, folder, batch_size=batch_size, prune=prune, **kwargs)
        self.compile_for_queries()
        return report

    def compile_for_queries(self) -> bool:
        """Cache this configuration's ONNX graph so later cold queries load neither torch nor the model's
        library (backbones.runtime); a no-op once it exists, on CUDA, or for models it does not cover."""
        try:
            return self.embedder.export_graph() is not None
        except (SimsearchError, RuntimeError, OSError) as e:  # a cache that cannot be written costs speed, not the index run
            import logging

            logging.getLogger(__name__).warning("no compiled query graph for %s: %s", self.conf.model, e)
            return False

    def refresh_ann(self) -> dict[str, bool]:
        """Bring every FAISS index up to the table's version (by the rows changed since the version
        it reflects, or a full rebuild when due). -> {column: rebuilt in full}"""
        self.store.refresh()
        return {column: self._load_ann(column) for column in VECTOR_COLUMNS}

    def vector_index(self, mode: str) -> ann.VectorIndex:
        """The FAISS index of `mode` ("content" or "style"), brought up to the table's version (while an index
        run holds the write lock, the last consistent one: see ann.load_fresh)."""
        current = self._ann.get(mode)
        if current is None or current.table_version != self.store.version:
            self._load_ann(mode, wait=False)  # during an index run: the last consistent index (ann.load_fresh)
        return self._ann[mode]

    def _load_ann(self, mode: str, wait: bool = True) -> bool:
        self._ann[mode], rebuilt = ann.load_fresh(self.store, mode, self.ivf_threshold, self._ann.get(mode), wait)
        self._ann[mode].nprobe = self.nprobe
        return rebuilt

    # -- search ------------------------------------------------------------------------------
    def embed_image(self, image: str | Path | Image.Image):
        emb = self.embedder
        if isinstance(image, Image.Image):  # prepared as the indexer prepares files
            img = _to_rgb(ImageOps.exif_transpose(image))
        else:
            img = open_image(Path(image).expanduser(), max_side=self.conf.image_size).image
        return emb.embed(emb.preprocess(img)[None])

    def search(self, image: str | Path | Image.Image, k: int = 10, mode: str = "content",
               where: str | None = None, rerank: str | None = None, candidates: int = 50) -> list[Hit]:
        """Top-k images like `image`. mode: "content" or "style"; where: a SQL filter on the table;
        rerank: "aas", "matches" or "both" reorders the first `candidates` hits (see simsearch.rerank)."""
        self.check_query(k, mode, rerank)
        emb = self.embed_image(image)
        return self.search_embedded(getattr(emb, mode)[0], emb.dense[0], k, mode, where, rerank, candidates)

    def check_query(self, k: int, mode: str = "content", rerank: str | None = None) -> None:
        """Refuse a query before any forward: unknown mode or reranker, k outside 1..rows."""
        if mode not in MODES:
            raise SimsearchError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
        n = self.count()
        if n == 0:
            raise EmptyIndexError(f"{self.root}: the index holds no images (run `simsearch index FOLDER --db {self.root}`)")
        if k < 1:
            raise SimsearchError(f"k must be at least 1 (got {k})")
        if k > n:
            raise SimsearchError(f"k={k} is larger than the {n} images in {self.root}; use -k {n} or less")
        if rerank is not None:
            from .rerank import RERANKERS

            if rerank not in RERANKERS:
                raise SimsearchError(f"unknown reranker '{rerank}' (choose from {', '.join(RERANKERS)})")

    def search_embedded(self, vector: np.ndarray, dense: np.ndarray | None, k: int = 10, mode: str = "content",
                        where: str | None = None, rerank: str | None = None, candidates: int = 50) -> list[Hit]:
        """`search` for a query already embedded: its `mode` vector and (to rerank) its dense tensor (T, C)."""
        if rerank is None:
            return self.search_vector(vector, k, mode, where)
        hits = self.search_vector(vector, max(k, min(candidates, self.count())), mode, where)
        return self.rerank(dense, hits, rerank)[:k]

    def stored_query(self, key: int, mode: str = "content") -> tuple[np.ndarray, np.ndarray]:
        """The `mode` vector and the dense tensor stored for row `key`, to search from an indexed
        image without its file (MissingRowsError when the row is gone)."""
        row = self.store.rows([key], [mode, "dense"])[0]
        return np.asarray(row[mode], dtype=np.float32), self._decode_dense([row])[0]

    def rerank(self, query_dense: np.ndarray, hits: list[Hit], method: str = "both") -> list[Hit]:
        """Reorder `hits` by a second-stage score computed from the stored dense tensors. Hits whose
        rows were deleted since the search are dropped, so no score lands on another hit."""
        from .rerank import rerank_scores

        found = self.store.find([h.key for h in hits], ["dense"])
        hits = [h for h in hits if h.key in found]
        if not hits:
            return hits
        dense = self._decode_dense([found[h.key] for h in hits])
        scores = rerank_scores(self.embedder.backbone, self.conf.dense_layer, query_dense, dense, method)
        for i, h in enumerate(hits):
            h.scores = {"first_stage": h.score, **{name: float(v[i]) for name, v in scores.items() if name != "score"}}
            h.score = float(scores["score"][i])
        ordered = sorted(hits, key=lambda h: -h.score)
        for rank, h in enumerate(ordered, 1):
            h.rank = rank
        return ordered

    def search_vector(self, vector: np.ndarray, k: int, mode: str = "content", where: str | None = None) -> list[Hit]:
        """Nearest rows to `vector`; ranks count only rows still in the table (no gaps). With `where`,
        k hits whenever k rows match: a small matching set is scored exactly from its stored vectors,
        a large one searched with more IVF lists probed until k are found."""
        index = self.vector_index(mode)
        allowed = self.store.keys_where(where) if where else None
        if allowed is not None and len(allowed) == 0:
            return []
        if allowed is not None and index.kind != "flat" and len(allowed) <= ann.EXACT_FILTER_ROWS:
            keys, vectors = self.store.vectors_of(allowed, mode)
            scores = vectors @ np.asarray(vector, np.float32)
            top = np.argsort(-scores, kind="stable")[:k]
            scores, keys = scores[top][None], keys[top][None]
        else:
            scores, keys = index.search(vector[None], k, allowed)
        pairs = [(float(s), int(key)) for s, key in zip(scores[0], keys[0]) if key >= 0]
        rows = self.store.find([key for _, key in pairs], ["path", "id"])
        kept = [(s, key) for s, key in pairs if key in rows]
        return [Hit(rank=i, score=s, path=rows[key]["path"], id=rows[key]["id"], key=key)
                for i, (s, key) in enumerate(kept, 1)]

    # -- state -------------------------------------------------------------------------------
    def count(self) -> int:
        return self.store.count()

    def info(self) -> dict:
        """Rows, configuration, index state and storage per image. Does not load the model."""
        if not self.store.exists():
            raise EmptyIndexError(f"{self.root}: no simsearch database here")
        meta = self.store.meta
        rows = self.count()
        tokens, dim = meta["dense_shape"]
        disk = self.store.disk_bytes()
        return {
            "db": str(self.root), "rows": rows, "table_version": self.store.version,
            "config": meta["config"], "weights": meta["weights"],
            "dense": {"shape": [tokens, dim],
                      "dtype": self.conf.dense_dtype if self.store.dense_format == "raw" else self.store.dense_format,
                      "bytes_per_image": self.store.dense_nbytes()},
            "disk_bytes": disk, "disk_bytes_per_image": disk // rows if rows else 0,
            "ann": {c: ann.index_state(self.store, c) for c in VECTOR_COLUMNS},
            "runtime": {"requested": self.runtime, "auto_on_this_machine": (recorded_choice() or {}).get("choice", "not measured yet")},
        }

    def dense(self, keys) -> np.ndarray:
        """Stored dense tensors for `keys`, (len(keys), T, C) float32, in key order (MissingRowsError
        if a key is not in the table)."""
        return self._decode_dense(self.store.rows(keys, ["dense"]))

    def _decode_dense(self, rows: list[dict]) -> np.ndarray:
        return self.store.decode_dense([r["dense"] for r in rows])
