"""The one interface every model family implements, and the small tools they share.

A backbone turns a batch of images into what the descriptors need:
- `tokens(pixels, wanted)`: named token tensors (B, T, C) from one forward pass that stops after the
  last one is captured. Each wanted entry is (layer, kind): kind "features" is the layer's descriptor
  tokens (pooled into content and style vectors), kind "source" is what the layer's attention is
  computed from, which is what an index stores as its dense tensor.
- `attention_inputs(layer, source)`: q, k, v (B, heads, T, d) of that attention from stored sources,
  for the Aligned Attention Score and the `matches` reranker, without the image; `attention_keys`
  the keys and the prefix tokens' queries alone, what verification needs.
- `dense_descriptors(pixels, ...)`: a per-cell descriptor grid for correspondences (`match`, PCK).
The first `prefix_tokens` tokens of every tensor are not on the patch grid (a ViT's CLS and register
tokens; none for the UNet). Layers are family data: block indices for ViTs, module paths for the UNet.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from PIL import Image
from torch import nn

from ..errors import SimsearchError, WeightsNotFoundError

Layer = int | str  # a ViT block index, or a module path inside the UNet


@dataclass
class GridFeatures:
    """Per-cell descriptors of one image for correspondences."""

    desc: torch.Tensor  # (B, N, D), row-major over `grid`
    saliency: torch.Tensor | None  # (B, N) in [0, 1], or None when the family has no saliency
    grid: tuple[int, int]  # (h, w)
    stride: int  # pixels of model input between cell centres
    patch: int  # pixels of model input a cell covers (its centre is at stride * i + patch / 2)


class Backbone(nn.Module, ABC):
    family: str = ""
    prefix_tokens: int = 0
    fingerprint: str = ""  # of the weights, taken before any dtype change (see `fingerprint`)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @abstractmethod
    def preprocess(self, img: Image.Image, size: int) -> torch.Tensor:
        """RGB image -> (3, size, size) model input, normalised as the family was trained."""

    @abstractmethod
    def check_layer(self, layer: Layer, kind: str, role: str) -> None:
        """SimsearchError naming `role` (e.g. "dense_layer") unless `layer` can be tapped for `kind`."""

    def check_size(self, size: int) -> None:
        """SimsearchError unless `size` is an input side the family can take."""

    size_multiple: int = 1  # input sides the family takes are multiples of this

    def view_size(self, size: int) -> int:
        """The input side nearest `size` that the family takes (at least one multiple)."""
        m = self.size_multiple
        return max(m, round(size / m) * m)

    @property
    @abstractmethod
    def final_layer(self) -> Layer:
        """The layer whose features stand for the image when none is named (content_layer=None)."""

    @abstractmethod
    def tokens(self, pixels: torch.Tensor, wanted: dict[str, tuple[Layer, str]]) -> dict[str, torch.Tensor]:
        """pixels (B, 3, H, W) -> {name: (B, T, C)} for every (layer, kind) in `wanted`."""

    @abstractmethod
    def attention_inputs(self, layer: Layer, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """source (B, T, C) as `tokens` gave it for (layer, "source") -> q, k, v (B, heads, T', d)."""

    def attention_keys(self, layer: Layer, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> k (B, heads, T', d) of every token and q (B, heads, prefix_tokens, d) of the prefix tokens:
        patch keys and CLS-attention saliency (verification, region cells) without the rest of q and v."""
        q, k, _ = self.attention_inputs(layer, source)
        return k, q[:, :, :self.prefix_tokens]

    @abstractmethod
    def dense_descriptors(self, pixels: torch.Tensor, layer: Layer | None = None, facet: str | None = None,
                          stride: int | None = None) -> GridFeatures:
        """pixels (1, 3, H, W) -> the descriptor grid for correspondences."""

    def dense_metric(self, layer: Layer):
        """(C, C) numpy metric G in which an error in `layer`'s stored source, standardised per token,
        reaches the attention's q, k and v (G = M M^T for their linear map M), or None when the source
        is not mapped linearly. Compact codecs spend their bits by it (descriptors.quant)."""
        return None

    @property
    def match_defaults(self) -> dict:
        """DenseMatcher settings that suit this backbone (layer, facet, stride, log_bin, image_size)."""
        return {}

    @contextmanager
    def matmul_attention(self) -> Iterator[None]:
        """Attention computed as matrix products and a softmax rather than by a fused kernel, until the
        block ends (backbones.runtime's bf16 runner: see ViTBackbone). Here: as the family runs it."""
        yield

    def patch_grid(self, tokens: int) -> tuple[int, int]:
        """The (h, w) grid of a square input's `tokens` (prefix tokens included)."""
        side = round((tokens - self.prefix_tokens) ** 0.5)
        if side * side != tokens - self.prefix_tokens:
            raise ValueError(f"{tokens} tokens are not a square grid after {self.prefix_tokens} prefix tokens")
        return side, side


def projection_metric(weights: list[torch.Tensor], gain: torch.Tensor | None = None):
    """G = M M^T (C, C) float64 numpy for M = diag(gain) [W_1^T | W_2^T | ...], the linear weights
    (out, C) that read a source after a per-channel gain (a LayerNorm's weight)."""
    m = torch.cat([w.detach().double().cpu() for w in weights]).T  # (C, sum of outs)
    if gain is not None:
        m = m * gain.detach().double().cpu()[:, None]
    return (m @ m.T).numpy()


def fingerprint(*modules: nn.Module, extra: bytes = b"") -> str:
    """Short digest of the weights: names, shapes and a strided sample of every tensor.

    Cheap enough to run at every load (no full hash of gigabytes) yet different for any two real
    checkpoints. One module and no `extra` digest exactly as databases from before this interface
    recorded them, so they still open.
    """
    h = hashlib.blake2b(extra, digest_size=8)
    for i, module in enumerate(modules):
        prefix = f"{i}." if i else ""
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().flatten().float().cpu()
            step = max(1, flat.numel() // 256)
            h.update(f"{prefix}{name}{tuple(tensor.shape)}".encode())
            h.update(flat[::step].numpy().tobytes())
    return h.hexdigest()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsNotFoundError("{device} requested but torch sees no CUDA device", device=device)
    return torch.device(device)


def module_at(root: nn.Module, path: str) -> tuple[str, nn.Module]:
    """The submodule at a dotted path whose list indices may be negative, as papers write them
    (`up_blocks.1.attentions.-1.transformer_blocks.-1.attn1`). -> (canonical path, module)"""
    module, parts = root, []
    for part in path.split("."):
        try:
            if isinstance(module, (nn.ModuleList, nn.Sequential)):
                i = int(part)
                part = str(i % len(module)) if -len(module) <= i < len(module) else part
                module = module[int(part)]
            else:
                module = getattr(module, part)
        except (ValueError, IndexError, AttributeError):
            raise SimsearchError(f"'{path}': no module '{part}' at '{'.'.join(parts) or '(root)'}'") from None
        if not isinstance(module, nn.Module):
            raise SimsearchError(f"'{path}': '{part}' is not a module")
        parts.append(part)
    return ".".join(parts), module


class StopForward(Exception):
    """Raised by a capture hook once every wanted tensor is in: nothing after it is computed."""


@contextmanager
def captured(taps: dict[str, tuple[nn.Module, object]], transform: Callable[[str, torch.Tensor], torch.Tensor]
             ) -> Iterator[dict[str, torch.Tensor]]:
    """Capture what `taps` name while the body runs a forward; the forward is stopped (StopForward,
    swallowed here) once all are in. Each tap is (module, how): "input" (the first argument,
    positional or `hidden_states=`), "output" (the tensor, a tuple's first element, or `.sample`), or
    a function (module, args, kwargs) -> tensor of the call's inputs. Hooks are always removed, so the
    model is left exactly as it was.
    """
    got: dict[str, torch.Tensor] = {}

    def store(name: str, value) -> None:
        got[name] = transform(name, value)
        if len(got) == len(taps):
            raise StopForward

    def register(name: str, module: nn.Module, how):
        if how == "output":
            def on_output(module, args, output):
                output = output[0] if isinstance(output, tuple) else output
                store(name, getattr(output, "sample", output))
            return module.register_forward_hook(on_output)
        read = (lambda m, args, kwargs: args[0] if args else kwargs["hidden_states"]) if how == "input" else how
        return module.register_forward_pre_hook(lambda m, args, kwargs: store(name, read(m, args, kwargs)), with_kwargs=True)

    handles = [register(name, module, how) for name, (module, how) in taps.items()]
    try:
        yield got
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
