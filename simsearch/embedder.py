"""Backbone + descriptor configuration -> the vectors and dense tensors stored per image."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import cached_property

import numpy as np
import torch
from PIL import Image

from .backbones import DEFAULT_MODEL, Layer, compiled, descriptor_defaults, load_backbone
from .backbones.base import resolve_device
from .descriptors.codec import DENSE_DTYPES
from .descriptors.pooling import CONTENT_POOLINGS, concat_normalized, content_vector, style_parts, style_pooled
from .errors import SimsearchError


@dataclass(frozen=True)
class DescriptorConfig:
    """Everything that decides what a stored vector means. Recorded with the table.

    Layers are block indices for ViTs and module paths for the Stable Diffusion UNet. A model starts
    from its family's defaults and its preset's (`for_model`), measured per model.
    """

    model: str = DEFAULT_MODEL
    image_size: int = 224  # the whole image resized to a square (no crop)
    content_pooling: str = "cls"  # see descriptors.pooling.CONTENT_POOLINGS
    # Content tokens: the features of this layer; None = the backbone's final features. The embedded
    # model's last block is its weakest for retrieval: CLS entering block 11 scores 33 mAP on tuxpaint
    # categories vs 20 for the final CLS (its preset sets 11).
    content_layer: Layer | None = None
    # Style statistics (`style_pooling`, descriptors.pooling.style_pooled) of this layer's features;
    # of several layers (a tuple): each layer's unit-norm vector, concatenated (concat_normalized).
    style_layer: Layer | tuple[Layer, ...] = 4
    style_pooling: str = "meanstd"
    dense_layer: Layer = 9  # the source of this layer's attention is stored for reranking (AAS, matches)
    dense_dtype: str = "float16"
    # diffusion backbones only: DDPM timestep, seed of the fixed noise, IP-Adapter Plus (DiffSim-C)
    timestep: int | None = None
    noise_seed: int | None = None
    ip_adapter: str | None = None

    def __post_init__(self):
        if isinstance(self.style_layer, (list, tuple)):  # JSON gives a list; one layer is stored as itself
            layers = tuple(self.style_layer)
            if not layers:
                raise SimsearchError("style_layer: an empty list of layers")
            object.__setattr__(self, "style_layer", layers[0] if len(layers) == 1 else layers)
        try:
            style_parts(self.style_pooling)
        except ValueError as e:
            raise SimsearchError(str(e)) from None
        if self.content_pooling not in CONTENT_POOLINGS:
            raise SimsearchError(f"content pooling '{self.content_pooling}' is not one of {', '.join(CONTENT_POOLINGS)}")
        if self.dense_dtype not in DENSE_DTYPES:
            raise SimsearchError(f"dense dtype '{self.dense_dtype}' is not one of {', '.join(DENSE_DTYPES)}")
        if self.image_size < 14 or self.image_size > 1024:
            raise SimsearchError(f"image size {self.image_size} is outside 14..1024")

    @classmethod
    def for_model(cls, model: str = DEFAULT_MODEL, **overrides) -> "DescriptorConfig":
        """The configuration for `model`: its family's and preset's descriptor defaults, then `overrides`."""
        return cls(model=model, **{**descriptor_defaults(model), **overrides})

    def backbone_options(self) -> dict:
        """What the backbone's loader takes from this configuration (noise and time for SD)."""
        return {"timestep": self.timestep, "noise_seed": self.noise_seed, "ip_adapter": self.ip_adapter}

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
    dense: np.ndarray  # (B, T, C) float32: the source of `dense_layer`'s attention


class Embedder:
    """One backbone driven by one DescriptorConfig: images in, stored descriptors out.

    On the CPU, a configuration compiled before (backbones.compiled) embeds through its cached graph
    and the backbone's library is loaded only when something else needs it (reranking, another input
    size): a cold query does not import transformers."""

    def __init__(self, conf: DescriptorConfig = DescriptorConfig(), device: str = "auto"):
        self.conf = conf
        self._device = device
        self._backbone = None
        self.style_layers = conf.style_layer if isinstance(conf.style_layer, tuple) else (conf.style_layer,)
        self._shapes: tuple[tuple[int, int], dict[str, int]] | None = None
        path = self._compiled_path()
        self.compiled = compiled.CompiledTokens.load(path) if path is not None and path.is_file() else None
        if self.compiled is None:
            self._check(self.backbone)

    def _compiled_path(self):
        """Where this configuration's CPU graph lives, or None when it is not compiled (see backbones.compiled)."""
        return compiled.cache_path(self.conf) if resolve_device(self._device).type == "cpu" else None

    @property
    def backbone(self):
        if self._backbone is None:
            self._backbone = load_backbone(self.conf.model, self._device, **self.conf.backbone_options())
        return self._backbone

    @cached_property
    def wanted(self) -> dict[str, tuple]:
        """What one forward taps: {role: (layer, "features" | "source")}."""
        conf = self.conf
        content = self.backbone.final_layer if conf.content_layer is None else conf.content_layer
        return {"content": (content, "features"), "dense": (conf.dense_layer, "source"),
                **{f"style{i}": (layer, "features") for i, layer in enumerate(self.style_layers)}}

    def _check(self, bb) -> None:
        conf = self.conf
        bb.check_size(conf.image_size)
        for role, (layer, kind) in self.wanted.items():
            bb.check_layer(layer, kind, f"{role.rstrip('0123456789')}_layer")
        if conf.content_pooling in ("cls", "cls+mean") and bb.prefix_tokens == 0:
            raise SimsearchError(f"content pooling '{conf.content_pooling}' needs a CLS token; {conf.model} has none (use mean or gem)")

    def compile(self) -> bool:
        """Write this configuration's CPU graph for later cold starts (once; see backbones.compiled).
        -> whether a graph exists now."""
        if self.compiled is None and (path := self._compiled_path()) is not None:
            self.compiled = compiled.compile_tokens(self.backbone, self.wanted, self.conf.image_size, path)
        return self.compiled is not None

    def _probe(self) -> tuple[tuple[int, int], dict[str, int]]:
        """Stored shapes, from one forward on a blank image the first time a table needs them."""
        if self._shapes is None:
            size = self.conf.image_size
            e = self.embed(torch.zeros(1, 3, size, size))
            self._shapes = tuple(e.dense.shape[1:]), {"content": e.content.shape[1], "style": e.style.shape[1]}
        return self._shapes

    @property
    def dense_shape(self) -> tuple[int, int]:
        """(T, C) of the stored dense tensor."""
        return self._probe()[0]

    @property
    def dims(self) -> dict[str, int]:
        """Widths of the pooled vectors: {"content": Dc, "style": Ds}."""
        return self._probe()[1]

    @property
    def fingerprint(self) -> str:
        return self.compiled.fingerprint if self.compiled is not None else self.backbone.fingerprint

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.compiled is not None and self._backbone is None else self.backbone.device

    @property
    def prefix_tokens(self) -> int:
        return self.compiled.prefix_tokens if self.compiled is not None else self.backbone.prefix_tokens

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        if self.compiled is not None and self._backbone is None:
            from .backbones.vit import vit_preprocess

            return vit_preprocess(img, self.conf.image_size)  # compiled graphs are ViTs
        return self.backbone.preprocess(img, self.conf.image_size)

    def tokens(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.compiled is not None and self.compiled.accepts(pixels):
            return self.compiled.tokens(pixels)
        return self.backbone.tokens(pixels.to(self.backbone.device), self.wanted)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> Embeddings:
        """pixels (B, 3, S, S) as `preprocess` makes them -> Embeddings."""
        p = self.prefix_tokens
        tokens = self.tokens(pixels)
        style = [style_pooled(tokens[f"style{i}"][:, p:], self.conf.style_pooling) for i in range(len(self.style_layers))]
        return Embeddings(
            content=content_vector(tokens["content"], self.conf.content_pooling, prefix=p).cpu().numpy(),
            style=(style[0] if len(style) == 1 else concat_normalized(style)).cpu().numpy(),
            dense=tokens["dense"].float().cpu().numpy(),
        )
