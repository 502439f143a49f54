"""Inference runtimes (simsearch.backbones.runtime): each holds its stated tolerance to eager float32 on
real photos through the real loading code, a database built in one answers in another, exported graphs
are verified and cached per weights, `auto` is measured once per machine, and a cold `simsearch query`
imports neither torch nor transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, QUERIES, REPO, TINY, save_tiny_timm, save_tiny_vit
from simsearch import Index
from simsearch.backbones import runtime
from simsearch.backbones.pixels import vit_pixels
from simsearch.embedder import DescriptorConfig, Embedder
from simsearch.errors import SimsearchError

PHOTOS = sorted(EXAMPLES.glob("*.jpg"))


def photo_pixels(size: int) -> np.ndarray:
    return np.stack([vit_pixels(Image.open(p).convert("RGB"), size) for p in PHOTOS])


@pytest.fixture(scope="module", params=["dinov2", "dino", "timm-registers"])
def vit_conf(request, tmp_path_factory) -> DescriptorConfig:
    """Tiny random ViTs of each family, saved and loaded as checkpoints are: transformers DINOv2 and
    DINO v1, and a 2-block timm DINOv2 with 4 register tokens."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "timm-registers":
        model = save_tiny_timm(root / "m", "vit_small_patch14_reg4_dinov2")
        return DescriptorConfig.for_model(str(model), image_size=56, content_layer=2, style_layer=(0, 1), dense_layer=1,
                                          style_pooling="meanstd+cov8")
    model = save_tiny_vit(root / "m", request.param, patch_size=14 if request.param == "dinov2" else 8)
    return DescriptorConfig.for_model(str(model), **TINY)


def assert_within(name: str, want, got) -> None:
    for field in ("content", "style", "dense"):
        worst = runtime.cosines(getattr(want, field), getattr(got, field)).min()
        assert worst >= runtime.MIN_COSINE[name], f"{name} {field}: cosine {worst:.6f} < {runtime.MIN_COSINE[name]}"


def test_vit_pixels_match_torchvision():
    """The numpy preprocessing the cold path runs equals torchvision's resize / to-tensor / normalise."""
    from torchvision import transforms

    for size in (56, 224):
        tv = transforms.Compose([transforms.Resize((size, size), transforms.InterpolationMode.BICUBIC),
                                 transforms.ToTensor(),
                                 transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        for p in PHOTOS[:4]:
            img = Image.open(p).convert("RGB")
            np.testing.assert_allclose(vit_pixels(img, size), tv(img).numpy(), rtol=0, atol=1e-6)


def test_each_runtime_holds_its_tolerance(vit_conf):
    pixels = photo_pixels(vit_conf.image_size)
    eager = Embedder(vit_conf, "cpu", runtime="torch").embed(pixels)
    for name in ("torch-bf16", "onnx"):
        assert_within(name, eager, Embedder(vit_conf, "cpu", runtime=name).embed(pixels))


def test_bf16_runs_attention_as_matrix_products_and_puts_the_fused_kernel_back(vit_conf, monkeypatch):
    """The bf16 runner computes attention as q k^T, softmax, times v (ViTBackbone.matmul_attention):
    the fused kernel is never called inside it and runs once a block outside it, float32 tokens are
    the fused kernel's inside the block too (the same attention, not an approximation of it), and the
    model's own kernel is back after the block, also when it raised, and after the last of two
    overlapping blocks, not the first to end."""
    import torch
    import torch.nn.functional as F

    embedder = Embedder(vit_conf, "cpu", runtime="torch")
    bb, head = embedder.backbone, embedder.head
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    pixels = torch.from_numpy(photo_pixels(vit_conf.image_size))
    with torch.inference_mode():
        want = head(pixels)
        blocks = len(calls)
        with bb.matmul_attention():
            got = head(pixels)
    assert blocks == max(layer for layer, _ in head.wanted.values()) and len(calls) == blocks
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    runtime.TorchRunner(head, bf16=True).run(photo_pixels(vit_conf.image_size))
    assert len(calls) == blocks and bb.attention_kernel == "sdpa"
    with pytest.raises(RuntimeError, match="inside"), bb.matmul_attention():
        raise RuntimeError("inside")
    assert bb.attention_kernel == "sdpa"
    outer, inner = bb.matmul_attention(), bb.matmul_attention()  # overlapping, as two threads' runs can
    outer.__enter__(), inner.__enter__()
    outer.__exit__(None, None, None)
    assert bb.attention_kernel == "eager"  # the inner one still runs
    inner.__exit__(None, None, None)
    assert bb.attention_kernel == "sdpa"


def test_verification_views_hold_the_tolerance_and_single_images_run_as_batches_do(vit_conf):
    """A query's dense view at another input size (Embedder.dense_view: its own DenseHead graph on
    ONNX) against the eager module's tokens; and a single image through the graph's batch-1
    session against the same image in a batch."""
    import torch

    img = Image.open(PHOTOS[0]).convert("RGB")
    onnx = Embedder(vit_conf, "cpu", runtime="onnx")
    bb = onnx.backbone
    side = bb.view_size(vit_conf.image_size // 2)
    with torch.inference_mode():
        want = bb.tokens(bb.preprocess(img, side)[None], {"d": (vit_conf.dense_layer, "source")})["d"][0].numpy()
    got = onnx.dense_view(img, side)
    assert isinstance(onnx.view_runner(side), runtime.OnnxGraph) and got.shape == want.shape
    assert runtime.cosines(want, got).min() >= runtime.MIN_COSINE["onnx"]
    pixels = photo_pixels(vit_conf.image_size)
    batch, single = onnx.embed(pixels), onnx.embed(pixels[1:2])
    for field in ("content", "style", "dense"):
        assert runtime.cosines(getattr(batch, field)[1:2], getattr(single, field)).min() >= 0.99999


def test_a_view_graph_that_cannot_be_written_leaves_the_view_in_torch(tiny_model, tmp_path, monkeypatch):
    """A cache that cannot take a view's graph costs speed, not the query, under auto and onnx alike:
    the view runs in torch, within the ONNX tolerance of the graph's tokens."""
    model = shutil.copytree(tiny_model, tmp_path / "model")  # a configuration no other test has exported
    conf = DescriptorConfig.for_model(str(model), **TINY)
    exporter = Embedder(conf, "cpu", runtime="onnx")
    exporter.export_graph()  # the descriptor graph is there: auto runs a query on it
    img = Image.open(PHOTOS[0]).convert("RGB")
    graph_tokens = exporter.dense_view(img, 28)
    runtime.graph_path({**conf.to_dict(), "dense_view": 28}, exporter.fingerprint).unlink()  # the view's graph is not

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(runtime.cache_dir()))

    monkeypatch.setattr(runtime, "export_graph", unwritable)
    for name in ("auto", "onnx"):
        emb = Embedder(conf, "cpu", runtime=name, weights=exporter.fingerprint)  # as a database's Index makes it
        assert emb.runtime_for(1) == "onnx" and isinstance(emb.view_runner(28), runtime.TorchRunner)
        assert runtime.cosines(graph_tokens, emb.dense_view(img, 28)).min() >= runtime.MIN_COSINE["onnx"]


def test_an_index_run_compiles_the_query_and_its_view(tiny_model, photos, tmp_path):
    """After `add_folder`, a reranked query finds both graphs cached: the descriptor graph and the graph
    of its half-size view; a region's views stay in torch (one session per side otherwise)."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    idx = Index(tmp_path / "db", model=str(model), **TINY)
    idx.add_folder(photos)
    fp, conf = idx.store.meta["weights"], idx.conf.to_dict()
    assert runtime.graph_path(conf, fp).is_file()
    (side,) = idx.view_sides()
    assert side < idx.conf.image_size and runtime.graph_path({**conf, "dense_view": side}, fp).is_file()
    again = Index(tmp_path / "db")
    hits = again.search(QUERIES / "cat_crop.jpg", k=3, rerank="verified")
    assert len(hits) == 3 and isinstance(again.embedder.view_runner(side), runtime.OnnxGraph)
    query = Image.open(QUERIES / "cat_crop.jpg")
    assert len(again.search(query, k=3, box=(0, 0, query.width // 2, query.height // 2))) == 3
    graphs = [key for key, r in again.embedder._views.items() if isinstance(r, runtime.OnnxGraph)]
    assert graphs == [(side, "onnx")]


def test_stable_diffusion_in_bf16_holds_its_tolerance(tiny_sd):
    """The UNet's DiffSim and DIFT taps run in bf16 through the same runner (ONNX covers ViTs only)."""
    conf = DescriptorConfig.for_model(str(tiny_sd), image_size=128)
    eager = Embedder(conf, "cpu", runtime="torch")
    pixels = np.stack([eager.preprocess(Image.open(p).convert("RGB")) for p in PHOTOS[:3]])
    assert_within("torch-bf16", eager.embed(pixels), Embedder(conf, "cpu", runtime="torch-bf16").embed(pixels))


@pytest.mark.slow
def test_embedded_model_runtimes_and_databases_across_them(embedded_model, tmp_path):
    """The embedded DINOv2-S/14 on the sample photos: stored vectors within each runtime's tolerance,
    and a database built in bf16 queried in every runtime finds the same hits with the same fingerprint."""
    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLES, photos)
    built = Index(tmp_path / "db", runtime="torch-bf16")
    assert built.add_folder(photos, batch_size=6).added == 12
    conf = built.conf
    pixels = photo_pixels(conf.image_size)
    eager = Embedder(conf, "cpu", runtime="torch").embed(pixels)
    assert_within("onnx", eager, Embedder(conf, "cpu", runtime="onnx").embed(pixels))
    stored = built.store.rows([h.key for h in built.search_vector(eager.content[0], 12)], ["path", "content"])
    by_path = {r["path"]: np.asarray(r["content"]) for r in stored}
    rows = np.stack([by_path[str(photos / p.name)] for p in PHOTOS])
    assert runtime.cosines(eager.content, rows).min() >= runtime.MIN_COSINE["torch-bf16"]
    query = QUERIES / "cat_crop.jpg"
    answers = {}
    for name in ("torch", "torch-bf16", "onnx"):
        idx = Index(tmp_path / "db", runtime=name)
        answers[name] = [h.path for h in idx.search(query, k=3)]
        assert idx.embedder.fingerprint == built.store.meta["weights"]
    assert answers["torch"] == answers["torch-bf16"] == answers["onnx"]
    assert answers["onnx"][0] == str(photos / "chelsea.jpg")


def test_export_refuses_a_graph_that_differs(tiny_model, tmp_path, monkeypatch):
    """A forward the tracer cannot follow (Python control flow on the batch size) exports a graph that
    is wrong for other batches: the check against eager refuses it and nothing is cached."""
    from simsearch.descriptors.head import DescriptorHead

    class BatchDependent(DescriptorHead):
        def forward(self, pixels):
            content, style, dense = super().forward(pixels)
            return (content if pixels.shape[0] == 1 else -content), style, dense

    model = shutil.copytree(tiny_model, tmp_path / "model")  # a configuration no other test has exported
    emb = Embedder(DescriptorConfig.for_model(str(model), **TINY), "cpu", runtime="onnx")
    head = BatchDependent(emb.backbone, emb.wanted, emb.conf.content_pooling, emb.conf.style_pooling).eval()
    monkeypatch.setitem(emb.__dict__, "head", head)
    with pytest.raises(runtime.RuntimeRefusedError, match="differs from the eager model"):
        emb.export_graph()
    assert not runtime.graph_path(emb.conf.to_dict(), emb.backbone.fingerprint).exists()


def test_graph_cache_misses_new_weights_and_drops_unused_graphs(tiny_model, tmp_path):
    """Touched weights make the cached graph count as absent; a damaged graph is rewritten; writing a graph
    deletes graphs unused for UNUSED_DAYS."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    conf = DescriptorConfig.for_model(str(model), **TINY)
    first = Embedder(conf, "cpu", runtime="onnx")
    fp = first.fingerprint
    path = runtime.graph_path(conf.to_dict(), fp)
    first.export_graph()
    assert path.is_file()
    cold = Embedder(conf, "cpu", weights=fp)
    assert cold._cached_graph() is not None and cold._backbone is None
    weights = model / "model.safetensors"
    data, mtime = weights.read_bytes(), weights.stat().st_mtime_ns
    weights.unlink()
    weights.write_bytes(data)  # the same bytes and mtime in a new file (as cp -p leaves it)
    os.utime(weights, ns=(mtime, mtime))
    assert Embedder(conf, "cpu", weights=fp)._cached_graph() is None
    month = 86400 * (runtime.UNUSED_DAYS + 1)
    stale = path.with_name("0" * 24 + ".onnx")
    stale.write_bytes(b"an old graph")
    os.utime(stale, (stale.stat().st_atime - month, stale.stat().st_mtime - month))
    path.write_bytes(b"not an onnx graph")
    again = Embedder(conf, "cpu", runtime="onnx", weights=fp)
    assert again._cached_graph() is None  # damaged: absent
    again.export_graph()
    assert Embedder(conf, "cpu", weights=fp)._cached_graph() is not None and not stale.exists()


def test_onnx_refuses_what_it_cannot_run(tiny_sd, tiny_model):
    with pytest.raises(SimsearchError, match="runtime onnx covers ViTs"):
        Embedder(DescriptorConfig.for_model(str(tiny_sd), image_size=64), "cpu", runtime="onnx").embed(
            np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(SimsearchError, match="unknown runtime 'onnx-int4'"):
        Index("unused.db", runtime="onnx-int4")


def test_auto_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMSEARCH_RUNTIME_CACHE", str(tmp_path))
    measured = []

    def measure(names):
        measured.append(names)
        return {name: 10.0 + 5 * (name == "onnx") for name in names}

    first = runtime.choose(measure)
    assert first["choice"] == "onnx" and first["machine"] == runtime.machine()
    assert runtime.choose(measure) == first and len(measured) == 1  # read back, not measured again
    record = json.loads(runtime.choice_path().read_text())
    record["machine"]["cpu"] = "another CPU"
    runtime.choice_path().write_text(json.dumps(record))
    runtime.choose(measure)
    assert len(measured) == 2  # another machine's record does not count
    record = json.loads(runtime.choice_path().read_text())
    runtime.choice_path().write_text(json.dumps({**record, "busy": True}))
    runtime.choose(measure)
    assert len(measured) == (2 if runtime.busy() else 3)  # measured while busy: again once it is quiet
    has_bf16 = bool(runtime.cpu_flags() & set(runtime.BF16_FLAGS))
    assert ("torch-bf16" in measured[0]) == has_bf16
    assert "torch-bf16" not in runtime.candidates({"avx2", "fma"})
    assert "torch-bf16" in runtime.candidates({"avx512f", "avx512_bf16"})


@pytest.mark.slow
def test_auto_measurement_runs_every_candidate(tmp_path, monkeypatch):
    """The real measurement on this CPU: every candidate runs and the fastest is recorded."""
    monkeypatch.setenv("SIMSEARCH_RUNTIME_CACHE", str(tmp_path))
    found = runtime.choose(lambda names: runtime.measure_runtimes(names, blocks=1, batch=2, repeats=1))
    assert set(found["img_per_s"]) == set(runtime.candidates(runtime.cpu_flags()))
    assert found["choice"] == max(found["img_per_s"], key=found["img_per_s"].get)


def test_cli_runtime_option_and_the_choice_printed(cli, tiny_model, photos, tmp_path):
    db = tmp_path / "db"
    opts = ["--model", str(tiny_model), "--image-size", "56", "--style-layer", "2", "--dense-layer", "2"]
    code, out, err = cli("index", photos, "--db", db, *opts, "--runtime", "torch-bf16")
    assert code == 0, err
    assert "runtime torch-bf16 ·" in out
    code, out, _ = cli("index", photos, "--db", db, *opts)
    assert code == 0 and "runtime torch (auto)" in out  # auto is pinned to torch for the tests
    code, out, _ = cli("info", "--db", db)
    assert code == 0 and "runtime auto (this machine)" in out and "torch" in out
    code, out, err = cli("query", photos / "chelsea.jpg", "--db", db, "--runtime", "onnx", "--json", "-k", "1")
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["path"] == str(photos / "chelsea.jpg")
    code, _, err = cli("query", photos / "chelsea.jpg", "--db", db, "--runtime", "fast")
    assert code == 1 and "unknown runtime 'fast'" in err


@pytest.mark.slow
def test_cold_query_imports_neither_torch_nor_transformers(embedded_db, tmp_path):
    """After an index run, a fresh `simsearch query` answers from the ONNX graph with onnxruntime, lance,
    faiss, numpy and PIL, and finds what the eager model finds; reranking may load torch."""
    db, photos = embedded_db
    query = QUERIES / "cat_crop.jpg"
    probe = (
        "import json, sys\n"
        "from simsearch.cli import main\n"
        f"sys.argv = ['simsearch', 'query', {str(query)!r}, '--db', {str(db)!r}, '--json', '-k', '5']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'onnxruntime')}))\n"
    )
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    *hits, loaded = proc.stdout.strip().splitlines()
    assert json.loads(loaded) == {"torch": False, "transformers": False, "onnxruntime": True}
    eager = Index(db, runtime="torch").search(query, k=5)
    cold = [json.loads(h) for h in hits]
    assert [h["path"] for h in cold] == [h.path for h in eager]
    assert [h["score"] for h in cold] == pytest.approx([h.score for h in eager], abs=1e-4)
