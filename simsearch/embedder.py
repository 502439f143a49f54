"""Backbone + descriptor configuration -> the vectors and dense tensors stored per image."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image

from .backbones import DEFAULT_MODEL, MODELS, load_backbone
from .descriptors.codec import DENSE_DTYPES
from .descriptors.pooling import CONTENT_POOLINGS, content_vector, style_vector
from .errors import SimsearchError
from .images import to_tensor


@dataclass(frozen=True)
class DescriptorConfig:
    """Everything that decides what a stored vector means. Recorded with the table."""

    model: str = DEFAULT_MODEL
    image_size: int = 224  # the whole image resized to a square (no crop)
    content_pooling: str = "cls"  # see descriptors.pooling.CONTENT_POOLINGS
    # Content tokens: the normed input to this block; None = the final normed output. Presets may
    # set it (ModelCard.descriptor_defaults): the embedded model's last block is its weakest for
    # retrieval, CLS entering block 11 scores 33 mAP on tuxpaint categories vs 20 for the final CLS.
    content_layer: int | None = None
    style_layer: int = 4  # channel statistics of the normed input to this block
    dense_layer: int = 9  # the hidden state entering this block is stored for reranking
    dense_dtype: str = "float16"

    def __post_init__(self):
        if self.content_pooling not in CONTENT_POOLINGS:
            raise SimsearchError(f"content pooling '{self.content_pooling}' is not one of {', '.join(CONTENT_POOLINGS)}")
        if self.dense_dtype not in DENSE_DTYPES:
            raise SimsearchError(f"dense dtype '{self.dense_dtype}' is not one of {', '.join(DENSE_DTYPES)}")
        if self.image_size < 14 or self.image_size > 1024:
            raise SimsearchError(f"image size {self.image_size} is outside 14..1024")

    @classmethod
    def for_model(cls, model: str = DEFAULT_MODEL, **overrides) -> "DescriptorConfig":
        """The configuration for `model`: its preset's descriptor defaults, then `overrides`."""
        card = MODELS.get(model)
        return cls(model=model, **{**(card.descriptor_defaults if card else {}), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DescriptorConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def describe(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class Embeddings:
    content: np.ndarray  # (B, Dc) float32, unit norm
    style: np.ndarray  # (B, Ds) float32, unit norm
    dense: np.ndarray  # (B, T, C) float32, hidden state entering `dense_layer`


class Embedder:
    def __init__(self, conf: DescriptorConfig = DescriptorConfig(), device: str = "auto"):
        self.conf = conf
        self.backbone = load_backbone(conf.model, device)
        n = self.backbone.num_layers
        # style and dense read block l's own norm and attention, so l < n; content may be the final output (n)
        for name, top in (("content_layer", n), ("style_layer", n - 1), ("dense_layer", n - 1)):
            value = getattr(conf, name)
            if value is not None and not 0 <= value <= top:
                raise SimsearchError(f"{name}={value} is outside 0..{top} for {conf.model} ({n} blocks)")
        h, w = self.backbone.grid_size(conf.image_size, conf.image_size)
        self.dense_shape = (1 + h * w, self.backbone.dim)
        dc = self.backbone.dim * (2 if conf.content_pooling == "cls+mean" else 1)
        self.dims = {"content": dc, "style": 2 * self.backbone.dim}

    @property
    def fingerprint(self) -> str:
        return self.backbone.fingerprint

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return to_tensor(img, self.conf.image_size)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> Embeddings:
        """pixels (B, 3, S, S) normalised -> Embeddings."""
        c, bb = self.conf, self.backbone
        content_layer = bb.num_layers if c.content_layer is None else c.content_layer
        layers = (content_layer, c.style_layer, c.dense_layer)
        # Blocks after the last one any descriptor reads are never run.
        out = bb(pixels.to(self.device), keep=set(layers), last_block=max(layers))

        def normed(layer: int) -> torch.Tensor:
            return out.tokens if layer == bb.num_layers else bb.prenorm(layer, out.hidden[layer])

        return Embeddings(
            content=content_vector(normed(content_layer), c.content_pooling).cpu().numpy(),
            style=style_vector(normed(c.style_layer)[:, 1:]).cpu().numpy(),
            dense=out.hidden[c.dense_layer].float().cpu().numpy(),
        )
