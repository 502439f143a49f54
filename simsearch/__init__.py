"""simsearch: image similarity search on dense foundation-model descriptors.

Heavy modules (torch, transformers, lancedb) load on first use, so `simsearch --help` is instant.
"""

from .errors import ConfigMismatchError, EmptyIndexError, ImageError, SimsearchError, WeightsNotFoundError

__version__ = "0.1.0"
__all__ = ["Index", "DescriptorConfig", "Embedder", "load_backbone", "SimsearchError", "ImageError",
           "ConfigMismatchError", "EmptyIndexError", "WeightsNotFoundError"]


def __getattr__(name):
    if name == "Index":
        from .index import Index
        return Index
    if name in ("DescriptorConfig", "Embedder"):
        from . import embedder
        return getattr(embedder, name)
    if name == "load_backbone":
        from .backbones import load_backbone
        return load_backbone
    raise AttributeError(name)
