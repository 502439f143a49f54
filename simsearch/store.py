"""The LanceDB store: the source of truth.

Three tables (format 2):
- `images`, the payload: one row per indexed file with its key (int64 from the path, FAISS ids),
  id (content hash), path, size in pixels, pooled vectors, the dense tensor the rerankers read and a
  thumbnail. Written by appends, merges by key (a replacement, one commit) and deletes by key.
- `files`, the catalog the incremental indexer compares with the disk: key, path, id, size, mtime.
  Touching files rewrites these ~100-byte rows, never a dense tensor.
- `changes`, the change log the FAISS indexes follow: (seq, key) for every key whose payload row a
  write section adds, replaces or deletes, seq being the payload version when the section began. An
  index that reflects payload version V catches up by re-reading the keys logged with seq >= V.

Why a separate catalog: an update rewrites whole rows, so touching a file in the payload would
rewrite its dense tensor (and Lance's merge_insert once joined against the whole table: 1.2 GB to
touch 10 rows of a 400 MB table when this was designed; pylance 14 no longer does, see `_upsert`).

Reads go through Lance itself (pylance), writes through LanceDB: a process that only reads (a cold
`simsearch query`, the server) never imports LanceDB's client (1.5 s of a 2 s import floor). Every
read checks out the table's latest version first, as LanceDB does with read_consistency_interval 0.

Consistency without transactions across tables: every write holds one inter-process lock
(`ROOT/.simsearch.lock`), and within it the change log is written first, then the payload, then the
catalog (removals: log, catalog, payload). A run killed in between leaves either a payload row
without a catalog row (the file counts as new and is embedded again, replacing it), in a prune a
payload row of a vanished file (the next prune sweeps it), or log entries for keys that did not
change (an index re-reads them: harmless). A version read under the lock is a section boundary, so
an index that records it and later re-reads everything logged since misses nothing. Readers take no
lock: every table commit is atomic.

Scalar (BTREE) indexes on the payload's key, the catalog's key and path and the log's seq keep reads
by key, by folder and "since V" proportional to what they return; `compact` folds new rows into them.

Rows are made by `make_rows` (the one place their schema is written) and arrive in `put` as they
are stored: dense tensors already in the table's format (meta `dense_codec`, see
descriptors.codec.DenseFormat). The store keeps a compact format's fitted codec as an opaque blob
in the `codec` table (`codec_blob`, `save_codec`) and never looks inside it.

Old versions: `compact` (after index runs, once enough rows or fragments have accumulated) deletes
table versions older than `keep_versions` (default KEEP_VERSIONS, one hour: time travel and readers
that opened an older version keep working that long).

Format 1 databases (one table that also held size and mtime) still open; the first write creates
the catalog from them. Databases without a change log get one on their first write; until then (and
for versions before it) an index is rebuilt in full.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from .errors import EmptyIndexError, SimsearchError
from .paths import TABLE

CATALOG = "files"
CHANGES = "changes"
CODEC = "codec"  # the fitted dense codec of a compact table (one row)
META_KEY = b"simsearch"
VECTOR_COLUMNS = ("content", "style")
CATALOG_COLUMNS = ("key", "path", "id", "size", "mtime_ns")
STAT_COLUMNS = ("path", "id", "size", "mtime_ns")  # what the indexer compares with the disk
SCALAR_INDEXES = {TABLE: ("key",), CATALOG: ("key", "path"), CHANGES: ("seq",)}
FORMAT = 2
IN_CHUNK = 1000  # keys per `key IN (...)` filter: bounds the SQL text and each read
LOCK_TIMEOUT_S = 600
KEEP_VERSIONS = timedelta(hours=1)
OPTIMIZE_ROWS = 100_000  # lancedb's own rule of thumb for when to optimize
OPTIMIZE_FRACTION = 0.1
MAX_FRAGMENTS = 64


class MissingRowsError(SimsearchError):
    """Rows asked for by key are not in the table (deleted since they were found)."""

    def __init__(self, keys: list[int]):
        self.keys = keys
        super().__init__(f"{len(keys)} rows are no longer in the table (first key {keys[0]})")


def path_key(path: str) -> int:
    """Stable positive int64 for a normalized path (FAISS ids)."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little") >> 1


# Blobs Lance should store as they are: float16 tokens and JPEG bytes barely compress, and zstd on
# them made a rerank's read of 50 dense tensors 3x slower (20 -> 6.6 ms, +9 % on disk). Lance reads a
# column's encoding from its field metadata, kept in the table's schema for later appends.
UNCOMPRESSED = {"lance-encoding:compression": "none"}


def row_schema(content_dim: int, style_dim: int) -> pa.Schema:
    """The rows `put` takes: the payload's columns and the catalog's size and mtime_ns."""
    return pa.schema([
        pa.field("key", pa.int64()),  # path_key(path)
        pa.field("id", pa.string()),  # content hash (blake2b-128, hex)
        pa.field("path", pa.string()),
        pa.field("size", pa.int64()),  # bytes on disk (catalog only)
        pa.field("mtime_ns", pa.int64()),  # (catalog only)
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("content", pa.list_(pa.float32(), content_dim)),
        pa.field("style", pa.list_(pa.float32(), style_dim)),
        pa.field("dense", pa.binary(), metadata=UNCOMPRESSED),  # in the table's format (descriptors.codec.DenseFormat)
        pa.field("thumb", pa.binary(), metadata=UNCOMPRESSED),  # small JPEG
    ])


def payload_schema(content_dim: int, style_dim: int, meta: dict) -> pa.Schema:
    rows = row_schema(content_dim, style_dim)
    return pa.schema([f for f in rows if f.name not in ("size", "mtime_ns")], metadata={META_KEY: json.dumps(meta).encode()})


CATALOG_SCHEMA = pa.schema([row_schema(1, 1).field(c) for c in CATALOG_COLUMNS])


def make_rows(paths: list[str], content: np.ndarray, style: np.ndarray, dense: list[bytes] | None = None, *,
              ids: list[str] | None = None, sizes: list[int] | None = None, mtimes: list[int] | None = None,
              widths: list[int] | None = None, heights: list[int] | None = None,
              thumbs: list[bytes] | None = None) -> pa.Table:
    """Rows for `ImageStore.put`: one per path, keyed by path_key. content (N, Dc), style (N, Ds);
    dense: the stored bytes of each row's tensor (table format). Left out (synthetic rows for tests and
    benchmarks): dense and thumbs empty, sizes, mtimes, widths and heights 0, ids the path's digest."""
    n = len(paths)

    def column(values, default, kind):
        return pa.array(values if values is not None else [default] * n, kind)

    return pa.table([
        pa.array([path_key(p) for p in paths], pa.int64()),
        pa.array(ids if ids is not None else [hashlib.blake2b(p.encode(), digest_size=16).hexdigest() for p in paths], pa.string()),
        pa.array(paths, pa.string()),
        column(sizes, 0, pa.int64()), column(mtimes, 0, pa.int64()),
        column(widths, 0, pa.int32()), column(heights, 0, pa.int32()),
        _fixed_list(content), _fixed_list(style),
        column(dense, b"", pa.binary()), column(thumbs, b"", pa.binary()),
    ], schema=row_schema(np.shape(content)[1], np.shape(style)[1]))


def _fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def changes_schema(since: int) -> pa.Schema:
    """The log covers payload versions >= `since` (the version when it was created)."""
    return pa.schema([pa.field("seq", pa.int64()), pa.field("key", pa.int64())],
                     metadata={META_KEY: json.dumps({"since": since}).encode()})


def _connect(root: Path):
    """The writers' connection; its tables see commits made by other handles or processes."""
    import lancedb

    return lancedb.connect(str(root), read_consistency_interval=timedelta(0))


def _chunks(items: list, size: int = IN_CHUNK) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _in(keys: Iterable[int]) -> str:
    return "key IN (" + ", ".join(str(int(k)) for k in keys) + ")"


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def under_filter(folder: str) -> str:
    """Rows whose path is `folder` or lies below it, as a range the path index answers."""
    prefix = folder.rstrip("/") + "/"
    upper = prefix[:-1] + chr(ord("/") + 1)  # every string that starts with prefix sorts below this
    return f"(path = {_sql_text(folder)} OR (path >= {_sql_text(prefix)} AND path < {_sql_text(upper)}))"


class ImageStore:
    def __init__(self, root: str | Path, keep_versions: timedelta = KEEP_VERSIONS):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise SimsearchError(f"{self.root}: not a database directory (it is a file)")
        self.keep_versions = keep_versions
        self._db = None  # LanceDB connection, opened by the first write
        self._table = self._catalog = self._changes = self._meta = None
        self._session = None  # Lance's caches (manifests, scalar indexes), shared by every read
        self._lock = None
        self._disk = None  # (directory mtimes, bytes): `disk_bytes`
        self.on_scan = None  # (lance.ScanStatistics) -> None: told what each `catalog_page` read scanned

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def db(self):
        if self._db is None:
            self._db = _connect(self.root)
        return self._db

    def has_table(self, name: str) -> bool:
        return (self.root / f"{name}.lance").is_dir()  # how LanceDB lists a local database's tables

    def exists(self) -> bool:
        return self.has_table(TABLE)

    def _check_exists(self) -> None:
        if not self.exists():
            raise EmptyIndexError(f"{self.root}: no simsearch database here", db=self.root)

    @property
    def table(self):
        """The payload table, for writes (LanceDB)."""
        if self._table is None:
            self._check_exists()
            self._table = self.db.open_table(TABLE)
        return self._table

    def reader(self, name: str = TABLE, version: int | None = None):
        """Table `name` as a Lance dataset at `version` (None: the latest), for reads. A new handle
        each time (microseconds, with the shared session's caches): handles are not shared between
        threads. A version `compact` has deleted since is read at the latest."""
        import lance

        if name == TABLE:
            self._check_exists()
        if self._session is None:
            self._session = lance.Session()
        uri = str(self.root / f"{name}.lance")
        if version is not None:
            try:
                return lance.dataset(uri, version=version, session=self._session)
            except ValueError:  # older than keep_versions: cleaned up
                pass
        return lance.dataset(uri, session=self._session)

    @property
    def lock(self):
        """The inter-process write lock (reentrant within this store)."""
        if self._lock is None:
            from filelock import FileLock

            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.root / ".simsearch.lock"), timeout=LOCK_TIMEOUT_S)
        return self._lock

    def create(self, meta: dict, content_dim: int, style_dim: int) -> None:
        """Create the tables, or open them if another process just did (the caller compares `meta`)."""
        with self.lock:
            self._db = _connect(self.root)
            if not self.exists():
                for name in (CATALOG, CHANGES, CODEC):  # left by a deleted payload table: they describe nothing now
                    if self.has_table(name):
                        self._db.drop_table(name)
                meta = {**meta, "format": FORMAT, "uuid": uuid.uuid4().hex}
                self._db.create_table(TABLE, schema=payload_schema(content_dim, style_dim, meta))
                self._db.create_table(CATALOG, schema=CATALOG_SCHEMA)
            self._table = self._catalog = self._changes = self._meta = None
            self.ensure_indexes()

    def _created_on_first_use(self, name: str, create) -> object:
        """Open table `name`, first running `create()` under the write lock if no process has yet."""
        if not self.has_table(name):
            with self.lock:
                if not self.has_table(name):
                    create()
        return self.db.open_table(name)

    @property
    def catalog(self):
        """The files table; a format 1 database gets one, built from its payload, on first use."""
        if self._catalog is None:
            self._catalog = self._created_on_first_use(CATALOG, self._migrate_v1)
        return self._catalog

    def _migrate_v1(self) -> None:
        catalog = self.db.create_table(CATALOG, schema=CATALOG_SCHEMA)
        for batch in self.reader().to_batches(columns=list(CATALOG_COLUMNS)):
            catalog.add(pa.Table.from_batches([batch]).cast(CATALOG_SCHEMA))

    @property
    def changes(self):
        """The change log, created on first use by a writer (so it covers versions from now on)."""
        if self._changes is None:
            self._changes = self._created_on_first_use(
                CHANGES, lambda: self.db.create_table(CHANGES, schema=changes_schema(self.version)))
        return self._changes

    # -- a compact dense format's codec (opaque here) ------------------------------------------
    def codec_blob(self) -> bytes | None:
        """The codec saved by `save_codec`, or None before one was."""
        if not self.has_table(CODEC):
            return None
        return self.reader(CODEC).to_table(columns=["data"]).column("data")[0].as_py()

    def save_codec(self, kind: str, data: bytes) -> bytes:
        """Keep `data` as the table's codec unless another writer saved one first. -> the kept one"""
        with self.lock:
            if not self.has_table(CODEC):
                self.db.create_table(CODEC, pa.table({"kind": [kind], "data": pa.array([data], pa.binary())}))
            return self.codec_blob()

    def ensure_indexes(self) -> None:
        """Create the BTREE indexes a table lacks (databases made before they existed get them here)."""
        from lancedb.index import BTree

        with self.lock:
            for name, columns in SCALAR_INDEXES.items():
                table = {TABLE: self.table, CATALOG: self.catalog, CHANGES: self.changes}[name]
                have = {c for i in table.list_indices() for c in i.columns}
                for column in columns:
                    if column not in have:
                        table.create_index(column, config=BTree())

    def refresh(self) -> None:
        """See writes made through other handles or processes (reads always do)."""
        if self._table is not None:
            self._table.checkout_latest()

    # -- metadata ----------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        if self._meta is None:
            raw = (self.schema.metadata or {}).get(META_KEY)
            if raw is None:
                raise SimsearchError(f"{self.root}: table '{TABLE}' has no simsearch metadata (not made by simsearch?)")
            self._meta = json.loads(raw)
        return self._meta

    @property
    def schema(self) -> pa.Schema:
        """The payload table's Arrow schema."""
        return self.reader().schema

    @property
    def version(self) -> int:
        return int(self.reader().version)

    def stable_version(self, timeout: float | None = None) -> int:
        """The payload version at a write-section boundary: everything logged before it is committed,
        and every later change is logged with seq >= it. filelock.Timeout when a writer holds the lock
        longer than `timeout` seconds (None: LOCK_TIMEOUT_S)."""
        with self.lock.acquire(timeout=timeout):
            self.refresh()
            return self.version

    def count(self, version: int | None = None) -> int:
        return self.reader(version=version).count_rows() if self.exists() else 0

    def disk_bytes(self) -> int:
        """Bytes of every file of the database. Files are never rewritten in place (Lance's and the
        FAISS indexes' are written once under new names, and removed), so while no directory of the
        top two levels has changed (their mtimes, a few dozen stats) the last sum still holds and the
        tree is not walked again."""
        top = _subdirs(str(self.root))
        key = (self.root.stat().st_mtime_ns, *top, *(s for d, _ in top for s in _subdirs(d)))
        if self._disk is None or self._disk[0] != key:
            self._disk = key, _walk_bytes(self.root)
        return self._disk[1]

    # -- reads -------------------------------------------------------------------------------
    def _select(self, columns: list[str], where: str | None = None, table: str = TABLE, user_filter: bool = False,
                version: int | None = None) -> pa.Table:
        """`columns` of the rows of `table` (at `version`, see `reader`) matching `where`. A
        `user_filter` (the caller's `where`) that Lance rejects is the user's error; any other failure is ours
        and propagates as it is."""
        if table == CATALOG and not self.has_table(CATALOG):
            self.catalog  # a format 1 database: built from the payload first
        dataset = self.reader(table, version)
        if not user_filter:
            return dataset.to_table(columns=columns, filter=where or None)
        try:
            return dataset.to_table(columns=columns, filter=where)
        except Exception as e:  # lance reports SQL errors as generic exceptions
            raise SimsearchError("invalid filter {where}: " + str(e).splitlines()[0], where=where) from None

    def files(self, under: str | None = None) -> dict[str, tuple[str, int, int]]:
        """path -> (content id, size, mtime_ns) from the catalog, for the incremental indexer: every
        file, or (`under`, a normalized folder or file) only those at or below it, read through the
        path index."""
        return _stats(self._select(list(STAT_COLUMNS), under_filter(under) if under else None, table=CATALOG))

    def files_of(self, paths: list[str]) -> dict[str, tuple[str, int, int]]:
        """Like `files`, for the catalogued ones of `paths`, read by key."""
        return {p: v for chunk in _chunks([path_key(p) for p in paths])
                for p, v in _stats(self._select(list(STAT_COLUMNS), _in(chunk), table=CATALOG)).items()}

    def scan(self, columns: list[str], under: str | None = None, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """`columns` of the catalog's rows (at or below the folder `under`, read through the path index)
        as Arrow batches of at most `batch_rows`: the whole catalog in bounded memory."""
        if not self.has_table(CATALOG):
            self.catalog  # a format 1 database: built from the payload first
        return iter(self.reader(CATALOG).to_batches(columns=columns, filter=under_filter(under) if under else None,
                                                    batch_size=batch_rows))

    def vectors(self, column: str, where: str | None = None, version: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """keys (N,) int64 and vectors (N, D) float32 of one vector column (at `version`, see `reader`)."""
        return _vectors(self._select(["key", column], where, user_filter=bool(where), version=version), column)

    def vector_batches(self, column: str, rows: int, version: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`vectors` of the whole column in batches of at most `rows` rows (bounded memory)."""
        for batch in self.batches(["key", column], rows, version):
            yield _vectors(batch, column)

    def vectors_of(self, keys, column: str, version: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """keys and vectors of those of `keys` in the table (at `version`, see `reader`), read by key."""
        if not len(keys):
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return _vectors(self._by_key(keys, ["key", column], version), column)

    def _by_key(self, keys, columns: list[str], version: int | None = None) -> pa.Table:
        """`columns` of the rows of `keys` in the table (at `version`), read through the key index."""
        parts = [self._matching(columns, _in(chunk), version) for chunk in _chunks([int(k) for k in keys])]
        return pa.concat_tables(parts) if parts else self._matching(columns, "false", version)

    def _matching(self, columns: list[str], where: str, version: int | None = None) -> pa.Table:
        """`columns` of the payload rows matching `where` (on the key: the key index finds them), at
        `version`. Lance reads a filtered projection's columns over every row not yet in the key index
        (up to OPTIMIZE_ROWS of them between optimizes): `key IN (4,096 keys)` with the 20 KB style
        vectors read 19 GiB of a 1M-row table with 200k such rows, in 29 s. So a read of a wide column
        (vectors, dense tensors, thumbnails) finds the rows' ids first, reading the key column alone,
        then takes those rows: 96 MiB, 0.2 s. Narrow columns are read in one filtered pass (a second
        call costs a short lookup ~2 ms more)."""
        dataset = self.reader(TABLE, version)
        if not any(_is_wide(dataset.schema.field(c).type) for c in columns):
            return dataset.to_table(columns=columns, filter=where)
        ids = dataset.to_table(columns=["key"], filter=where, with_row_id=True).column("_rowid").to_numpy()
        if not len(ids):
            return pa.schema([dataset.schema.field(c) for c in columns]).empty_table()
        return dataset._take_rows(np.sort(ids).tolist(), columns=columns)  # marked unstable by pylance: pinned < 15

    def head(self, columns: list[str], n: int) -> list[dict]:
        """The first `n` rows of the payload (a sample whose cost is bounded by n, not the table)."""
        return self.reader(TABLE).to_table(columns=columns, limit=n).to_pylist()

    def batches(self, columns: list[str], rows: int, version: int | None = None) -> Iterator[pa.Table]:
        """The payload's `columns` (at `version`, see `reader`) in batches of at most `rows` rows: a
        whole-table pass whose memory is bounded by the batch, not the table."""
        for batch in self.reader(TABLE, version).to_batches(columns=columns, batch_size=rows):
            if batch.num_rows:
                yield pa.Table.from_batches([batch])

    def take(self, offsets, columns: list[str], version: int | None = None) -> pa.Table:
        """The payload rows at these positions (0 .. count - 1, at `version`): a sample whose cost is
        that of the rows read, not of the table."""
        return self.reader(TABLE, version).take(np.asarray(offsets, np.int64), columns=columns)

    def rows_by_prefix(self, prefixes, bits: int, columns: list[str]) -> list[dict]:
        """Rows whose key >> `bits` is one of `prefixes`, read through the key index by range (ids that
        keep a row's key in their high bits map back to it so; see simsearch.region)."""
        cols = list(dict.fromkeys(["key", *columns]))
        out: list[dict] = []
        for chunk in _chunks([int(p) for p in prefixes], IN_CHUNK // 10):
            where = " OR ".join(f"(key >= {p << bits} AND key < {(p + 1) << bits})" for p in chunk)
            out += self._matching(cols, where).to_pylist()
        return out

    def keys_where(self, where: str) -> np.ndarray:
        return self._select(["key"], where, user_filter=True).column("key").to_numpy()

    def find(self, keys, columns: list[str], version: int | None = None) -> dict[int, dict]:
        """key -> row (the `columns` asked for) for those of `keys` in the table (at `version`, see
        `reader`; None: still in it now)."""
        cols = list(dict.fromkeys(["key", *columns]))
        found: dict[int, dict] = {}
        for row in self._by_key(keys, cols, version).to_pylist():
            found[row["key"]] = row
        return found

    def rows(self, keys, columns: list[str]) -> list[dict]:
        """Rows for `keys`, in the order of `keys`; MissingRowsError names any key not in the table."""
        keys = [int(k) for k in keys]
        found = self.find(keys, columns)
        missing = [k for k in keys if k not in found]
        if missing:
            raise MissingRowsError(missing)
        return [found[k] for k in keys]

    def catalog_page(self, offset: int, limit: int, under: str | None = None, newest: bool = True) -> tuple[list[dict], int]:
        """One page of the catalog in write order, newest (most recently indexed or changed) first
        unless not `newest`, and how many rows it pages through: rows of key, path, size, mtime_ns and
        the payload's width and height. `under`: only a folder's files. Reads the page's rows and no
        others (Lance cannot order by a column through its index: that would scan the table); with
        `under` also the path index's row ids of the folder, no row data. `self.on_scan`, when set,
        receives each read's Lance ScanStatistics."""
        if not self.has_table(CATALOG):
            self.catalog  # a format 1 database: built from the payload first
        dataset = self.reader(CATALOG)
        columns = ["key", "path", "size", "mtime_ns"]
        if under is None:
            total = dataset.count_rows()  # from the manifest and deletion files
            start, stop = _page_window(total, offset, limit, newest)
            table = dataset.scanner(columns=columns, offset=start, limit=max(stop - start, 0),
                                    scan_stats_callback=self.on_scan).to_table()
        else:
            ids = dataset.scanner(columns=[], filter=under_filter(under), with_row_id=True,
                                  scan_stats_callback=self.on_scan).to_table().column("_rowid").to_numpy()
            total = len(ids)
            start, stop = _page_window(total, offset, limit, newest)
            page = ids[start:stop]
            table = dataset.scanner(columns=columns, filter=f"_rowid IN ({', '.join(map(str, page.tolist()))})",
                                    with_row_id=True, scan_stats_callback=self.on_scan).to_table() if len(page) else None
            if table is not None:  # in the folder's order, whatever order the read returned them in
                position = {int(i): n for n, i in enumerate(page.tolist())}
                table = table.take(np.argsort([position[i] for i in table.column("_rowid").to_pylist()])).drop(["_rowid"])
        rows = [] if table is None else table.to_pylist()
        if newest:
            rows.reverse()
        if rows:
            sizes = {r["key"]: r for r in self.reader(TABLE).scanner(
                columns=["key", "width", "height"], filter=_in(r["key"] for r in rows),
                scan_stats_callback=self.on_scan).to_table().to_pylist()}
            for r in rows:
                r.update(width=sizes.get(r["key"], {}).get("width"), height=sizes.get(r["key"], {}).get("height"))
        return rows, total

    def changed_since(self, version: int) -> np.ndarray | None:
        """Keys whose payload rows may differ from payload version `version` (added, replaced or
        deleted since), or None when the log does not reach back that far."""
        if not self.has_table(CHANGES):
            return None
        since = json.loads(self.reader(CHANGES).schema.metadata[META_KEY])["since"]
        if version < since:
            return None
        return np.unique(self._select(["key"], f"seq >= {int(version)}", table=CHANGES).column("key").to_numpy())

    # -- writes (all under the lock) -----------------------------------------------------------
    def _log(self, keys: list[int]) -> None:
        if keys:
            self.changes.add(pa.table({"seq": pa.array([self.version] * len(keys), pa.int64()),
                                       "key": pa.array(keys, pa.int64())}))

    def _existing(self, keys: list[int]) -> list[int]:
        """Those of `keys` that have a payload row (read through the key index)."""
        return [k for chunk in _chunks(keys) for k in self._select(["key"], _in(chunk)).column("key").to_pylist()]

    def put(self, rows: pa.Table) -> None:
        """Insert or replace rows by key (`make_rows`, dense tensors in the table's format): one
        commit to the payload and one to the catalog (`_upsert`)."""
        keys = rows.column("key").to_pylist()
        with self.lock:
            self.refresh()
            self._log(keys)
            self._upsert(self.table, rows.select(self.table.schema.names).cast(self.table.schema), self._existing(keys))
            self._replace_catalog(rows.select(list(CATALOG_COLUMNS)))

    def _replace_catalog(self, rows: pa.Table) -> None:
        keys = rows.column("key").to_pylist()
        listed = [k for chunk in _chunks(keys) for k in self._select(["key"], _in(chunk), table=CATALOG).column("key").to_pylist()]
        self._upsert(self.catalog, rows.cast(CATALOG_SCHEMA), listed)

    @staticmethod
    def _upsert(table, rows: pa.Table, existing: list[int]) -> None:
        """Rows in by key, as one commit: an append when no key is in `table` yet, else a merge by key
        (new versions of the rows that are there, the others appended). A reader sees the table before
        or after, never without a replaced row (two commits, a delete then an append, left a version
        between them without it). The merge costs 0.1-0.3 s for 128 replaced + 128 new rows whether
        the table holds 100k or 1M rows (README, "What a reader sees")."""
        if not existing:
            table.add(rows)
        else:
            table.merge_insert("key").when_matched_update_all().when_not_matched_insert_all().execute(rows)

    def touch(self, stats: dict[str, tuple[int, int]]) -> None:
        """Record the new (size, mtime_ns) of files whose content did not change: catalog rows only."""
        paths = list(stats)
        with self.lock:
            for chunk in _chunks(paths):
                current = self._select(["key", "path", "id"], _in(path_key(p) for p in chunk), table=CATALOG)
                kept = current.column("path").to_pylist()
                self._replace_catalog(current.append_column("size", pa.array([stats[p][0] for p in kept], pa.int64()))
                                      .append_column("mtime_ns", pa.array([stats[p][1] for p in kept], pa.int64())))

    def delete_paths(self, paths: list[str]) -> None:
        """Forget files: catalog first, then payload (a kill in between leaves a payload orphan that
        `sweep` removes, never a catalog row claiming an image that is not there)."""
        with self.lock:
            self.refresh()
            for chunk in _chunks([path_key(p) for p in paths]):
                self._log(chunk)
                self.catalog.delete(_in(chunk))
                self.table.delete(_in(chunk))

    def sweep(self, under: str | None = None) -> int:
        """Delete payload rows that have no catalog row (left by a killed prune), all or (`under`) those
        at or below a folder. -> rows deleted"""
        where = under_filter(under) if under else None
        with self.lock:
            self.refresh()
            catalog = set(self._select(["key"], where, table=CATALOG).column("key").to_pylist())
            orphans = [k for k in self._select(["key"], where).column("key").to_pylist() if k not in catalog]
            for chunk in _chunks(orphans):
                self._log(chunk)
                self.table.delete(_in(chunk))
        return len(orphans)

    def compact(self, full: bool = False) -> None:
        """Delete versions older than `keep_versions` (every call), and once enough has accumulated
        (or `full`) merge the small fragments left by batched writes and fold new rows into the
        scalar indexes.

        Lance's optimize merges fragments up to a million rows, so at 1M rows it rewrote ~18 s of
        payload to fold in 1,000 new rows. Deferred until OPTIMIZE_ROWS (or OPTIMIZE_FRACTION of the
        table) rows are unindexed or MAX_FRAGMENTS fragments exist, its cost per row stays bounded;
        until then reads stay correct, scanning the few unindexed fragments beside the index. The
        version cleanup is not deferred with it: it only deletes files no kept version refers to."""
        with self.lock:
            self.ensure_indexes()
            for name, table in ((TABLE, self.table), (CATALOG, self.catalog), (CHANGES, self.changes)):
                if full or _needs_optimize(table):
                    table.optimize(cleanup_older_than=self.keep_versions)
                else:
                    self.reader(name).cleanup_old_versions(older_than=self.keep_versions)


def _needs_optimize(table) -> bool:
    rows = table.count_rows()
    unindexed = max((table.index_stats(i.name).num_unindexed_rows for i in table.list_indices()), default=rows)
    return (unindexed >= max(OPTIMIZE_ROWS, OPTIMIZE_FRACTION * rows)
            or table.stats()["fragment_stats"]["num_fragments"] > MAX_FRAGMENTS)


def _subdirs(path: str) -> list[tuple[str, int]]:
    """(path, mtime) of the directories in `path`; [] once it is gone. A writer in another process
    (a cleanup of old versions, an index swapped in) may remove any of them while we list."""
    found = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    found.append((entry.path, entry.stat(follow_symlinks=False).st_mtime_ns))
    except FileNotFoundError:
        pass  # `path`, or an entry listed in it, removed meanwhile: the next call sees the change
    return found


def _walk_bytes(root: Path) -> int:
    """Bytes of the files under `root`, skipping what a writer removes while we walk (os.walk skips a
    directory that is gone; a file listed, then removed, counts nothing)."""
    total = 0
    for top, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(top, name), follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    return total

def _page_window(total: int, offset: int, limit: int, newest: bool) -> tuple[int, int]:
    """Positions [start, stop) in write order of rows offset..offset+limit, counted from the end when `newest`."""
    if newest:
        return max(total - offset - limit, 0), max(total - offset, 0)
    return min(offset, total), min(offset + limit, total)


def _stats(t: pa.Table) -> dict[str, tuple[str, int, int]]:
    path, *rest = (t.column(c).to_pylist() for c in STAT_COLUMNS)
    return {p: v for p, v in zip(path, zip(*rest))}


def _is_wide(kind: pa.DataType) -> bool:
    """A column of vectors or bytes (kilobytes a row), not of scalars or paths."""
    return pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _vectors(t: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    keys = t.column("key").to_numpy()
    if t.num_rows == 0:
        return keys, np.zeros((0, 0), np.float32)
    flat = t.column(column).combine_chunks()
    vecs = flat.values.to_numpy(zero_copy_only=False).reshape(t.num_rows, -1)
    return keys, vecs.astype(np.float32, copy=False)
