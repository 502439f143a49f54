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

import numpy as np
from PIL import Image

from ..errors import SimsearchError
from ..images import open_image
from ..index import Index

QUERY_THUMB = 256  # side of the uploaded query kept for match pictures (as `query --html` draws it)
MATCH_HEIGHT = 256


class UploadTooLarge(SimsearchError):
    """A request body or uploaded file over the server's limit."""


class UnknownQuery(SimsearchError):
    """A query id the server no longer remembers."""


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
        self._dedup = None  # ((table version, threshold, folder), the last DedupResult)
        if warm:
            self.warm_up()

    def warm_up(self) -> None:
        """Load the model and both FAISS indexes and run one forward, so the first query is as fast as any."""
        self.index.info()  # refuses a missing database
        with self.model_lock:
            self.index.embed_image(Image.new("RGB", (self.index.conf.image_size,) * 2, "gray"))
            self.index.embedder.backbone  # reranking and match pictures need the model itself, not only the query graph
        self.index.refresh_ann()

    # -- searches ----------------------------------------------------------------------------
    def search_upload(self, data: bytes, filename: str, mode: str, k: int, rerank: str | None,
                      candidates: int, where: str | None) -> dict:
        """Decode, embed and search an uploaded image; its dense tensor is remembered under the
        returned query id for match pictures."""
        if len(data) > self.max_upload_bytes:
            raise UploadTooLarge(f"{filename}: {len(data):,} bytes exceeds the {self.max_upload_bytes:,}-byte upload limit")
        self.index.check_query(k, mode, rerank)
        t0 = time.perf_counter()
        with self.decode_slots:
            image = open_image(data, max_side=self.index.conf.image_size, name=filename).image
        t1 = time.perf_counter()
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
        return self._result({"id": qid, "key": None}, mode, k, rerank, candidates, where, hits,
                            decode=t1 - t0, queue=t_model - t1, forward=t2 - t_model, search=t3 - t2)

    def search_key(self, key: int, mode: str, k: int, rerank: str | None, candidates: int, where: str | None) -> dict:
        """Search from an indexed image's stored vectors (no file, no forward)."""
        self.index.check_query(k, mode, rerank)
        t0 = time.perf_counter()
        vector, dense = self.index.stored_query(key, mode)
        hits = self._search(vector, dense, mode, k, rerank, candidates, where)
        return self._result({"id": None, "key": str(key)}, mode, k, rerank, candidates, where, hits,
                            search=time.perf_counter() - t0)

    def _search(self, vector, dense, mode, k, rerank, candidates, where):
        if rerank is None:
            return self.index.search_embedded(vector, dense, k, mode, where)
        with self.model_lock:
            return self.index.search_embedded(vector, dense, k, mode, where, rerank, candidates)

    def _result(self, query: dict, mode, k, rerank, candidates, where, hits, **seconds) -> dict:
        # Keys are 63-bit: sent as strings, which JavaScript keeps exact.
        return {"query": {**query, "mode": mode, "k": k, "rerank": rerank or "none", "candidates": candidates,
                          "where": where},
                "hits": [{**h.to_dict(), "key": str(h.key)} for h in hits],
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
