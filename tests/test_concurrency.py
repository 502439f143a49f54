"""Processes sharing one database: two indexers started at once on a new database, and several
processes rebuilding the same stale FAISS index. Real subprocesses, real LanceDB, real FAISS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import cli_command, table_rows, tiny_cli_options, write_patterns
from simsearch import Index
from simsearch.catchup import Source, index_path, load


@pytest.mark.slow
def test_two_indexers_start_together_on_a_new_database(tmp_path, tiny_model, photos):
    """Both create-or-open the table (one died with `Table 'images' already exists`) and both finish
    with every image exactly once."""
    write_patterns(photos / "patterns", 30)
    db = tmp_path / "db"
    env = dict(os.environ, COLUMNS="200")
    procs = [subprocess.Popen([*cli_command(), "index", str(photos), "--db", str(db), "--batch-size", "4",
                               "--commit-every", "8", *tiny_cli_options(tiny_model)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    rows = table_rows(db)
    files = sorted(str(p) for p in photos.rglob("*") if p.is_file())
    assert sorted(r["path"] for r in rows) == files  # each image exactly once
    assert Index(db).search(photos / "patterns" / "pat0007.png", k=1)[0].path == str(photos / "patterns" / "pat0007.png")


REBUILD = """
import sys
from simsearch import Index
idx = Index(sys.argv[1])
idx.refresh_ann()
print(idx.info()["ann"]["content"]["ntotal"])
"""


@pytest.mark.slow
def test_concurrent_rebuilds_never_pair_a_sidecar_with_another_index(tmp_path, new_index, photos):
    """Three processes find the index stale at once. Each build goes to a file of its own and the
    sidecar names the one it vouches for (with its digest); all three end with a valid index."""
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    for column in ("content", "style"):
        index_path(Index(db).store, column).with_suffix(".json").unlink()
    procs = [subprocess.Popen([sys.executable, "-c", REBUILD, str(db)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert [o.split()[-1] for o in outputs] == ["12"] * 3
    for column in ("content", "style"):
        path = index_path(Index(db).store, column)
        side = json.loads(path.with_suffix(".json").read_text())
        assert sorted(p.name for p in path.parent.glob(f"{column}.*.faiss")) == [f["file"] for f in side["files"]]
        assert not list(path.parent.glob("*.tmp"))
        loaded = load(path, Source(column))
        assert loaded is not None and loaded.vectors.ntotal == 12 and loaded.table_version == Index(db).store.version


def test_sidecar_vouches_only_for_its_own_file(tmp_path, new_index, photos):
    """An index file replaced under the sidecar (same name, same ntotal and d) is refused by its
    digest; `load` checked only ntotal and d before."""
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    write_patterns(tmp_path / "other", 12)
    other = new_index(tmp_path / "db2")
    other.add_folder(tmp_path / "other")
    path = index_path(Index(db).store, "content")
    mine = path.parent / json.loads(path.with_suffix(".json").read_text())["files"][0]["file"]
    theirs = index_path(other.store, "content")
    mine.write_bytes((theirs.parent / json.loads(theirs.with_suffix(".json").read_text())["files"][0]["file"]).read_bytes())
    assert load(path, Source("content")) is None
    assert Index(db).search(photos / "horse.jpg", k=1)[0].path == str(photos / "horse.jpg")
