"""What the server does per request, with no HTTP in it: one warm `Index`, one model lock, and a
small memory of recent uploaded queries.

Torch work (forward, rerank, correspondence pictures) runs behind one lock: on a CPU two forwards at
once only share the same cores, and one at a time keeps latency even. Decoding, FAISS and LanceDB
reads run outside it, on the caller's thread (Starlette's threadpool). Each read sees the table's
latest commit and the FAISS index is rebuilt when that version moves, so queries see another
process's `simsearch index` commits as they land, never a half-written one.
"""

from __future__ import annotations

import io
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import SimsearchError
from ..images import open_image
from ..index import Index, check_box, rerank_candidates
from ..rerank import DEFAULT_RERANKER

FOLDER_CACHE = 32  # folder summaries kept (per table version and folder)
FOLDERS_SHOWN = 500  # subfolders listed per folder (by name); the rest are counted
QUERY_THUMB = 256  # side of the uploaded query kept for match pictures (as `query --html` draws it)
MATCH_HEIGHT = 256


class UploadTooLarge(SimsearchError):
    """A request body or uploaded file over the server's limit."""


class UnknownQuery(SimsearchError):
    """A query id the server no longer remembers."""


def _folder(under: str | None) -> str | None:
    """A folder as stored paths spell it (no trailing slash), or None for everything."""
    if not under or not under.strip():
        return None
    return under.rstrip("/") or "/"


def folder_summary(batches, under: str | None, max_folders: int = FOLDERS_SHOWN) -> dict:
    """The folder that holds every path of `batches` (Arrow batches of one string column, all below
    `under` when given), how many paths lie in it and below each of its subfolders. Two passes over
    the batches: the common folder is the common prefix of the smallest and largest path."""
    import pyarrow.compute as pc

    low = high = None
    for batch in batches():
        bounds = pc.min_max(batch.column(0))
        if bounds["min"].is_valid:
            low = min(low, bounds["min"].as_py()) if low is not None else bounds["min"].as_py()
            high = max(high, bounds["max"].as_py()) if high is not None else bounds["max"].as_py()
    if low is None:
        return {"folder": under, "images": 0, "here": 0, "folders": [], "more_folders": 0}
    common = []
    for a, b in zip(low.split("/")[:-1], high.split("/")[:-1]):  # folders only, never the file name
        if a != b:
            break
        common.append(a)
    folder = "/".join(common) or "/"
    prefix = folder.rstrip("/") + "/"
    counts: dict[str, int] = {}
    total = here = 0
    for batch in batches():
        rest = pc.utf8_slice_codeunits(batch.column(0), len(prefix))
        nested = pc.match_substring(rest, "/")
        total += len(rest)
        here += len(rest) - (pc.sum(nested).as_py() or 0)
        heads = pc.list_element(pc.split_pattern(pc.filter(rest, nested), "/", max_splits=1), 0)
        for item in pc.value_counts(heads).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    names = sorted(counts)
    return {"folder": folder, "images": total, "here": here, "more_folders": max(len(names) - max_folders, 0),
            "folders": [{"path": prefix + n, "name": n, "images": counts[n]} for n in names[:max_folders]]}


@dataclass
class Query:
    dense: np.ndarray  # (T, C) hidden state entering the dense layer
    thumb: Image.Image


class QueryCache:
    """The last `size` uploaded queries by random id (least recently used goes first), so a match
    picture needs no second upload. Thread-safe."""

    def __init__(self, size: int = 64):
        self.size = size
        self._items: OrderedDict[str, Query] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, query: Query) -> str:
        qid = secrets.token_urlsafe(12)
        with self._lock:
            self._items[qid] = query
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return qid

    def get(self, qid: str) -> Query:
        with self._lock:
            query = self._items.get(qid)
            if query is None:
                raise UnknownQuery(f"query '{qid[:40]}' is unknown or expired (the server keeps the last "
                                   f"{self.size}); search again")
            self._items.move_to_end(qid)
            return query


class SearchService:
    def __init__(self, index: Index, max_upload_bytes: int = 20 << 20, query_cache: int = 64, warm: bool = True):
        self.index = index
        self.max_upload_bytes = max_upload_bytes
        self.queries = QueryCache(query_cache)
        self.model_lock = threading.Lock()
        self.decode_slots = threading.BoundedSemaphore(2)  # a full-size decode can take hundreds of MB
        self._folders: OrderedDict[tuple[int, str | None], dict] = OrderedDict()
        self._folders_lock = threading.Lock()
        self._dedup = None  # ((table version, threshold, folder), the last DedupResult)
        if warm:
            self.warm_up()

    def warm_up(self) -> None:
        """Load the model and both FAISS indexes and run one forward, so the first query is as fast as any."""
        self.index.info()  # refuses a missing database
        with self.model_lock:
            self.index.embed_image(Image.new("RGB", (self.index.conf.image_size,) * 2, "gray"))
            self.index.embedder.backbone  # reranking and match pictures need the model itself, not only the query graph
            for side in self.index.view_sides():  # and a verified query its views' runners
                self.index.embedder.view_runner(side)
        self.index.refresh_ann()

    # -- searches ----------------------------------------------------------------------------
    def search_upload(self, data: bytes, filename: str, mode: str, k: int, rerank: str | None,
                      candidates: int | None, where: str | None, box: str | None = None) -> dict:
        """Decode, embed and search an uploaded image (or, with `box` "x0,y0,x1,y1" in its pixels,
        that region of it); its dense tensor is remembered under the returned query id for match pictures."""
        if len(data) > self.max_upload_bytes:
            raise UploadTooLarge(f"{filename}: {len(data):,} bytes exceeds the {self.max_upload_bytes:,}-byte upload limit")
        candidates = rerank_candidates(candidates, region=bool(box))
        self.index.check_query(k, mode, rerank, candidates)
        t0 = time.perf_counter()
        with self.decode_slots:  # a region's box is in the file's pixels: decode it whole then
            loaded = open_image(data, max_side=None if box else self.index.conf.image_size, name=filename)
        image = loaded.image
        region = check_box(box, (loaded.width, loaded.height), filename) if box else None
        t1 = time.perf_counter()
        if region:
            with self.model_lock:
                hits = self.index.search_region(image, region, k, where, rerank or DEFAULT_RERANKER, candidates)
            shape = {"width": loaded.width, "height": loaded.height, "frame": list(image.size), "box": region}
            return self._result({"id": None, "key": None, **shape}, "content", k, rerank or DEFAULT_RERANKER, candidates, where, hits,
                                decode=t1 - t0, search=time.perf_counter() - t1)
        with self.model_lock:
            t_model = time.perf_counter()
            emb = self.index.embed_image(image)
            query = self.index.rerank_query(image, emb.dense[0], rerank) if rerank else emb.dense[0]
        t2 = time.perf_counter()
        hits = self._search(getattr(emb, mode)[0], query, mode, k, rerank, candidates, where)
        t3 = time.perf_counter()
        thumb = image.copy()
        thumb.thumbnail((QUERY_THUMB, QUERY_THUMB))
        qid = self.queries.put(Query(emb.dense[0], thumb))  # only a query that answered is remembered
        shape = {"width": loaded.width, "height": loaded.height, "frame": list(image.size), "box": region}
        return self._result({"id": qid, "key": None, **shape}, mode, k, rerank, candidates, where, hits,
                            decode=t1 - t0, queue=t_model - t1, forward=t2 - t_model, search=t3 - t2)

    def search_key(self, key: int, mode: str, k: int, rerank: str | None, candidates: int | None, where: str | None,
                   box: str | None = None) -> dict:
        """Search from an indexed image's stored vectors (no file, no forward), or from the region
        `box` "x0,y0,x1,y1" (pixels of that image's file)."""
        candidates = rerank_candidates(candidates, region=bool(box))
        self.index.check_query(k, mode, rerank, candidates)
        t0 = time.perf_counter()
        size = self.index.store.rows([key], ["width", "height", "path"])[0]
        region = check_box(box, (size["width"], size["height"]), f"image {key}") if box else None
        if region:  # the table's own file (never a path from the request), whole
            image = open_image(Path(size["path"])).image
            with self.model_lock:
                hits = self.index.search_region(image, region, k, where, rerank or DEFAULT_RERANKER, candidates)
            shape = {"width": size["width"], "height": size["height"], "frame": [size["width"], size["height"]], "box": region}
            return self._result({"id": None, "key": str(key), **shape}, "content", k, rerank or DEFAULT_RERANKER, candidates, where, hits,
                                search=time.perf_counter() - t0)
        vector, dense = self.index.stored_query(key, mode)
        hits = self._search(vector, dense, mode, k, rerank, candidates, where)
        shape = {"width": size["width"], "height": size["height"], "frame": [size["width"], size["height"]], "box": region}
        return self._result({"id": None, "key": str(key), **shape}, mode, k, rerank, candidates, where, hits,
                            search=time.perf_counter() - t0)

    def _search(self, vector, dense, mode, k, rerank, candidates, where):
        if rerank is None:
            return self.index.search_embedded(vector, dense, k, mode, where)
        with self.model_lock:
            return self.index.search_embedded(vector, dense, k, mode, where, rerank, candidates)

    def _result(self, query: dict, mode, k, rerank, candidates, where, hits, **seconds) -> dict:
        """The JSON of a search. `query.frame` is the (width, height) its correspondences' query points
        are in (an upload is decoded at reduced size; `query.width`/`height` are the file's pixels),
        each hit's `width`/`height` the frame of its points."""
        # Keys are 63-bit: sent as strings, which JavaScript keeps exact.
        sizes = self.index.store.find([h.key for h in hits], ["width", "height"])
        return {"query": {**query, "mode": mode, "k": k, "rerank": rerank or "none", "candidates": candidates,
                          "where": where},
                "hits": [{**h.to_dict(), "key": str(h.key), "width": sizes.get(h.key, {}).get("width"),
                          "height": sizes.get(h.key, {}).get("height")} for h in hits],
                "ms": {name: round(1000 * s, 1) for name, s in seconds.items()}}

    def dedup(self, threshold: float | None, under: str | None, limit: int, offset: int) -> dict:
        """Duplicate groups (simsearch.dedup.find_duplicates), `limit` of them from `offset`. Verifying new
        pairs uses the model: behind the model lock. The last result is kept for its table version,
        threshold and folder, so paging through it reads nothing again."""
        from ..dedup import find_duplicates

        with self.model_lock:
            memo = (self.index.store.version, threshold, under)
            if self._dedup is None or self._dedup[0] != memo:
                self._dedup = memo, find_duplicates(self.index, under=under, threshold=threshold)
            return self._dedup[1].to_dict(limit, offset)

    # -- the collection ----------------------------------------------------------------------
    def images(self, offset: int, limit: int, under: str | None = None, order: str = "newest") -> dict:
        """A page of the indexed images, most recently indexed first ("newest") or in indexing order
        ("oldest"), all or those below the folder `under`; reads only the page's rows."""
        under = _folder(under)
        rows, total = self.index.store.catalog_page(offset, limit, under, newest=order == "newest")
        return {"images": [{"key": str(r["key"]), "path": r["path"], "width": r["width"], "height": r["height"],
                            "bytes": r["size"], "mtime": r["mtime_ns"] / 1e9} for r in rows],
                "total": total, "offset": offset, "limit": limit, "under": under, "order": order}

    def folders(self, under: str | None = None) -> dict:
        """The folder holding every image below `under` (the whole table when None), with its
        subfolders and their image counts. Reads the catalog's paths below `under`, once per table version."""
        from ..store import CATALOG, under_filter

        under = _folder(under)
        version = self.index.store.version
        with self._folders_lock:
            cached = self._folders.get((version, under))
        if cached is not None:
            return cached
        if not self.index.store.has_table(CATALOG):
            self.index.store.catalog  # a format 1 database: built from the payload first
        filter = under_filter(under) if under else None
        summary = folder_summary(lambda: self.index.store.reader(CATALOG).to_batches(columns=["path"], filter=filter), under)
        with self._folders_lock:
            self._folders[(version, under)] = summary
            while len(self._folders) > FOLDER_CACHE:
                self._folders.popitem(last=False)
        return summary

    # -- pictures ----------------------------------------------------------------------------
    def thumbnail(self, key: int) -> tuple[bytes, str]:
        """The stored JPEG thumbnail of row `key` and the row's content id (its ETag)."""
        row = self.index.store.rows([key], ["thumb", "id"])[0]
        return row["thumb"], row["id"]

    def match_png(self, key: int, query_id: str | None = None, query_key: int | None = None, n: int = 8) -> bytes:
        """The query (an uploaded one by id, or an indexed one by key) and row `key` side by side with
        their correspondences, as PNG."""
        from ..report import match_picture

        if (query_id is None) == (query_key is None):
            raise SimsearchError("give exactly one of query_id (an uploaded query) or query_key (an indexed image)")
        if query_id is not None:
            query = self.queries.get(query_id)
        else:
            query = Query(self.index.dense([query_key])[0], self._thumb_image(query_key))
        hit_dense, hit_image = self.index.dense([key])[0], self._thumb_image(key)
        with self.model_lock:
            picture = match_picture(self.index, query.dense, query.thumb, hit_dense, hit_image, n, height=MATCH_HEIGHT)
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        return buf.getvalue()

    def _thumb_image(self, key: int) -> Image.Image:
        return Image.open(io.BytesIO(self.thumbnail(key)[0])).convert("RGB")

    def info(self) -> dict:
        import torch

        from ..rerank import RERANKERS

        return {**self.index.info(),
                "server": {"max_upload_bytes": self.max_upload_bytes, "query_cache": self.queries.size,
                           "modes": ["content", "style"], "rerankers": ["none", *RERANKERS],
                           "device": str(self.index.embedder.device), "torch_threads": torch.get_num_threads()}}
