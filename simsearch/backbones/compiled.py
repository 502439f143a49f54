"""A ViT's descriptor forward as a TorchScript graph, cached per weights, taps, input size and torch.

Why: a cold `simsearch query` spent 3.4 s importing transformers' DINOv2 module (torch._dynamo and
torch.distributed come with it) for a 0.2 s forward. The graph is traced from the very modules the
backbone runs, so its outputs are the eager ones (compared when it is written), and it loads with
torch alone in about 0.2 s.

- Written by `Embedder.compile()`, which an index run calls once per configuration on the CPU (it
  has the model loaded anyway), under `$SIMSEARCH_COMPILED_CACHE` or `cache_root()/compiled`, as
  `<key>.pt`.
- The key covers the descriptor configuration, the weight files' (path, size, mtime, ctime, inode) and
  the torch version: new weights or a new torch miss the cache instead of reading a stale graph.
- A load marks the graph used (mtime); writing a graph deletes those unused for UNUSED_DAYS (old weights,
  old torch versions).
- Only ViT families with local weights (the embedded model, a folder) are compiled; hub ids, Stable
  Diffusion and CUDA run the eager backbone. A graph torch can no longer read counts as absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from .embedded import cache_root

if TYPE_CHECKING:
    from ..embedder import DescriptorConfig
    from .base import Backbone

FORMAT = 1
UNUSED_DAYS = 30  # a graph no query has loaded for this long is deleted when another one is written
COMPILED_FAMILIES = ("hf-vit", "timm-vit")
META = "simsearch.json"


@contextmanager
def _quiet() -> Iterator[None]:
    # torch >= 2.9 flags TorchScript as deprecated in favour of torch.export, whose loader imports
    # torch._dynamo (seconds); the warning is not the user's business
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # shapes are constants of a graph traced at one input size: that is what it is used for
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def compiled_dir() -> Path:
    return Path(os.environ.get("SIMSEARCH_COMPILED_CACHE") or cache_root() / "compiled")


def weight_files(model: str) -> list[Path] | None:
    """The local files `model`'s weights and config are read from, or None (hub id, SD, missing)."""
    from . import EMBEDDED, MODELS, embedded, family_of

    if card := MODELS.get(model):
        if card.family not in COMPILED_FAMILIES or card.source != EMBEDDED or not embedded.is_present():
            return None
        folder = embedded.converted_dir()
    else:
        folder = Path(model).expanduser()  # a hub id is never looked up here: no network for a cache key
        if not folder.is_dir() or family_of(model)[0].name not in COMPILED_FAMILIES:
            return None
    return sorted(p for p in folder.iterdir() if p.is_file())


def cache_path(conf: "DescriptorConfig") -> Path | None:
    """Where the graph for `conf` lives (whether or not it exists yet), or None if it is not compiled."""
    files = weight_files(conf.model)
    if not files:
        return None
    # ctime and inode too: a file replaced by another of the same size with its mtime kept (cp -p,
    # rsync -t) is a new key, since nobody can set a file's ctime
    stats = [(str(p.resolve()), *_file_identity(p.stat())) for p in files]
    key = json.dumps({"format": FORMAT, "config": conf.to_dict(), "files": stats, "torch": torch.__version__},
                     sort_keys=True, default=str)
    return compiled_dir() / f"{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}.pt"


def _file_identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class _Taps(torch.nn.Module):
    """The traced function: pixels (B, 3, S, S) -> the wanted tensors, in `names` order."""

    def __init__(self, backbone: "Backbone", wanted: dict):
        super().__init__()
        self.backbone, self.wanted, self.names = backbone, wanted, tuple(wanted)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone.tokens(pixels, self.wanted)
        return tuple(out[name] for name in self.names)


@dataclass
class CompiledTokens:
    """`Backbone.tokens` for one `wanted` at one input size, without the model's library."""

    graph: torch.jit.ScriptModule
    names: tuple[str, ...]
    size: int
    prefix_tokens: int
    fingerprint: str

    def accepts(self, pixels: torch.Tensor) -> bool:
        return pixels.device.type == "cpu" and tuple(pixels.shape[1:]) == (3, self.size, self.size)

    @torch.inference_mode()
    def tokens(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        # Without the profiling executor's specialisation pass: the first (often only) call of a cold
        # process took 0.28 s with it and 0.14 s without (224 px ViT-S/14, 2 cores); later calls too.
        with torch.jit.optimized_execution(False):
            return dict(zip(self.names, self.graph(pixels)))

    @classmethod
    def load(cls, path: Path) -> "CompiledTokens | None":
        meta = {META: ""}
        try:
            with _quiet():
                graph = torch.jit.load(str(path), map_location="cpu", _extra_files=meta)
            m = json.loads(meta[META])
            with suppress(OSError):  # a read-only cache still serves its graphs
                os.utime(path)  # used: kept by the cleanup in compile_tokens
            return cls(graph.eval(), tuple(m["names"]), m["size"], m["prefix_tokens"], m["fingerprint"])
        except (OSError, RuntimeError, ValueError, KeyError, AttributeError):
            return None


def compile_tokens(backbone: "Backbone", wanted: dict, size: int, path: Path) -> CompiledTokens:
    """Trace `backbone.tokens(·, wanted)` at `size`, check it against the eager forward on a batch of
    another size than the traced one, and write it atomically to `path`."""
    taps = _Taps(backbone, wanted).eval()
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with _quiet(), torch.inference_mode():
        graph = torch.jit.trace(taps, example, check_trace=False)
        check = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        found = CompiledTokens(graph, taps.names, size, backbone.prefix_tokens, backbone.fingerprint)
        for name, want, got in zip(taps.names, taps(check), found.tokens(check).values()):
            if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-5, atol=1e-5):
                raise RuntimeError(f"traced '{name}' differs from the eager forward")
    meta = {"names": list(taps.names), "size": size, "prefix_tokens": backbone.prefix_tokens,
            "fingerprint": backbone.fingerprint}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with _quiet():
            torch.jit.save(graph, tmp, _extra_files={META: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    cutoff = time.time() - UNUSED_DAYS * 86400
    for old in path.parent.glob("*.pt"):
        if old != path and old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)
    return found
