"""The cached TorchScript query graph (simsearch.backbones.compiled): same descriptors as the eager
backbone, a cache that never serves stale weights, and a cold query that does not import transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import QUERIES, REPO, TINY, save_tiny_timm
from simsearch.backbones import compiled
from simsearch.embedder import DescriptorConfig, Embedder


def tiny_conf(model) -> DescriptorConfig:
    return DescriptorConfig.for_model(str(model), **TINY)


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["transformers", "timm-registers"])
def vit_conf(request, tiny_model, tmp_path_factory) -> DescriptorConfig:
    """Both ViT families: the tiny transformers DINOv2, and a 2-block timm DINOv2 with 4 register tokens."""
    if request.param == "transformers":
        return tiny_conf(tiny_model)
    model = save_tiny_timm(tmp_path_factory.mktemp("timm") / "reg", "vit_small_patch14_reg4_dinov2")
    return DescriptorConfig.for_model(str(model), image_size=56, content_layer=2, style_layer=1, dense_layer=1)


def test_compiled_embedder_matches_the_eager_one(vit_conf):
    eager = Embedder(vit_conf)
    assert eager.compiled is None or compiled.cache_path(eager.conf).is_file()
    assert eager.compile() and compiled.cache_path(eager.conf).is_file()
    cold = Embedder(vit_conf)
    assert cold.compiled is not None and cold._backbone is None  # nothing but torch was needed
    x = pixels(3, vit_conf.image_size)  # traced on one image, run on three
    want, got = eager.backbone.tokens(x, eager.wanted), cold.tokens(x)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    assert cold._backbone is None
    a, b = eager.embed(x), cold.embed(x)
    for field in ("content", "style", "dense"):
        np.testing.assert_allclose(getattr(b, field), getattr(a, field), atol=1e-6)
    assert cold.fingerprint == eager.backbone.fingerprint and cold.dims == eager.dims


def test_other_sizes_load_the_backbone(tiny_model):
    Embedder(tiny_conf(tiny_model)).compile()
    emb = Embedder(tiny_conf(tiny_model))
    assert emb.compiled is not None
    out = emb.tokens(pixels(1, 28))  # not the traced size: the real backbone answers
    assert emb._backbone is not None and out["dense"].shape[1] == 1 + 2 * 2


def test_new_weights_miss_the_cache_and_unused_graphs_go(tiny_model, tmp_path):
    """New weights (mtime) give a new key; writing their graph deletes graphs unused for UNUSED_DAYS."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    conf = tiny_conf(model)
    Embedder(conf).compile()
    before = compiled.cache_path(conf)
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    after = compiled.cache_path(conf)
    assert before.is_file() and after != before and not after.exists()
    assert Embedder(conf).compiled is None
    month = 86400 * (compiled.UNUSED_DAYS + 1)
    os.utime(before, (before.stat().st_atime - month, before.stat().st_mtime - month))
    Embedder(conf).compile()
    assert after.is_file() and not before.exists()
    data, mtime = weights.read_bytes(), weights.stat().st_mtime_ns
    weights.unlink()
    weights.write_bytes(data)  # the same bytes and mtime in a new file (as cp -p leaves it)
    os.utime(weights, ns=(mtime, mtime))
    assert compiled.cache_path(conf) != after


def test_a_damaged_graph_counts_as_absent(tiny_model, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    conf = tiny_conf(model)
    path = compiled.cache_path(conf)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a torchscript archive")
    emb = Embedder(conf)
    assert emb.compiled is None and emb._backbone is not None
    assert emb.compile() and Embedder(conf).compiled is not None  # rewritten


def test_only_local_vits_are_compiled(tiny_sd):
    assert compiled.weight_files("sd15") is None  # a hub model: no lookup for a cache key
    assert compiled.weight_files("facebook/dinov2-small") is None
    assert compiled.weight_files(str(tiny_sd)) is None  # Stable Diffusion runs eagerly


@pytest.mark.slow
def test_cold_query_skips_transformers(embedded_db):
    """After an index run, a fresh process answers a query with torch alone, exactly as eagerly."""
    db, _ = embedded_db
    query = sorted(QUERIES.glob("*"))[0]
    code = (
        "import json, sys\n"
        "from simsearch import Index\n"
        f"hits = Index({str(db)!r}).search({str(query)!r}, k=5)\n"
        "print(json.dumps({'hits': [h.to_dict() for h in hits], 'transformers': 'transformers' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cold = json.loads(proc.stdout.splitlines()[-1])
    assert cold["transformers"] is False

    from simsearch import Index

    idx = Index(db)
    idx.embedder.compiled = None  # the eager backbone
    eager = [h.to_dict() for h in idx.search(query, k=5)]
    assert [h["path"] for h in cold["hits"]] == [h["path"] for h in eager]
    assert [h["score"] for h in cold["hits"]] == pytest.approx([h["score"] for h in eager], abs=1e-5)
