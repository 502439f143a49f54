"""The LanceDB table: the source of truth, one row per image file.

Rows are keyed by path (absolute); `key` is a stable int64 derived from the path for FAISS, `id`
the content hash. The descriptor configuration and the weights fingerprint live in the Arrow
schema metadata, so they travel with the table.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import EmptyIndexError, SimsearchError

TABLE = "images"
META_KEY = b"simsearch"
VECTOR_COLUMNS = ("content", "style")


def path_key(path: str) -> int:
    """Stable positive int64 for a path (FAISS ids)."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little") >> 1


def schema(content_dim: int, style_dim: int, meta: dict) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.int64()),
        pa.field("id", pa.string()),  # content hash (blake2b-128, hex)
        pa.field("path", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("content", pa.list_(pa.float32(), content_dim)),
        pa.field("style", pa.list_(pa.float32(), style_dim)),
        pa.field("dense", pa.binary()),  # descriptors.codec
        pa.field("thumb", pa.binary()),  # small JPEG
    ], metadata={META_KEY: json.dumps(meta).encode()})


def _connect(root: Path):
    """Every read sees the latest commit, also one made by another handle or process."""
    import lancedb

    return lancedb.connect(str(root), read_consistency_interval=timedelta(0))


class ImageStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise SimsearchError(f"{self.root}: not a database directory (it is a file)")
        self._db = _connect(self.root) if self.root.exists() else None
        self._table = None

    # -- lifecycle ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self._db is not None and TABLE in self._db.table_names()

    @property
    def table(self):
        if self._table is None:
            if not self.exists():
                raise EmptyIndexError(f"{self.root}: no simsearch database here (run `simsearch index FOLDER --db {self.root}`)")
            self._table = self._db.open_table(TABLE)
        return self._table

    def create(self, meta: dict, content_dim: int, style_dim: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.root)
        self._table = self._db.create_table(TABLE, schema=schema(content_dim, style_dim, meta))

    def refresh(self) -> None:
        """See writes made through other handles or processes."""
        if self._table is not None:
            self._table.checkout_latest()

    # -- metadata ----------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        raw = (self.table.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise SimsearchError(f"{self.root}: table '{TABLE}' has no simsearch metadata (not made by simsearch?)")
        return json.loads(raw)

    @property
    def version(self) -> int:
        return int(self.table.version)

    def count(self) -> int:
        return self.table.count_rows() if self.exists() else 0

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    # -- reads -------------------------------------------------------------------------------
    def _select(self, columns: list[str], where: str | None = None) -> pa.Table:
        q = self.table.search()
        if where:
            q = q.where(where)
        try:
            return q.select(columns).limit(None).to_arrow()
        except Exception as e:  # lance reports SQL errors as generic exceptions
            if where:
                raise SimsearchError(f"invalid --where filter {where!r}: {str(e).splitlines()[0]}") from None
            raise

    def files(self) -> dict[str, tuple[str, int, int]]:
        """path -> (content id, size, mtime_ns) for the incremental indexer."""
        t = self._select(["path", "id", "size", "mtime_ns"])
        cols = [t.column(c).to_pylist() for c in ("path", "id", "size", "mtime_ns")]
        return {p: (i, s, m) for p, i, s, m in zip(*cols)}

    def vectors(self, column: str, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """keys (N,) int64 and vectors (N, D) float32 of one vector column."""
        t = self._select(["key", column], where)
        keys = t.column("key").to_numpy()
        if t.num_rows == 0:
            return keys, np.zeros((0, 0), np.float32)
        flat = t.column(column).combine_chunks()
        vecs = flat.values.to_numpy(zero_copy_only=False).reshape(t.num_rows, -1)
        return keys, vecs.astype(np.float32, copy=False)

    def keys_where(self, where: str) -> np.ndarray:
        return self._select(["key"], where).column("key").to_numpy()

    def rows(self, keys, columns: list[str]) -> list[dict]:
        """Rows for `keys`, in the order of `keys` (missing keys are skipped)."""
        keys = [int(k) for k in keys]
        if not keys:
            return []
        cols = list(dict.fromkeys(["key", *columns]))
        t = self._select(cols, f"key IN ({', '.join(map(str, keys))})")
        by_key = {r["key"]: r for r in t.to_pylist()}
        return [by_key[k] for k in keys if k in by_key]

    # -- writes ------------------------------------------------------------------------------
    def upsert(self, rows: pa.Table) -> None:
        """Insert or replace rows by path in one commit (atomic: all of `rows` or none)."""
        (self.table.merge_insert("path").when_matched_update_all().when_not_matched_insert_all()
         .execute(rows))

    def set_file_stats(self, stats: dict[str, tuple[int, int]]) -> None:
        """Record new (size, mtime_ns) of files whose content did not change, in one commit."""
        if not stats:
            return
        rows = self._select(self.table.schema.names, "key IN (" + ", ".join(str(path_key(p)) for p in stats) + ")")
        paths = rows.column("path").to_pylist()
        for name, i in (("size", 0), ("mtime_ns", 1)):
            rows = rows.set_column(rows.schema.get_field_index(name), name,
                                   pa.array([stats[p][i] for p in paths], pa.int64()))
        self.upsert(rows.cast(self.table.schema))

    def delete_paths(self, paths: list[str]) -> None:
        for i in range(0, len(paths), 500):
            chunk = paths[i:i + 500]
            self.table.delete("key IN (" + ", ".join(str(path_key(p)) for p in chunk) + ")")

    def compact(self) -> None:
        """Merge the small fragments left by batched writes; old versions are kept for a week."""
        self.table.optimize()
