"""Indexing on a Ray cluster (Ray Data): the same rows as the local indexer, embedded by a pool of
actors, each holding one model (and one GPU when the cluster has GPUs).

    driver                     list + stat files, compare with the catalog (indexers.local.plan)
    actor pool (Ray Data)      read bytes -> hash -> decode -> preprocess -> embed  (local.prepare,
                               local.embed_rows: the local indexer's own functions)
    driver                     rows -> local.writer (encode, store.put under the database's lock), in commits of
                               `write_rows`; then touch, prune, compact and the FAISS catch-up

Rows come back to the driver and are written through the store rather than by a Lance datasink on
the workers: the store's invariants (one writer lock, change log before payload before catalog)
then hold exactly as for the local indexer, and the database may live on the driver's disk. What
travels back per image is its row (about 200 KB with a float16 dense tensor).

Sources: a local folder (or one file) as the local indexer lists it, or a URI that pyarrow's
filesystems open (s3://bucket/prefix, gs://..., hdfs://...), which every worker reads directly.
Resumable like the local indexer: a killed run loses the rows not yet committed, the next skips the
rest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ImageError, SimsearchError
from ..images import IMAGE_EXTENSIONS, iter_image_files
from ..paths import normalize
from ..store import row_schema
from . import check_source, is_uri
from .local import IndexReport, Stat, begin, embed_rows, finish, local_stat, prepare, writer

STATUS = pa.schema([("status", pa.string()), ("reason", pa.string())])  # "row", "unchanged" or "failed"


def list_source(source: str) -> tuple[list[Stat | tuple[str, str]], str | None]:
    """-> (a Stat or (path, reason) per image file, the folder for the catalog read)."""
    if not is_uri(source):
        root = check_source(source, "ray")
        return [local_stat(normalize(p)) for p in iter_image_files(root)], normalize(root)
    from pyarrow import fs

    filesystem, base = fs.FileSystem.from_uri(source)
    scheme = source.split("://", 1)[0]
    info = filesystem.get_file_info(base)
    infos = [info] if info.type == fs.FileType.File else filesystem.get_file_info(fs.FileSelector(base, recursive=True))
    stats = [Stat(f"{scheme}://{i.path}", i.size, i.mtime_ns or 0) for i in sorted(infos, key=lambda i: i.path)
             if i.type == fs.FileType.File and Path(i.path).suffix.lower() in IMAGE_EXTENSIONS]
    return stats, None


def read_bytes(path: str) -> bytes:
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    with filesystem.open_input_stream(inner) as f:
        return f.read()


class EmbedActor:
    """One model per actor; called with batches of planned files, returns their rows and statuses."""

    def __init__(self, conf: dict, fingerprint: str, threads: int, runtime: str = "torch"):
        import torch

        from ..embedder import DescriptorConfig, Embedder

        torch.set_num_threads(threads)
        # the driver's runtime, not each worker's own `auto` (rows must not depend on which worker ran them)
        self.embedder = Embedder(DescriptorConfig.from_dict(conf), "cuda" if torch.cuda.is_available() else "cpu", runtime)
        if self.embedder.fingerprint != fingerprint:
            raise SimsearchError(f"a worker's weights fingerprint as {self.embedder.fingerprint}, the database's as {fingerprint}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        prepared, others = [], []
        for item in batch.to_pylist():
            st = Stat(item["path"], item["size"], item["mtime_ns"])
            try:
                result = prepare(st, read_bytes(st.path), item["known_id"] or None, self.embedder)
            except OSError as e:
                result = ImageError(st.path, e.strerror or str(e))
            if isinstance(result, ImageError):
                others.append({"path": st.path, "size": st.size, "mtime_ns": st.mtime_ns, "status": "failed", "reason": result.reason})
            elif result == "unchanged":
                others.append({"path": st.path, "size": st.size, "mtime_ns": st.mtime_ns, "status": "unchanged", "reason": ""})
            else:
                prepared.append(result)
        rows = embed_rows(self.embedder, prepared)
        rows = rows.append_column("status", pa.array(["row"] * rows.num_rows)).append_column("reason", pa.array([""] * rows.num_rows))
        schema = pa.unify_schemas([row_schema(self.embedder.dims["content"], self.embedder.dims["style"]), STATUS])
        return pa.concat_tables([rows.cast(schema), pa.Table.from_pylist(others, schema=schema)])


def index_with_ray(index, source: str | Path, batch_size: int = 16, prune: bool = False, address: str | None = None,
                   actors: int | None = None, write_rows: int = 256,
                   on_total: Callable[[int], None] | None = None,
                   on_advance: Callable[[int], None] | None = None) -> IndexReport:
    """Index every image under `source` (folder, file or URI) into `index` with a Ray actor pool.

    `address`: the cluster to join ("auto", "ray://host:10001"; None starts a local one unless Ray
    is already initialised). `actors`: pool size (default: one per GPU, else one per 2 CPUs)."""
    import ray

    t0 = time.perf_counter()
    stats, under = list_source(str(source))
    run = begin(index, stats, under, on_total, on_advance)
    known, todo, report, advance, embedder = run.known, run.todo, run.report, run.advance, index.embedder

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = actors or gpus or max(1, cpus // 2)
    threads = max(1, cpus // actors) if not gpus else 1
    touched: dict[str, tuple[int, int]] = {}
    commits = writer(index)
    pending: list[pa.Table] = []
    try:
        if todo:
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True  # commits in listing order, as the local indexer's
            items = ray.data.from_items([{"path": s.path, "size": s.size, "mtime_ns": s.mtime_ns,
                                          "known_id": known.get(s.path, ("",))[0]} for s in todo],
                                        override_num_blocks=max(1, min(len(todo) // batch_size, 4 * actors)))
            out = items.map_batches(
                EmbedActor, batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
                num_gpus=1 if gpus else 0, num_cpus=0 if gpus else threads,
                fn_constructor_kwargs={"conf": index.conf.to_dict(), "fingerprint": embedder.fingerprint, "threads": threads,
                                       "runtime": embedder.runtime_for(batch_size)})
            for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
                status = batch.column("status").to_pylist()
                for i, s in enumerate(status):
                    if s == "failed":
                        report.failed.append((batch.column("path")[i].as_py(), batch.column("reason")[i].as_py()))
                    elif s == "unchanged":
                        report.skipped += 1
                        touched[batch.column("path")[i].as_py()] = (batch.column("size")[i].as_py(), batch.column("mtime_ns")[i].as_py())
                rows = batch.filter(pc.equal(batch.column("status"), "row")).drop_columns(["status", "reason"])
                updates = sum(p in known for p in rows.column("path").to_pylist())
                report.updated += updates
                report.added += rows.num_rows - updates
                pending.append(rows)
                if sum(t.num_rows for t in pending) >= write_rows:
                    commits.put(pa.concat_tables(pending))
                    pending = []
                advance(len(status))
    finally:
        try:
            if pending:
                commits.put(pa.concat_tables(pending))  # rows already embedded are paid for
        finally:
            commits.close()
    return finish(run, touched, under, prune, t0)
