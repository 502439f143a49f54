"""Helpers for the dense-descriptor / matching / rerank tests (plain functions, no fixtures).

Imported as `import dense_helpers` (tests/ is on sys.path, as for `from conftest import ...`).
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
EXAMPLES = REPO / "examples" / "images"


def save_tiny_dinov2(directory: Path, seed: int = 0, patch_size: int = 8, image_size: int = 32,
                     hidden_size: int = 32, layers: int = 2, heads: int = 2) -> Path:
    """A random-weight Dinov2Model saved with save_pretrained (config.json + safetensors)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=2,
                       patch_size=patch_size, image_size=image_size)
    Dinov2Model(cfg).save_pretrained(directory)
    return Path(directory)


def save_tiny_vit(directory: Path, seed: int = 0) -> Path:
    """A random-weight transformers ViTModel (the DINO v1 family), saved with save_pretrained."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    patch_size=8, image_size=32)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(directory)
    return Path(directory)


def embedded_db(tmp_path_factory, model: str) -> tuple[Path, Path]:
    """A database of the 12 examples/images photos built with `model` (the embedded DINOv2-S/14),
    built once per test session and shared by the modules that need it. -> (db, photos folder)"""
    import shutil

    from simsearch import Index

    root = tmp_path_factory.getbasetemp() / "embedded-examples-db"
    db, photos, done = root / "db", root / "photos", root / "done"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(EXAMPLES, photos)
        report = Index(db, model=model).add_folder(photos)
        assert report.added == 12 and not report.failed, report
        done.touch()
    return db, photos
