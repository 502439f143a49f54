"""Interrupted indexing: SIGKILL mid-run, and Ctrl-C. The next run resumes, every image ends up
exactly once, and FAISS agrees with the table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import timedelta

import lancedb
import numpy as np
import pytest

from conftest import cli_command, table_rows, write_patterns
from simsearch import Index

N_IMAGES = 600  # the indexer commits every 256 rows: kill between the first commit and the end


def committed_rows(db) -> int:
    """Rows the indexer will trust on its next run: the file catalog's."""
    try:
        conn = lancedb.connect(str(db), read_consistency_interval=timedelta(0))
        return conn.open_table("files").count_rows()
    except Exception:  # noqa: BLE001 - mid-commit or not created yet
        return 0


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path, new_index):
    folder = tmp_path / "many"
    paths = write_patterns(folder / "a", N_IMAGES // 2, size=(40, 30))
    paths += write_patterns(folder / "b", N_IMAGES - len(paths), start=N_IMAGES // 2, size=(40, 30))
    db = tmp_path / "db"
    new_index(db).ensure_table()  # the CLI then uses the database's (tiny-model) configuration

    log = open(tmp_path / "index.log", "w")
    proc = subprocess.Popen([*cli_command(), "index", str(folder), "--db", str(db), "--batch-size", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="120"))
    seen = 0
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen = committed_rows(db)
            if seen > 0:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, (tmp_path / "index.log").read_text()[-2000:])
    killed_at = committed_rows(db)
    assert 0 < killed_at < N_IMAGES, f"not killed mid-run ({killed_at} rows); raise N_IMAGES"

    # what was committed is intact: distinct paths, each a file of the folder (the payload may hold one
    # batch more than the catalog: written, not yet catalogued when the kill came)
    rows = table_rows(db, complete=False)
    assert len(rows) == killed_at == len({r["path"] for r in rows})
    assert {r["path"] for r in rows} <= {str(p) for p in paths}

    # resume
    idx = Index(db)
    report = idx.add_folder(folder, batch_size=16)
    assert report.failed == []
    assert report.skipped == killed_at and report.added == N_IMAGES - killed_at and report.updated == 0
    rows = table_rows(db)
    assert len(rows) == N_IMAGES
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in paths)  # every image exactly once

    # FAISS agrees with the table
    for column in ("content", "style"):
        side = json.loads((db / "ann" / f"{column}.json").read_text())
        assert side["ntotal"] == N_IMAGES and side["table_version"] == idx.store.version
        keys, _ = idx.store.vectors(column)
        assert idx.vector_index(column).ntotal == len(keys) == N_IMAGES
    for p in [paths[0], paths[killed_at - 1], paths[killed_at], paths[-1]]:
        hits = idx.search(p, k=3)
        assert hits[0].path == str(p) and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert len({h.path for h in hits}) == 3
    # all 600 vectors are distinct rows of the table
    keys, vecs = idx.store.vectors("content")
    assert len(np.unique(keys)) == N_IMAGES

    again = Index(db).add_folder(folder)
    assert (again.added, again.updated, again.skipped) == (0, 0, N_IMAGES)


def test_ctrl_c_commits_what_was_embedded(tmp_path, new_index):
    """KeyboardInterrupt between batches: every row already embedded is committed (it was dropped
    when fewer than `write_rows` were pending), and the next run embeds only the rest."""
    folder = tmp_path / "pics"
    write_patterns(folder, 60, size=(40, 30))
    idx = new_index(tmp_path / "db")
    done = 0

    def interrupt_after_40(n):
        nonlocal done
        done += n
        if done >= 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        idx.add_folder(folder, batch_size=8, write_rows=1000, on_advance=interrupt_after_40)
    assert done == 40 and len(table_rows(tmp_path / "db")) == 40
    report = new_index(tmp_path / "db").add_folder(folder, batch_size=8)
    assert (report.skipped, report.added) == (40, 20)
    assert len(table_rows(tmp_path / "db")) == 60
