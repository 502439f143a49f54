"""Backbone + descriptor configuration -> the vectors and dense tensors stored per image."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .backbones import DEFAULT_MODEL, EMBEDDED, MODELS, descriptor_defaults, embedded, load_backbone
from .backbones import runtime as runtimes
from .descriptors.codec import DENSE_DTYPES
from .descriptors.pooling_spec import CONTENT_POOLINGS, style_parts
from .errors import SimsearchError

if TYPE_CHECKING:
    import torch

    from .backbones import Layer


# What a table recorded before a field existed means by its absence (`from_dict`): the final layer's
# content tokens, mean/std style statistics, and no diffusion settings (only ViT tables predate them).
# Never a model's default: new configurations come from `for_model`.
UNRECORDED_FIELDS = {"content_layer": None, "style_pooling": "meanstd", "timestep": None, "noise_seed": None,
                     "ip_adapter": None}


@dataclass(frozen=True)
class DescriptorConfig:
    """Everything that decides what a stored vector means. Recorded with the table.

    Layers are block indices for ViTs and module paths for the Stable Diffusion UNet. Every field is
    given: `for_model` fills a model's defaults (backbones.descriptor_defaults), `from_dict` a table's record.
    """

    model: str
    image_size: int  # the whole image resized to a square (no crop)
    content_pooling: str  # see descriptors.pooling.CONTENT_POOLINGS
    # Content tokens: the features of this layer; None = the backbone's final features.
    content_layer: Layer | None
    # Style statistics (`style_pooling`, descriptors.pooling.style_pooled) of this layer's features;
    # of several layers (a tuple): each layer's unit-norm vector, concatenated (concat_normalized).
    style_layer: Layer | tuple[Layer, ...]
    style_pooling: str
    dense_layer: Layer  # the source of this layer's attention is stored for reranking (AAS, matches)
    dense_dtype: str
    # diffusion backbones only: DDPM timestep, seed of the fixed noise, IP-Adapter Plus (DiffSim-C)
    timestep: int | None
    noise_seed: int | None
    ip_adapter: str | None

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
        """The configuration for `model`: its descriptor defaults (shared, family, card), then `overrides`.
        The one way a new configuration is made (Embedder, Index, the CLI, the benchmarks)."""
        return cls(model=model, **{**descriptor_defaults(model), **overrides})

    @classmethod
    def parse_variant(cls, text: str) -> tuple[str, dict]:
        """`NAME` (the model's defaults) or `NAME:field=value,field=value` with fields of this class but
        `model` -> (name, overrides); a value is an integer, `none`, several layers joined by `+`
        (3+4+5), or text (parse_layer)."""
        name, _, spec = text.partition(":")
        known = {f.name for f in fields(cls)} - {"model"}
        overrides = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key not in known:
                raise SimsearchError(f"variant {text!r}: '{item}' is not field=value with a field of {', '.join(sorted(known))}")
            overrides[key] = None if value.lower() == "none" else parse_layer(value)
        if not name.strip():
            raise SimsearchError(f"variant {text!r}: needs a name before the colon")
        return name.strip(), overrides

    def backbone_options(self) -> dict:
        """What the backbone's loader takes from this configuration (noise and time for SD)."""
        return {"timestep": self.timestep, "noise_seed": self.noise_seed, "ip_adapter": self.ip_adapter}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DescriptorConfig":
        """A recorded configuration; fields it predates take UNRECORDED_FIELDS, fields it has that this
        version lacks are dropped."""
        names = {f.name for f in fields(cls)}
        return cls(**{**UNRECORDED_FIELDS, **{k: v for k, v in d.items() if k in names}})

    def describe(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def parse_layer(text: str | None) -> Layer | tuple[Layer, ...] | None:
    """A layer written as text: a block index for ViTs, a module path for the UNet; several joined by `+`."""
    if text is not None and "+" in text:
        return tuple(parse_layer(t) for t in text.split("+"))
    return int(text) if text is not None and text.lstrip("-").isdigit() else text


@dataclass
class Embeddings:
    content: np.ndarray  # (B, Dc) float32, unit norm
    style: np.ndarray  # (B, Ds) float32, unit norm
    dense: np.ndarray  # (B, T, C) float32: the source of `dense_layer`'s attention


def weight_files(model: str) -> list[Path]:
    """The local files `model`'s weights and config are read from ([] for a hub id: no network for a
    cache key)."""
    card = MODELS.get(model)
    if card is not None:
        return sorted(p for p in embedded.converted_dir().iterdir() if p.is_file()) if card.source == EMBEDDED else []
    path = Path(model).expanduser()
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path] if path.is_file() else []


class Embedder:
    """One backbone driven by one DescriptorConfig (default: the default model's, as a new Index makes
    it): images in, stored descriptors out, through one of the inference runtimes of backbones.runtime.

    `runtime`: "auto" runs batches in the runtime measured fastest on this machine and single images
    (a query) through the configuration's cached ONNX graph when there is one; any other name runs
    everything in that runtime. `weights`: the fingerprint a database recorded; with it a cached graph
    answers without loading the model, so a cold query imports neither torch nor transformers."""

    def __init__(self, conf: DescriptorConfig | None = None, device: str = "auto", runtime: str = "auto",
                 weights: str | None = None):
        self.conf = conf or DescriptorConfig.for_model()
        self._device = device
        self.runtime = runtimes.check_runtime(runtime)
        if runtime == "onnx" and device not in ("auto", "cpu"):
            raise SimsearchError(f"runtime onnx runs on the CPU; device {device} needs runtime torch")
        self._weights = weights
        self._backbone = None
        self._runners: dict[str, object] = {}
        self._no_graph: set[str] = set()  # fingerprints whose graph is not cached
        self._views: dict[tuple, object] = {}  # (input side, runtime) -> the runner of the dense view there
        self._auto: str | None = None
        self.style_layers = self.conf.style_layer if isinstance(self.conf.style_layer, tuple) else (self.conf.style_layer,)
        self._shapes: tuple[tuple[int, int], dict[str, int]] | None = None

    # -- the model, loaded only when a runner needs it ------------------------------------------
    @property
    def backbone(self):
        if self._backbone is None:
            bb = load_backbone(self.conf.model, self._device, **self.conf.backbone_options())
            self._check(bb)
            self._backbone = bb
        return self._backbone

    @cached_property
    def wanted(self) -> dict[str, tuple]:
        """What one forward taps: {role: (layer, "features" | "source")}."""
        conf = self.conf
        content = self.backbone.final_layer if conf.content_layer is None else conf.content_layer
        return {"content": (content, "features"), "dense": (conf.dense_layer, "source"),
                **{f"style{i}": (layer, "features") for i, layer in enumerate(self.style_layers)}}

    @cached_property
    def head(self):
        """The descriptor forward as one module (descriptors.head), what every runtime runs."""
        from .descriptors.head import DescriptorHead

        return DescriptorHead(self.backbone, self.wanted, self.conf.content_pooling, self.conf.style_pooling).eval()

    def _check(self, bb) -> None:
        conf = self.conf
        bb.check_size(conf.image_size)
        content = bb.final_layer if conf.content_layer is None else conf.content_layer
        for role, (layer, kind) in {"content": (content, "features"), "dense": (conf.dense_layer, "source"),
                                    **{f"style{i}": (s, "features") for i, s in enumerate(self.style_layers)}}.items():
            bb.check_layer(layer, kind, f"{role.rstrip('0123456789')}_layer")
        if conf.content_pooling in ("cls", "cls+mean") and bb.prefix_tokens == 0:
            raise SimsearchError(f"content pooling '{conf.content_pooling}' needs a CLS token; {conf.model} has none (use mean or gem)")

    # -- runtimes ---------------------------------------------------------------------------------
    def _cached_graph(self):
        """The verified ONNX graph of this configuration if one is cached, else None. Before the model
        is loaded, only when the weights' fingerprint is known (a database's): the cold query path."""
        if "onnx" in self._runners:
            return self._runners["onnx"]
        fp = self._weights if self._backbone is None else self._backbone.fingerprint
        if fp is None or fp in self._no_graph or self._device not in ("auto", "cpu"):
            return None
        graph = runtimes.OnnxGraph.load(runtimes.graph_path(self.conf.to_dict(), fp))
        if graph is None or graph.fingerprint != fp or graph.size != self.conf.image_size:
            self._no_graph.add(fp)
            return None
        self._runners["onnx"] = graph
        return graph

    def export_graph(self):
        """This configuration's ONNX graph, exported and verified once; None for models it does not
        cover (Stable Diffusion) or a model on CUDA. RuntimeRefusedError when the export differs."""
        if (graph := self._cached_graph()) is not None:
            return graph
        bb = self.backbone
        if bb.family not in runtimes.ONNX_FAMILIES or bb.device.type != "cpu":
            return None
        if (graph := self._cached_graph()) is None:  # the model's own fingerprint may find one
            graph = runtimes.export_graph(self.head, self.conf.image_size, runtimes.graph_path(self.conf.to_dict(), bb.fingerprint),
                                          bb.fingerprint, weight_files(self.conf.model))
            self._runners["onnx"] = graph
        return graph

    def runtime_for(self, batch: int) -> str:
        """The runtime a batch of `batch` images runs in (see the class docstring for "auto")."""
        if self.runtime != "auto":
            return self.runtime
        if batch == 1 and self._cached_graph() is not None:
            return "onnx"
        if self._auto is None:
            self._auto = self._machine_choice()
        return self._auto

    def _machine_choice(self) -> str:
        if self._device not in ("auto", "cpu"):
            return "torch"
        import torch

        if self._device == "auto" and torch.cuda.is_available():
            return "torch"  # a GPU runs the model in float16
        return runtimes.choose()["choice"]

    def runner(self, name: str):
        """The runner of runtime `name`, made on first use."""
        if name not in self._runners:
            if name == "onnx":
                if self.export_graph() is None:
                    raise SimsearchError(f"runtime onnx covers ViTs on the CPU; {self.conf.model} needs runtime torch")
            else:
                self._runners[name] = runtimes.TorchRunner(self.head, bf16=name == "torch-bf16")
        return self._runners[name]

    # -- verification views -----------------------------------------------------------------------
    def dense_view(self, img: Image.Image, side: int, compiled: bool = True) -> np.ndarray:
        """The dense tap (T', C) float32 of `img` resized whole to `side` pixels: a query seen at another
        scale than the stored grid's (rerank.verify's views, region queries). `compiled`: on that side's
        ONNX graph where single images run on ONNX (`view_runner`); each such graph is a session holding
        the weights up to the dense layer, so callers compile a few fixed sides, not every size they ask for."""
        runner = self.view_runner(side) if compiled else self._torch_view(self.runtime_for(1))
        return runner.run(np.asarray(self.backbone.preprocess(img, side), np.float32)[None])["dense"][0]

    def view_runner(self, side: int):
        """The runner of the dense view at input side `side`, in the runtime a single image runs in
        (`runtime_for(1)`): on ONNX that side's own graph (a DenseHead, exported and verified once like
        the descriptor graph), else eager torch. A graph that cannot be had (refused, a cache that cannot
        be written, an ONNX Runtime failure) leaves the view in torch, with a warning: it costs speed,
        never the query."""
        name = self.runtime_for(1)
        if (side, name) not in self._views:
            bb, runner = self.backbone, None
            if name == "onnx" and bb.family in runtimes.ONNX_FAMILIES and bb.device.type == "cpu":
                from .descriptors.head import DenseHead

                path = runtimes.graph_path({**self.conf.to_dict(), "dense_view": side}, bb.fingerprint)
                runner = runtimes.OnnxGraph.load(path)
                if runner is None or runner.fingerprint != bb.fingerprint or runner.size != side:
                    try:
                        runner = runtimes.export_graph(DenseHead(bb, self.conf.dense_layer).eval(), side, path, bb.fingerprint,
                                                       weight_files(self.conf.model), DenseHead.outputs)
                    except Exception as e:  # noqa: BLE001 - tracer, disk and onnxruntime errors alike: torch serves
                        logging.getLogger(__name__).warning("the %d px view runs in torch (no ONNX graph: %s)", side, e)
                        runner = None
            self._views[side, name] = runner or self._torch_view(name)
        return self._views[side, name]

    def _torch_view(self, name: str):
        """The eager DenseHead runner (bf16 under torch-bf16), shared by every side."""
        if ("torch", name) not in self._views:
            from .descriptors.head import DenseHead

            self._views["torch", name] = runtimes.TorchRunner(DenseHead(self.backbone, self.conf.dense_layer).eval(),
                                                              bf16=name == "torch-bf16", outputs=DenseHead.outputs)
        return self._views["torch", name]

    # -- what the stored rows hold ----------------------------------------------------------------
    def _probe(self) -> tuple[tuple[int, int], dict[str, int]]:
        """Stored shapes, from one forward on a blank image the first time a table needs them."""
        if self._shapes is None:
            size = self.conf.image_size
            e = self.embed(np.zeros((1, 3, size, size), np.float32))
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
        if self._backbone is None and (graph := self._cached_graph()) is not None:
            return graph.fingerprint
        return self.backbone.fingerprint

    @property
    def device(self) -> "torch.device":
        if self._backbone is None and self._cached_graph() is not None:
            import torch

            return torch.device("cpu")  # graphs run on the CPU
        return self.backbone.device

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """RGB image -> (3, S, S) float32 model input."""
        if self._backbone is None and self._cached_graph() is not None:
            from .backbones.pixels import vit_pixels

            return vit_pixels(img, self.conf.image_size)  # graphs are ViTs
        return np.asarray(self.backbone.preprocess(img, self.conf.image_size), dtype=np.float32)

    def embed(self, pixels) -> Embeddings:
        """pixels (B, 3, S, S) as `preprocess` makes them (numpy or torch) -> Embeddings."""
        if not isinstance(pixels, np.ndarray):
            pixels = pixels.numpy(force=True)  # a torch tensor
        out = self.runner(self.runtime_for(len(pixels))).run(np.asarray(pixels, dtype=np.float32))
        return Embeddings(content=out["content"], style=out["style"], dense=out["dense"])
