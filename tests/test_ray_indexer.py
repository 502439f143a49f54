"""Ray Data ingestion on a local Ray cluster (2 CPUs): the same rows, bit for bit, as the local
indexer on the same files; resumable; broken files reported like the local indexer does."""

from __future__ import annotations

import shutil

import lancedb
import numpy as np
import pytest
import ray

from conftest import broken_files, table_rows, write_patterns


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def payload(db) -> dict[int, dict]:
    t = lancedb.connect(str(db)).open_table("images").to_arrow()
    return {r["key"]: r for r in t.to_pylist()}


@pytest.mark.slow
def test_ray_rows_equal_local_rows(ray_cluster, tmp_path, new_index, photos, cli):
    from PIL import Image

    write_patterns(photos / "patterns", 8)
    for name, (data, _) in list(broken_files(Image.open(photos / "coffee.jpg")).items())[:2]:
        (photos / name).write_bytes(data)
    local = new_index(tmp_path / "local").add_folder(photos, batch_size=4)
    remote = new_index(tmp_path / "ray").add_folder(photos, batch_size=4, engine="ray", actors=2, write_rows=8)
    assert (remote.added, remote.skipped, sorted(remote.failed)) == (local.added, local.skipped, sorted(local.failed))
    assert remote.added == 20 and len(remote.failed) == 2

    a, b = payload(tmp_path / "local"), payload(tmp_path / "ray")
    assert a.keys() == b.keys()
    for key in a:  # every column, vectors and dense bytes included, bit for bit
        assert a[key] == b[key], a[key]["path"]
    ra = {r["path"]: r for r in table_rows(tmp_path / "local")}
    rb = {r["path"]: r for r in table_rows(tmp_path / "ray")}
    assert ra == rb

    # resumable / incremental: only what changed is embedded again, by the CLI with --engine ray
    write_patterns(photos / "patterns", 2, start=8)
    shutil.copy(photos / "horse.jpg", photos / "patterns" / "pat0000.png")  # changed content
    code, out, err = cli("index", photos, "--db", tmp_path / "ray", "--engine", "ray", "--batch-size", "4")
    assert code == 0, err
    assert "added 2 · updated 1 · skipped 19 · failed 2" in out
    hits = new_index(tmp_path / "ray").search(photos / "patterns" / "pat0009.png", k=1)
    assert hits[0].path == str(photos / "patterns" / "pat0009.png")
    keys, vecs = new_index(tmp_path / "ray").store.vectors("content")
    assert len(keys) == 22 and np.isfinite(vecs).all()
