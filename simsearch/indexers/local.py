"""Streaming folder indexer on one machine.

Three stages overlap so the model never waits on the disk:
  reader threads   stat -> read bytes -> hash -> decode -> resize   (bounded prefetch window)
  main thread      batch -> backbone forward
  writer thread    rows -> store.put every `write_rows` rows (appends; deletes only replaced keys)
Memory stays flat: at most `prefetch` decoded images and two pending writes exist at any time.
Ctrl-C commits every row already embedded before it stops; a killed run loses at most the rows not
yet committed, and the next run skips what was committed.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from ..descriptors.codec import encode_dense
from ..errors import ImageError
from ..images import iter_image_files, open_image, thumbnail_jpeg
from ..paths import is_under, normalize
from ..store import path_key


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    skipped: int = 0
    pruned: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0
    embedded_seconds: float = 0.0  # time inside the model forward

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


@dataclass
class _Prepared:
    path: str
    key: int
    id: str
    size: int
    mtime_ns: int
    width: int
    height: int
    pixels: torch.Tensor
    thumb: bytes
    is_update: bool


def _ordered_map(fn: Callable, items: Iterable, pool: ThreadPoolExecutor, window: int) -> Iterator:
    """Like pool.map, but never more than `window` results in flight (pool.map submits everything)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _Writer(threading.Thread):
    """Commits row batches in the background; errors surface on `close()`."""

    def __init__(self, write: Callable[[pa.Table], None]):
        super().__init__(daemon=True, name="simsearch-writer")
        self.write = write
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.start()

    def run(self):
        while (table := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(table)
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    self.error = e

    def put(self, table: pa.Table):
        if self.error:
            raise self.error
        self.queue.put(table)

    def close(self):
        self.queue.put(None)
        self.join()
        if self.error:
            raise self.error


def index_folder(index, folder: str | Path, batch_size: int = 16, prune: bool = False, **kwargs) -> IndexReport:
    """Index every image under `folder` into `index` (a `simsearch.Index`). Incremental and resumable.
    `prune` removes rows of files under `folder` that no longer exist."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise ImageError(root, "no such file or directory")
    return index_files(index, iter_image_files(root), batch_size, under=root, prune=prune, **kwargs)


def index_files(index, files: Iterable[str | Path], batch_size: int = 16, under: Path | None = None,
                prune: bool = False, workers: int = 2, write_rows: int = 256,
                on_total: Callable[[int], None] | None = None,
                on_advance: Callable[[int], None] | None = None) -> IndexReport:
    """Index the given image files (see index_folder). `under`: the folder they all lie in, so only
    its part of the catalog is read (and, with `prune`, its vanished files removed)."""
    t0 = time.perf_counter()
    paths = list(dict.fromkeys(normalize(p) for p in files))  # one spelling per file, so one row per file
    if on_total:
        on_total(len(paths))
    advance = on_advance or (lambda n: None)
    report = IndexReport()
    embedder = index.embedder
    store = index.ensure_table()
    known = store.files(normalize(under) if under is not None else None)

    todo: list[tuple[str, os.stat_result]] = []
    for p in paths:
        try:
            p.encode("utf-8")  # the table stores UTF-8 text
            st = os.stat(p)
        except UnicodeEncodeError:
            report.failed.append((p, "file name is not valid UTF-8"))
            advance(1)
            continue
        except OSError as e:
            report.failed.append((p, e.strerror or str(e)))
            advance(1)
            continue
        if not stat.S_ISREG(st.st_mode):  # reading a FIFO blocks forever, a device never ends
            report.failed.append((p, "not a regular file"))
            advance(1)
            continue
        old = known.get(p)
        if old is not None and (old[1], old[2]) == (st.st_size, st.st_mtime_ns):
            report.skipped += 1  # fast path: same size and mtime
            advance(1)
        else:
            todo.append((p, st))

    touched: dict[str, tuple[int, int]] = {}

    def prepare(item: tuple[str, os.stat_result]) -> _Prepared | str | ImageError:
        path, st = item
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return ImageError(path, e.strerror or str(e))
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        old = known.get(path)
        if old is not None and old[0] == digest:
            touched[path] = (st.st_size, st.st_mtime_ns)  # identical content: record the new stat
            return "unchanged"
        try:
            loaded = open_image(data, max_side=embedder.conf.image_size, name=path)
        except ImageError as e:
            return e
        return _Prepared(path=path, key=path_key(path), id=digest, size=st.st_size, mtime_ns=st.st_mtime_ns,
                         width=loaded.width, height=loaded.height, pixels=embedder.preprocess(loaded.image),
                         thumb=thumbnail_jpeg(loaded.image), is_update=old is not None)

    pending_rows: list[pa.Table] = []
    pending_count = 0
    writer = _Writer(store.put)

    def flush():
        nonlocal pending_rows, pending_count
        if pending_rows:
            writer.put(pa.concat_tables(pending_rows))
            pending_rows, pending_count = [], 0

    def embed_batch(batch: list[_Prepared]):
        nonlocal pending_count
        t = time.perf_counter()
        emb = embedder.embed(torch.stack([b.pixels for b in batch]))
        report.embedded_seconds += time.perf_counter() - t
        dtype = embedder.conf.dense_dtype
        pending_rows.append(pa.table({
            "key": pa.array([b.key for b in batch], pa.int64()),
            "id": [b.id for b in batch],
            "path": [b.path for b in batch],
            "size": pa.array([b.size for b in batch], pa.int64()),
            "mtime_ns": pa.array([b.mtime_ns for b in batch], pa.int64()),
            "width": pa.array([b.width for b in batch], pa.int32()),
            "height": pa.array([b.height for b in batch], pa.int32()),
            "content": _fixed_list(emb.content),
            "style": _fixed_list(emb.style),
            "dense": pa.array([encode_dense(d, dtype) for d in emb.dense], pa.binary()),
            "thumb": pa.array([b.thumb for b in batch], pa.binary()),
        }))
        pending_count += len(batch)
        report.added += sum(not b.is_update for b in batch)
        report.updated += sum(b.is_update for b in batch)
        if pending_count >= write_rows:
            flush()
        advance(len(batch))

    try:
        batch: list[_Prepared] = []
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simsearch-read") as pool:
            for result in _ordered_map(prepare, todo, pool, window=2 * batch_size + workers):
                if isinstance(result, _Prepared):
                    batch.append(result)
                    if len(batch) == batch_size:
                        embed_batch(batch)
                        batch = []
                    continue
                if isinstance(result, ImageError):
                    report.failed.append((result.path, result.reason))
                else:
                    report.skipped += 1
                advance(1)
            if batch:
                embed_batch(batch)
    finally:
        try:
            flush()  # rows already embedded are paid for: commit them, also on Ctrl-C
        finally:
            writer.close()

    store.touch(touched)
    if prune and under is not None:
        scanned, folder = set(paths), normalize(under)
        gone = [p for p in known if is_under(p, folder) and p not in scanned]
        store.delete_paths(gone)
        store.sweep(folder)
        report.pruned = len(gone)
    if report.embedded or report.pruned:
        store.compact()
    index.refresh_ann()
    report.seconds = time.perf_counter() - t0
    return report


def _fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
