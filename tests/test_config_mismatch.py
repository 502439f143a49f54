"""A database remembers its model and descriptor configuration; another one is refused, and the
refusal writes nothing."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import TINY, table_rows
from simsearch import ConfigMismatchError, Index
from simsearch.backbones import DEFAULT_MODEL


def snapshot(db):
    """Everything a refused run could have changed."""
    files = {p.relative_to(db).as_posix(): p.read_bytes() for p in sorted(db.rglob("*")) if p.is_file()}
    return files, table_rows(db)


@pytest.fixture
def built(tmp_path, new_index, photos):
    db = tmp_path / "db"
    new_index(db).add_folder(photos)
    return db


def test_other_model_is_refused_naming_both(built, tiny_model, photos):
    before = snapshot(built)
    with pytest.raises(ConfigMismatchError) as info:
        Index(built, model=DEFAULT_MODEL)  # refused before any weights are loaded
    msg = str(info.value)
    assert str(tiny_model) in msg and DEFAULT_MODEL in msg
    assert str(built) in msg
    assert snapshot(built) == before


def test_other_image_size_is_refused_naming_both(built, tiny_model, photos):
    before = snapshot(built)
    with pytest.raises(ConfigMismatchError) as info:
        Index(built, model=str(tiny_model), **dict(TINY, image_size=112)).add_folder(photos)
    msg = str(info.value)
    assert '"image_size": 56' in msg and '"image_size": 112' in msg
    with pytest.raises(ConfigMismatchError, match="int8"):
        Index(built, dense_dtype="int8")
    assert snapshot(built) == before


def test_stored_configuration_is_used_without_options(built, photos):
    idx = Index(built)  # no model, no options: the database's own configuration
    assert idx.conf.image_size == 56 and idx.conf.style_layer == 2
    assert idx.add_folder(photos).skipped == 12
    assert idx.search(photos / "coins.jpg", k=1)[0].path == str(photos / "coins.jpg")
    meta = idx.info()
    assert meta["config"]["image_size"] == 56 and len(meta["weights"]) == 16


def test_changed_weights_in_the_same_directory_are_refused(tmp_path, tiny_model, tiny_model_b, photos):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    db = tmp_path / "db"
    Index(db, model=str(model_dir), **TINY).add_folder(photos)
    before = snapshot(db)
    shutil.copy(tiny_model_b / "model.safetensors", model_dir / "model.safetensors")  # retrained in place
    (photos / "new.jpg").write_bytes((photos / "coins.jpg").read_bytes())
    with pytest.raises(ConfigMismatchError, match="fingerprint"):
        Index(db).add_folder(photos)
    with pytest.raises(ConfigMismatchError, match="fingerprint"):
        Index(db).search(photos / "coins.jpg", k=1)
    assert snapshot(db) == before


def test_relative_model_directory_works_from_anywhere(tmp_path, tiny_model, photos, monkeypatch):
    """`--model ./my-dinov2` must keep working when the database is used from another directory."""
    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "my-dinov2")
    db = tmp_path / "db"
    monkeypatch.chdir(models)
    Index(db, model="./my-dinov2", **TINY).add_folder(photos)
    monkeypatch.chdir(photos)
    hit = Index(db).search(photos / "horse.jpg", k=1)[0]
    assert hit.path == str(photos / "horse.jpg")
    stored = json.loads(json.dumps(Index(db).info()["config"]))["model"]
    assert stored == str(models / "my-dinov2")
    # naming the same directory another way is not a mismatch
    Index(db, model=str(models / "my-dinov2"))


def test_bad_configuration_values(tmp_path, tiny_model):
    from simsearch import SimsearchError, WeightsNotFoundError

    with pytest.raises(SimsearchError, match="outside"):
        Index(tmp_path / "a", model=str(tiny_model), image_size=8)
    with pytest.raises(SimsearchError, match="dense dtype"):
        Index(tmp_path / "b", model=str(tiny_model), dense_dtype="int4")
    with pytest.raises(SimsearchError, match=r"dense_layer=9 is outside 0\.\.3 \(4 blocks\)"):
        Index(tmp_path / "c", model=str(tiny_model), image_size=56).ensure_table()
    with pytest.raises(WeightsNotFoundError, match="no config.json"):
        Index(tmp_path / "d", model=str(tmp_path)).ensure_table()
    with pytest.raises(WeightsNotFoundError, match="unknown model"):
        Index(tmp_path / "e", model="no-such-model").ensure_table()
    with pytest.raises(WeightsNotFoundError):  # a hub id, offline: a clear error, not a hang
        Index(tmp_path / "f", model="nobody/no-such-dinov2").ensure_table()
    for name in "abcdef":
        assert not (tmp_path / name / "images.lance").exists()


def test_dense_layer_must_be_a_block(tmp_path, tiny_model):
    """dense_layer == number of blocks passed validation and failed later inside rerank (blocks[n])."""
    from simsearch import SimsearchError

    conf = dict(model=str(tiny_model), image_size=56, style_layer=2, content_layer=4)
    with pytest.raises(SimsearchError, match=r"dense_layer=4 is outside 0\.\.3"):
        Index(tmp_path / "a", dense_layer=4, **conf).ensure_table()
    assert not (tmp_path / "a" / "images.lance").exists()
    Index(tmp_path / "b", dense_layer=3, **conf).ensure_table()  # the last block is fine


VIT = dict(image_size=224, content_pooling="cls", content_layer=None, style_layer=4, style_pooling="meanstd",
           dense_layer=9, dense_dtype="float16", timestep=None, noise_seed=None, ip_adapter=None)
SD_UNET_ATTN1 = "up_blocks.1.attentions.-1.transformer_blocks.-1.attn1"  # DiffSim-S's layer
SD = dict(image_size=512, content_pooling="mean", content_layer="up_blocks.1", style_layer=SD_UNET_ATTN1,
          style_pooling="meanstd", dense_layer=SD_UNET_ATTN1, dense_dtype="float16", timestep=101, noise_seed=42,
          ip_adapter=None)


@pytest.mark.parametrize("model, expected", [
    # the embedded model's card: the choice measured on the proxy suite (benchmarks/results/quality_suite.md)
    (DEFAULT_MODEL, dict(VIT, content_layer=11, style_layer=(6, 7, 8, 9), style_pooling="meanstd+cov32")),
    ("dinov2-small", VIT),  # no card defaults: the ViT family's
    ("sd15", SD),  # the SD family's: DIFT content, DiffSim-S style and dense attention at t=101
    ("sd15-instance", dict(SD, timestep=251)),  # its card: DiffSim's instance setting
    ("local-sd", SD),  # a local diffusers folder is detected as SD
])
def test_embedder_and_index_build_the_same_configuration(tmp_path, model, expected):
    """One resolution path: a new Index, an Embedder and DescriptorConfig.for_model agree field by field
    with the family and card tables (written out here), and none loads weights to do it."""
    from simsearch import DescriptorConfig, Embedder

    if model == "local-sd":
        model = str(tmp_path / "sd")
        (tmp_path / "sd").mkdir()
        (tmp_path / "sd" / "model_index.json").write_text("{}")
    conf = Index(tmp_path / "db", model=model).conf
    assert conf.to_dict() == {"model": model, **expected}
    assert Embedder(DescriptorConfig.for_model(model)).conf == conf
    if model == DEFAULT_MODEL:
        assert Embedder().conf == Index(tmp_path / "db2").conf == conf
    assert not (tmp_path / "db").exists()
