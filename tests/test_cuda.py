"""CUDA paths against the CPU: index, query (plain, reranked, --html), match and score with the
backbone on the GPU in fp16. Skipped, with the reason, where torch sees no CUDA device; run them on
a GPU machine whenever one is available (the results go in the README)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import QUERIES, TINY
from simsearch import Index

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
FP16 = dict(abs=3e-2)  # fp16 forward against fp32: scores agree to about 1e-2


@pytest.fixture(scope="module")
def dbs(tmp_path_factory, tiny_model):
    """The same photos indexed on the CPU and on the GPU. -> {device: Index}"""
    import shutil

    from conftest import EXAMPLES

    root = tmp_path_factory.mktemp("cuda")
    photos = root / "photos"
    shutil.copytree(EXAMPLES, photos)
    out = {}
    for device in ("cpu", "cuda"):
        idx = Index(root / f"db-{device}", model=str(tiny_model), device=device, **TINY)
        assert idx.add_folder(photos).added == 12
        out[device] = idx
    out["photos"] = photos
    return out


def test_index_on_cuda_stores_what_the_cpu_stores(dbs):
    assert dbs["cuda"].embedder.device.type == "cuda"
    for column in ("content", "style"):
        keys_c, vec_c = dbs["cpu"].store.vectors(column)
        keys_g, vec_g = dbs["cuda"].store.vectors(column)
        order_c, order_g = np.argsort(keys_c), np.argsort(keys_g)
        assert np.array_equal(keys_c[order_c], keys_g[order_g])
        assert np.abs(vec_c[order_c] - vec_g[order_g]).max() < 3e-2


@pytest.mark.parametrize("rerank", [None, "aas", "matches", "both"])
def test_query_on_cuda_agrees_with_cpu(dbs, rerank):
    query = dbs["photos"] / "coffee.jpg"
    cpu = dbs["cpu"].search(query, k=5, rerank=rerank)
    gpu = dbs["cuda"].search(query, k=5, rerank=rerank)
    assert gpu[0].path == cpu[0].path == str(query)
    assert [h.score for h in gpu] == pytest.approx([h.score for h in cpu], **FP16)


def test_query_html_on_cuda(cli, dbs, tmp_path):
    """--html reads stored dense tensors (CPU) into the CUDA backbone and draws matches (CPU numpy)."""
    page = tmp_path / "results.html"
    code, out, err = cli("query", QUERIES / "cat_crop.jpg", "--db", dbs["cuda"].root, "--device", "cuda", "-k", "3",
                         "--rerank", "both", "--html", page, "--json")
    assert code == 0, err
    assert page.is_file() and page.read_text().count("<img") >= 7
    assert json.loads(out.splitlines()[0])["path"].endswith("chelsea.jpg")


def test_match_and_score_on_cuda(tiny12, tmp_path):
    from conftest import EXAMPLES
    from simsearch.api import match_images
    from simsearch.scoring import score

    a, b = EXAMPLES / "chelsea.jpg", QUERIES / "cat_crop.jpg"
    cpu = match_images(a, b, points=[(200, 150), (300, 120)], model=str(tiny12), device="cpu")
    gpu = match_images(a, b, points=[(200, 150), (300, 120)], model=str(tiny12), device="cuda")
    assert np.abs(cpu.points_b - gpu.points_b).max() < 20  # fp16 may move a point by a fraction of a cell
    reports = {}
    for device in ("cpu", "cuda"):
        report, fs = score(a, EXAMPLES, metrics=("cosine", "aas"), model=str(tiny12), device=device)
        fs.close()
        reports[device] = report
    for m in ("cosine", "aas"):
        assert reports["cuda"].overall[m]["mean"] == pytest.approx(reports["cpu"].overall[m]["mean"], **FP16)


def test_stable_diffusion_on_cuda_agrees_with_cpu(tiny_sd):
    """The UNet on the GPU (fp16, channels-last): the same content and style vectors and AAS scores as on
    the CPU."""
    from conftest import EXAMPLES
    from simsearch.embedder import DescriptorConfig, Embedder
    from simsearch.images import open_image
    from simsearch.rerank import rerank_scores

    conf = DescriptorConfig.for_model(model=str(tiny_sd), image_size=128)
    images = [open_image(p, max_side=128).image for p in sorted(EXAMPLES.glob("*.jpg"))[:4]]
    out = {}
    for device in ("cpu", "cuda"):
        emb = Embedder(conf, device)
        e = emb.embed(torch.stack([emb.preprocess(im) for im in images]))
        aas = rerank_scores(emb.backbone, conf.dense_layer, e.dense[0], e.dense[1:], "aas")["aas"]
        out[device] = (e, aas)
    (cpu, aas_cpu), (gpu, aas_gpu) = out["cpu"], out["cuda"]
    for field in ("content", "style"):
        assert np.abs(getattr(cpu, field) - getattr(gpu, field)).max() < 3e-2
    assert aas_gpu == pytest.approx(aas_cpu, **FP16)
