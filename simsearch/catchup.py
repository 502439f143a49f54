"""Keeping a FAISS index (simsearch.ann) derived from a column of the table at the table's version,
at the cost of what changed, not of the table. Never answers from a state that is no version at all.

What an index is derived from is a `Source`: a column of the payload table, read whole or by row key,
and the ids its vectors carry. The pooled columns (content, style) give one vector per row with the
row's key as id; a source with several vectors per row (patch tokens) gives each its own id and says
which ids a changed row may have held (`stale_ids`); a source may build its index in parts, keep it
compact and re-rank its candidates exactly (simsearch.compact). Everything else here is the same for
every source.

Change log: the store logs every key whose payload row changes (store.changed_since). An index that
reflects payload version V catches up by re-reading only those keys' rows: their stale ids removed,
the vectors of rows still present added back. Retraining (a full rebuild) happens only when the kind
no longer fits the size or the coarse quantizer no longer fits the data (`retrain_reason`):
- vectors >= 2x the vectors it was trained on (nlist should grow with sqrt(n)), or <= 1/4 of them;
- flat reaching `ivf_threshold`, or IVF falling below half of it;
- at least max(DRIFT_MIN_ROWS, 10% of the training vectors) added since training whose mean squared
  distance to their nearest centroid exceeds the training vectors' by DRIFT_RATIO (20%).

On disk (`ROOT/ann/<name>.*`): a base index file written by a full save and a chain of small delta
files (keys changed, ids and vectors added) written by each catch-up; the sidecar (replaced
atomically) names each file with its blake2b digest (and the size and mtime it was written with)
and the table version the whole chain reflects. An index is used only if every file is the one the
sidecar vouches for: a file whose size and mtime are as written is trusted, any other re-hashed. The chain is folded into a
new base when its files exceed MERGE_FRACTION of the base's bytes or MAX_DELTAS files. Concurrent writers
serialise on a file lock; every file has a unique name, so they never interleave.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .ann import IVF_THRESHOLD, VectorIndex, want_kind
from .store import ImageStore

DRIFT_MIN_ROWS = 1000
DRIFT_RATIO = 1.2
MERGE_FRACTION = 0.25
MAX_DELTAS = 32
BUSY_WAIT_S = 0.2  # how long a query waits for a writer's lock before answering from the index it has
READ_ROWS = 1024  # rows a build reads (and a compact source projects) at a time


@dataclass(frozen=True)
class Source:
    """One vector column of the payload table, one vector per row, the row's key as its id."""
    column: str

    @property
    def name(self) -> str:
        """The index's files: ROOT/ann/<name>.*"""
        return self.column

    def dim(self, store: ImageStore) -> int:
        return store.schema.field(self.column).type.list_size

    def read_keys(self, store: ImageStore, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids and vectors of those rows of `keys` still in the table."""
        return store.vectors_of(keys, self.column)

    def stale_ids(self, keys: np.ndarray) -> np.ndarray:
        """Every id the rows of `keys` may have put in the index."""
        return keys

    def build(self, store: ImageStore, ivf_threshold: int, version: int | None = None) -> VectorIndex:
        """The whole index from the table at `version`, never the whole column in memory: an IVF's
        quantizer trained on a seeded sample of rows (`take`), then every row added READ_ROWS at a time
        (a 1M-row content index built from the column read whole peaked at 4.8 GB for a 1.5 GB index)."""
        n = store.count(version)
        rng = np.random.default_rng(0)  # samples are seeded: rebuilds are reproducible
        vi = self.create_index(store, n, ivf_threshold, rng, version)
        if vi.kind == "ivf":
            vi.fit(self.take(store, sample_rows(rng, n, vi.train_size(n)), version, vi.stored), n)
        for ids, vectors in store.vector_batches(self.column, READ_ROWS, version):
            vi.add(ids, vectors)
        return vi

    def create_index(self, store: ImageStore, n: int, ivf_threshold: int, rng: np.random.Generator,
                     version: int | None) -> VectorIndex:
        """The empty index `build` fills, for n rows."""
        return VectorIndex.create(self.dim(store), n, ivf_threshold)

    def take(self, store: ImageStore, offsets: np.ndarray, version: int | None, transform=None) -> np.ndarray:
        """The vectors of the rows at `offsets`, read READ_ROWS at a time (each `transform`ed as read)."""
        parts = []
        for start in range(0, len(offsets), READ_ROWS):
            table = store.take(offsets[start:start + READ_ROWS], [self.column], version)
            part = table.column(self.column).combine_chunks().values.to_numpy(zero_copy_only=False)
            part = part.reshape(table.num_rows, -1).astype(np.float32, copy=False)
            parts.append(part if transform is None else transform(part))
        return np.concatenate(parts)  # offsets are never empty: build takes them only from rows it has

    def retrain_reason(self, vi: VectorIndex, ivf_threshold: int, store: ImageStore) -> str | None:
        """Why `vi` must be rebuilt from scratch, or None (module docstring)."""
        return retrain_reason(vi, ivf_threshold)

    def candidates(self, k: int, vi: VectorIndex) -> int:
        """Nearest ids to take from `vi` for k results (more where `rescore` re-ranks them)."""
        return k

    def rescore(self, store: ImageStore, vi: VectorIndex, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                version, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The final (Q, k) scores and ids from `vi`'s candidates; its scores are exact here."""
        return scores[:, :k], ids[:, :k]


def sample_rows(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """`size` distinct row positions of n, sorted (reads in table order)."""
    return np.sort(rng.choice(n, size=min(n, size), replace=False))


def retrain_reason(vi: VectorIndex, ivf_threshold: int) -> str | None:
    """Why `vi` must be rebuilt from scratch (module docstring), or None."""
    n = vi.ntotal
    if want_kind(n, ivf_threshold, vi.kind) != vi.kind:
        return f"{n} rows call for a {want_kind(n, ivf_threshold, vi.kind)} index"
    if vi.kind == "flat":
        return None
    if n >= 2 * vi.trained_n or 4 * n <= vi.trained_n:
        return f"{n} rows, trained on {vi.trained_n}"
    if vi.added_n >= max(DRIFT_MIN_ROWS, vi.trained_n // 10) and vi.added_error / vi.added_n > DRIFT_RATIO * vi.train_error:
        return f"drift: new rows' quantisation error {vi.added_error / vi.added_n:.4f} vs {vi.train_error:.4f}"
    return None


@dataclass
class Derived:
    """A vector index and what it reflects: a table (its weights and identity) at one version, and
    the files on disk that hold it."""
    vectors: VectorIndex
    table_version: int
    weights: str = ""  # fingerprint of the model whose vectors these are
    table_uuid: str = ""  # the payload table's identity (a table deleted and recreated restarts its versions)
    files: list[dict] = field(default_factory=list)  # base then deltas, {"file", "digest", "rows"}

    def sidecar(self) -> dict:
        return {**self.vectors.meta(), "files": self.files, "table_version": self.table_version,
                "weights": self.weights, "table_uuid": self.table_uuid}


def identity(store: ImageStore, source: Source) -> tuple:
    # The version alone is not enough: a table deleted and rebuilt (other model) restarts its numbering.
    return store.meta["weights"], store.meta.get("uuid", ""), source.dim(store)


def _compatible(derived: Derived | None, store: ImageStore, source: Source) -> bool:
    return derived is not None and (derived.weights, derived.table_uuid, derived.vectors.d) == identity(store, source)


def _fresh(derived: Derived | None, store: ImageStore, source: Source) -> bool:
    return _compatible(derived, store, source) and derived.table_version == store.version


class FollowedIndex:
    """This process's copy of the index of one `Source`, brought up to the table's version on demand
    (simsearch.Index owns one per vector column)."""

    def __init__(self, store: ImageStore, source: Source, ivf_threshold: int = IVF_THRESHOLD):
        self.store, self.source, self.ivf_threshold = store, source, ivf_threshold
        self.current: Derived | None = None
        self._mutex = threading.Lock()  # one catch-up at a time in this process (the file lock spans processes)

    @property
    def path(self) -> Path:
        return index_path(self.store, self.source.name)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, object]:
        """VectorIndex.search_at on the index at the table's version (`get`), its candidates ranked
        as the source scores them (Source.rescore): (Q, k) scores, ids and the version searched."""
        vi = self.get().vectors
        scores, ids, version = vi.search_at(queries, self.source.candidates(k, vi), allowed, nprobe)
        return (*self.source.rescore(self.store, vi, queries, scores, ids, version, k), version)

    def get(self, wait: bool = False) -> Derived:
        """The index at the table's version (while an index run holds the write lock and `wait` is
        false, the last consistent one: see `catch_up`)."""
        current = self.current
        if current is None or current.table_version != self.store.version:
            self.catch_up(wait)
        return self.current

    def catch_up(self, wait: bool = True) -> bool:
        """Bring the index to the table's version -> rebuilt in full.

        A stale index catches up with the rows logged since its version and saves them as a delta; it
        is rebuilt in full only when missing, damaged, of another table, older than the log, or due
        for retraining.

        Catching up needs a moment between two of a writer's commits (the store's lock). A reader that
        does not `wait` gets the index as it is (consistent at its own, older version) when an index
        run holds the lock for more than BUSY_WAIT_S: a writer that commits back to back would
        otherwise keep a query waiting for the whole run. It catches up on a later call."""
        from filelock import FileLock, Timeout

        store, source, path = self.store, self.source, self.path
        with self._mutex:
            if _fresh(self.current, store, source):
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path.with_suffix(".lock"))):  # one writer at a time; the next finds it fresh
                store.refresh()
                derived = load(path, source, self.current)
                if _fresh(derived, store, source):
                    self.current = derived
                    return False
                try:  # read before the rows: later changes are logged after it
                    version = store.stable_version(timeout=None if wait else BUSY_WAIT_S)
                except Timeout:
                    if _compatible(derived, store, source):
                        self.current = derived
                        return False
                    version = store.stable_version()  # nothing to answer from yet
                changed = store.changed_since(derived.table_version) if _compatible(derived, store, source) else None
                if changed is not None:
                    ids, vectors = source.read_keys(store, changed)
                    derived.vectors.apply(source.stale_ids(changed), ids, vectors, version)
                    derived = replace(derived, table_version=version)
                    if source.retrain_reason(derived.vectors, self.ivf_threshold, store) is None:
                        self.current = save_delta(path, derived, changed, ids, vectors)
                        return False
                built = source.build(store, self.ivf_threshold, version)
                built.version = version
                self.current = save(path, Derived(built, version, *identity(store, source)[:2]))
                return True


# -- the chain on disk -------------------------------------------------------------------------
def index_path(store: ImageStore, name: str) -> Path:
    return store.root / "ann" / name


def read_sidecar(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def save(path: Path, derived: Derived) -> Derived:
    """Write the whole index as a new base under a name of its own, then the sidecar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = _unique(path, ".faiss")
    derived.vectors.write(file)
    derived = replace(derived, files=[_entry(file, derived.vectors.ntotal)])
    _write_sidecar(path, derived)
    return derived


def save_delta(path: Path, derived: Derived, changed: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> Derived:
    """Append one catch-up to the chain, or fold the chain into a new base when it is long: when its
    files hold more than MERGE_FRACTION of the base's bytes (deltas hold vectors as the table does, a
    compact base far fewer bytes a row), or more than MAX_DELTAS files."""
    delta_bytes = sum(f.get("size", 0) for f in derived.files[1:]) + 8 * (len(changed) + len(ids)) + np.asarray(vectors, np.float32).nbytes
    if not derived.files or len(derived.files) > MAX_DELTAS or delta_bytes > MERGE_FRACTION * derived.files[0].get("size", 0):
        return save(path, derived)
    file = _unique(path, ".delta.npz")
    with open(file, "wb") as f:
        np.savez(f, changed=changed.astype(np.int64), keys=ids.astype(np.int64),
                 vectors=np.asarray(vectors, np.float32).reshape(len(ids), derived.vectors.d))
    derived = replace(derived, files=[*derived.files, _entry(file, len(changed) + len(ids))])
    _write_sidecar(path, derived)
    return derived


def load(path: Path, source: Source, current: Derived | None = None) -> Derived | None:
    """The saved index, or None when it is missing, damaged or not the files its sidecar vouches for.
    `current` (this path's index in memory) is extended when the sidecar's chain extends its own:
    only the new deltas are read."""
    try:
        side = read_sidecar(path)
        files = side["files"]
        mine = current.files if current is not None else []
        if mine and files[:len(mine)] == mine:
            vi, todo = current.vectors, files[len(mine):]
        else:
            vi, todo = VectorIndex.read(_verified(path.parent, files[0])), files[1:]
            vi.version = side["table_version"]  # read just now: no search has it yet
            vi.center = VectorIndex.center_of(side)  # before the deltas: their vectors go in centred
        deltas = []
        for entry in todo:  # every file read and checked before the index changes
            with np.load(_verified(path.parent, entry)) as delta:
                deltas.append((delta["changed"], delta["keys"], delta["vectors"]))
        if deltas:  # one change: a search sees the chain before or after all of them
            vi.apply_all([(source.stale_ids(changed), ids, vectors) for changed, ids, vectors in deltas], side["table_version"])
        vi.restore(side)
        return Derived(vi, side["table_version"], side["weights"], side["table_uuid"], files)
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, EOFError):
        return None


def _write_sidecar(path: Path, derived: Derived) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".json.tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(derived.sidecar(), f)
    os.replace(tmp, path.with_suffix(".json"))
    keep = {f["file"] for f in derived.files}
    for old in [*path.parent.glob(f"{path.name}.*.faiss"), *path.parent.glob(f"{path.name}.*.delta.npz")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)


def _unique(path: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _entry(file: Path, rows: int) -> dict:
    """A file of the chain as the sidecar names it: its digest, and the size and mtime it had then."""
    st = file.stat()
    return {"file": file.name, "digest": _digest(file), "rows": rows, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(folder: Path, entry: dict) -> Path:
    """The file `entry` names, if it is the one the sidecar vouches for. Chain files are written once
    under a new name and never changed, so one with the size and mtime recorded at write time is
    trusted without re-reading it (a 1M-row base is 1.5 GB); any other is hashed."""
    file = folder / entry["file"]
    st = file.stat()
    if (st.st_size, st.st_mtime_ns) == (entry.get("size"), entry.get("mtime_ns")):
        return file
    if _digest(file) != entry["digest"]:
        raise ValueError(f"{file}: not the file the sidecar vouches for")
    return file


def _digest(file: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def index_state(store: ImageStore, name: str) -> dict:
    """For `simsearch info`: whether the saved index matches the table (reads only the sidecar)."""
    try:
        side = read_sidecar(index_path(store, name))
    except (OSError, ValueError):
        return {"state": "missing"}
    fresh = (side.get("table_version"), side.get("weights"), side.get("table_uuid")) == (
        store.version, store.meta["weights"], store.meta.get("uuid", ""))
    state = {"state": "fresh" if fresh else "stale (brought up to date on next query)", "kind": side.get("kind"),
             "ntotal": side.get("ntotal"), "table_version": side.get("table_version")}
    if side.get("project"):
        state["projected_to"] = side["project"]  # dims (simsearch.compact), exact scores re-read from the table
    if side.get("kind") == "ivf":
        state |= {"nlist": side["nlist"], "codec": side["codec"], "trained_n": side["trained_n"],
                  "deltas": len(side["files"]) - 1}
    return state
