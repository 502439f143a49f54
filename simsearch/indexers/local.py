"""Streaming folder indexer on one machine.

Three stages overlap so the model never waits on the disk:
  reader threads   stat -> read bytes -> hash -> decode -> resize   (bounded prefetch window)
  main thread      batch -> backbone forward
  writer thread    rows -> dense tensors encoded in the table's format -> store.put every `write_rows`
                   rows (appends; deletes only replaced keys)
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

from ..descriptors.codec import decode_dense, encode_dense
from ..errors import ImageError
from ..images import iter_image_files, open_image, thumbnail_jpeg
from ..paths import is_under, normalize
from ..store import make_rows, path_key, row_schema
from . import check_source

WIRE_DTYPE = "float16"  # how embedded rows carry dense tensors until `encode_rows` (and back from Ray workers)


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
class Stat:
    """What the catalog compares: a file's size and mtime."""
    path: str
    size: int
    mtime_ns: int


@dataclass
class Prepared:
    """An image read, hashed, decoded and made into model input: everything a row needs but the model."""
    path: str
    key: int
    id: str
    size: int
    mtime_ns: int
    width: int
    height: int
    pixels: np.ndarray  # (3, S, S) float32 model input
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
    root = check_source(folder)
    return index_files(index, iter_image_files(root), batch_size, under=root, prune=prune, **kwargs)


# -- the stages both indexers share (this one and indexers.distributed) -------------------------
def known_files(store, paths: list[str], under: str | None) -> dict[str, tuple[str, int, int]]:
    """The catalog's rows for `paths`: read by folder (path index) or by key, never the whole table."""
    return store.files(under) if under is not None else store.files_of(paths)


@dataclass
class Run:
    """One index run's shared state: the files to read, what the catalog knows, the report so far."""
    index: object
    paths: list[str]
    known: dict[str, tuple[str, int, int]]
    todo: list[Stat]
    report: IndexReport
    advance: Callable[[int], None]


def begin(index, stats: list[Stat | tuple[str, str]], under: str | None,
          on_total: Callable[[int], None] | None, on_advance: Callable[[int], None] | None) -> Run:
    """Create or check the table, read the catalog's part for these files, plan what to read."""
    paths = [s.path if isinstance(s, Stat) else s[0] for s in stats]
    if on_total:
        on_total(len(paths))
    advance = on_advance or (lambda n: None)
    report = IndexReport()
    index.embedder  # loads the model and checks its weights against the table's
    known = known_files(index.ensure_table(), paths, under)
    return Run(index, paths, known, plan(stats, known, report, advance), report, advance)


def plan(stats: Iterable[Stat | tuple[str, str]], known: dict, report: IndexReport,
         advance: Callable[[int], None]) -> list[Stat]:
    """The files to read: those whose size or mtime differ from the catalog. `stats` holds a Stat per
    file, or (path, reason) for one that cannot be used."""
    todo = []
    for st in stats:
        if not isinstance(st, Stat):
            report.failed.append(st)
            advance(1)
            continue
        old = known.get(st.path)
        if old is not None and (old[1], old[2]) == (st.size, st.mtime_ns):
            report.skipped += 1  # fast path: same size and mtime
            advance(1)
        else:
            todo.append(st)
    return todo


def local_stat(path: str) -> Stat | tuple[str, str]:
    try:
        path.encode("utf-8")  # the table stores UTF-8 text
        st = os.stat(path)
    except UnicodeEncodeError:
        return path, "file name is not valid UTF-8"
    except OSError as e:
        return path, e.strerror or str(e)
    if not stat.S_ISREG(st.st_mode):  # reading a FIFO blocks forever, a device never ends
        return path, "not a regular file"
    return Stat(path, st.st_size, st.st_mtime_ns)


def prepare(st: Stat, data: bytes, known_id: str | None, embedder) -> Prepared | str | ImageError:
    """One file's bytes -> Prepared, "unchanged" (same content as catalogued), or the ImageError."""
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if known_id == digest:
        return "unchanged"
    try:
        loaded = open_image(data, max_side=embedder.conf.image_size, name=st.path)
    except ImageError as e:
        return e
    return Prepared(path=st.path, key=path_key(st.path), id=digest, size=st.size, mtime_ns=st.mtime_ns,
                    width=loaded.width, height=loaded.height, pixels=embedder.preprocess(loaded.image),
                    thumb=thumbnail_jpeg(loaded.image), is_update=known_id is not None)


def embed_rows(embedder, batch: list[Prepared]) -> pa.Table:
    """Prepared images -> their rows, dense tensors as WIRE_DTYPE bytes (one model forward for the batch)."""
    if not batch:
        return row_schema(embedder.dims["content"], embedder.dims["style"]).empty_table()
    emb = embedder.embed(np.stack([b.pixels for b in batch]))
    return make_rows([b.path for b in batch], emb.content, emb.style, [encode_dense(d, WIRE_DTYPE) for d in emb.dense],
                     ids=[b.id for b in batch], sizes=[b.size for b in batch], mtimes=[b.mtime_ns for b in batch],
                     widths=[b.width for b in batch], heights=[b.height for b in batch], thumbs=[b.thumb for b in batch])


def encode_rows(index, rows: pa.Table) -> pa.Table:
    """Embedded rows -> the rows `store.put` writes: dense tensors in the table's format (`Index.encode_dense`)."""
    fmt = index.dense_format
    if fmt.kind == "raw" and fmt.dtype == WIRE_DTYPE:
        return rows
    x = np.stack([decode_dense(b, fmt.tokens, fmt.dim, WIRE_DTYPE) for b in rows.column("dense").to_pylist()])
    return rows.set_column(rows.schema.get_field_index("dense"), "dense", pa.array(index.encode_dense(x), pa.binary()))


def writer(index) -> "_Writer":
    """The background committer both indexers use: encode, then put."""
    return _Writer(lambda rows: index.store.put(encode_rows(index, rows)))


def finish(run: Run, touched: dict[str, tuple[int, int]], under: str | None, prune: bool, t0: float) -> IndexReport:
    """After the rows are written: record touched files, prune, compact, bring the FAISS indexes up."""
    index, report, known, paths = run.index, run.report, run.known, run.paths
    store = index.store
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


def index_files(index, files: Iterable[str | Path], batch_size: int = 16, under: Path | None = None,
                prune: bool = False, workers: int = 2, write_rows: int = 256,
                on_total: Callable[[int], None] | None = None,
                on_advance: Callable[[int], None] | None = None) -> IndexReport:
    """Index the given image files (see index_folder). `under`: the folder they all lie in, so only
    its part of the catalog is read (and, with `prune`, its vanished files removed)."""
    t0 = time.perf_counter()
    paths = list(dict.fromkeys(normalize(p) for p in files))  # one spelling per file, so one row per file
    run = begin(index, [local_stat(p) for p in paths], normalize(under) if under is not None else None, on_total, on_advance)
    known, todo, report, advance, embedder = run.known, run.todo, run.report, run.advance, index.embedder
    touched: dict[str, tuple[int, int]] = {}

    def read_and_prepare(st: Stat) -> Prepared | str | ImageError:
        try:
            with open(st.path, "rb") as f:
                data = f.read()
        except OSError as e:
            return ImageError(st.path, e.strerror or str(e))
        result = prepare(st, data, known.get(st.path, (None,))[0], embedder)
        if result == "unchanged":
            touched[st.path] = (st.size, st.mtime_ns)  # identical content: record the new stat
        return result

    pending_rows: list[pa.Table] = []
    pending_count = 0
    commits = writer(index)

    def flush():
        nonlocal pending_rows, pending_count
        if pending_rows:
            commits.put(pa.concat_tables(pending_rows))
            pending_rows, pending_count = [], 0

    def embed_batch(batch: list[Prepared]):
        nonlocal pending_count
        t = time.perf_counter()
        pending_rows.append(embed_rows(embedder, batch))
        report.embedded_seconds += time.perf_counter() - t
        pending_count += len(batch)
        report.added += sum(not b.is_update for b in batch)
        report.updated += sum(b.is_update for b in batch)
        if pending_count >= write_rows:
            flush()
        advance(len(batch))

    try:
        batch: list[Prepared] = []
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simsearch-read") as pool:
            for result in _ordered_map(read_and_prepare, todo, pool, window=2 * batch_size + workers):
                if isinstance(result, Prepared):
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
            commits.close()

    return finish(run, touched, under, prune, t0)
