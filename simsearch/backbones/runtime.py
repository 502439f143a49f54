"""Inference runtimes: how a ViT's descriptor forward (descriptors.head.DescriptorHead) runs here.

    runtime      what runs                                              stored vectors' cosine to `torch`
    torch        eager float32 (CUDA: float16): the reference           1
    torch-bf16   eager under CPU bfloat16 autocast; norms and pooling   >= 0.999
                 in float32, a ViT's attention as matrix products
                 (ViTBackbone.matmul_attention). Fast only with native
                 bf16 (AVX512-BF16, AMX); slower than float32 elsewhere
    onnx         ONNX Runtime on a float32 graph exported from the      >= 0.9999, checked at every export
                 same module; loads without torch, so a cold query
                 never imports it
    auto         `choose`: the fastest of those this CPU supports, measured once per machine (again
                 when the machine was busy then and is quiet now)

Every runtime computes the descriptors of the same weights, so a database built with one is queried
with any other (the weights fingerprint does not change). int8 (the graph's MatMuls quantised dynamically)
is not offered: it kept the same nearest image in 85 % of queries on real JPEGs against a bar of 99 %
(benchmarks/results/runtime.md).

Graphs: exported with torch.onnx (the TorchScript exporter: exact outputs, unlike the dynamo one) at
one input size, so the position table interpolated to that grid is a constant of the graph; the batch
dimension is free. A graph is of the descriptor head (descriptors.head.DescriptorHead: content, style,
dense) or of the dense tap alone at a query view's size (DenseHead: dense), its outputs recorded in it.
A single image runs in a session with the batch fixed at 1 (planned as a static graph: faster for one
image), other batches in one over the free dimension. Each graph is compared with the eager module on a
batch of another size than the traced one and on a single image, and refused (`RuntimeRefusedError`)
below the tolerance above. They live under `cache_dir()` as `<key>.onnx`, the key covering FORMAT, the
descriptor configuration (with the view's side for a DenseHead), the weights fingerprint and the
onnxruntime version; the graph records the identity (size, mtime, ctime, inode) of the weight files it
came from, and a graph whose files have changed since counts as absent. A load marks a graph used;
writing one deletes those unused for UNUSED_DAYS.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import SimsearchError
from .embedded import cache_root

if TYPE_CHECKING:
    import torch

RUNTIMES = ("torch", "torch-bf16", "onnx")
CHOICES = ("auto", *RUNTIMES)
MIN_COSINE = {"torch": 1.0, "torch-bf16": 0.999, "onnx": 0.9999}
ONNX_FAMILIES = ("hf-vit", "timm-vit")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bfloat16 arithmetic (Cooper Lake / Zen 4, Sapphire Rapids)
FORMAT = 2  # 2: outputs recorded, checked in the batch-1 session too
OPSET = 17
UNUSED_DAYS = 30
OUTPUTS = ("content", "style", "dense")


class RuntimeRefusedError(SimsearchError):
    """An exported graph whose outputs differ from the eager module's beyond the runtime's tolerance."""


def cache_dir() -> Path:
    """`$SIMSEARCH_RUNTIME_CACHE`, else `cache_root()/runtime`: the graphs and the machine's choice."""
    return Path(os.environ.get("SIMSEARCH_RUNTIME_CACHE") or cache_root() / "runtime")


def check_runtime(name: str) -> str:
    if name not in CHOICES:
        raise SimsearchError(f"unknown runtime '{name}' (choose from {', '.join(CHOICES)})")
    return name


def cosines(want: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-row cosine of two (B, ...) arrays -> (B,)."""
    a, b = want.reshape(len(want), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


# -- the CPU ------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where there is none)."""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.partition(":")[2].split())
    return set()


def cpu_name() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    import platform

    return platform.processor() or platform.machine()


def candidates(flags: set[str]) -> tuple[str, ...]:
    """The CPU runtimes worth measuring on a CPU with these flags: bf16 only where it is native."""
    return ("torch", "onnx", *(("torch-bf16",) if flags & set(BF16_FLAGS) else ()))


# -- torch ----------------------------------------------------------------------------------------
class TorchRunner:
    """A head (DescriptorHead, or DenseHead and its `outputs`) run eagerly, in float32 or under
    bfloat16 autocast (CPU)."""

    def __init__(self, head, bf16: bool = False, outputs: tuple[str, ...] = OUTPUTS):
        self.head, self.bf16, self.outputs = head, bf16, outputs
        self.name = "torch-bf16" if bf16 else "torch"

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        device = self.head.backbone.device
        if self.bf16 and device.type != "cpu":
            raise SimsearchError("runtime torch-bf16 runs on the CPU (CUDA already runs float16); use runtime torch")
        x = torch.as_tensor(pixels).to(device)
        with (torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16),
              self.head.backbone.matmul_attention() if self.bf16 else nullcontext()):
            out = self.head(x)
        return {name: t.float().cpu().numpy() for name, t in zip(self.outputs, out)}


# -- ONNX Runtime ---------------------------------------------------------------------------------
def _ort():
    import onnxruntime

    return onnxruntime


def graph_path(conf: dict, fingerprint: str) -> Path:
    """Where the graph of the configuration `conf` (DescriptorConfig.to_dict()) on weights `fingerprint`
    lives, whether or not it exists yet."""
    key = json.dumps({"format": FORMAT, "config": conf, "weights": fingerprint, "onnxruntime": _ort().__version__},
                     sort_keys=True, default=str)
    return cache_dir() / f"{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}.onnx"


def file_identity(paths: list[Path]) -> list[list]:
    """(path, size, mtime, ctime, inode) of each file: a file replaced by another of the same size with its
    mtime kept (cp -p, rsync -t) still differs, since nobody can set a file's ctime."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return out


def _session(path: Path, batch: int | None = None):
    """An ONNX Runtime session of the graph at `path`; `batch`: its free batch dimension fixed at
    that size, so the graph is planned as a static one (a single image runs ~30 % faster so here)."""
    ort = _ort()
    opts = ort.SessionOptions()
    if batch is not None:
        opts.add_free_dimension_override_by_name("batch", batch)
    # the same thread settings torch honours; idle workers sleep when asked to (a shared machine)
    opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class OnnxGraph:
    """A verified graph of one configuration at one input size, run by ONNX Runtime on the CPU:
    single images (queries) in a session of their own with the batch fixed at 1 (made by `load`,
    which reads the graph's metadata through it), other batches in one over the free batch dimension
    (made on first use)."""

    path: Path
    size: int
    fingerprint: str
    weight_files: list
    min_cosine: float
    name: str = "onnx"
    outputs: tuple[str, ...] = OUTPUTS  # ("dense",) for a DenseHead's
    sessions: dict = field(default_factory=dict, repr=False, compare=False)  # 1 or None (any batch) -> session

    def session(self, batch: int):
        key = 1 if batch == 1 else None
        if key not in self.sessions:
            self.sessions[key] = _session(self.path, key)
        return self.sessions[key]

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.shape[1:] != (3, self.size, self.size):
            raise SimsearchError(f"the ONNX graph takes (B, 3, {self.size}, {self.size}) pixels, not {tuple(pixels.shape)}")
        return dict(zip(self.outputs, self.session(len(pixels)).run(list(self.outputs), {"pixels": pixels})))

    @classmethod
    def load(cls, path: Path) -> "OnnxGraph | None":
        """The graph at `path`, or None when it is absent, damaged, or its weight files changed since."""
        if not path.is_file():
            return None
        try:
            session = _session(path, 1)  # the cold query's session: it reads the metadata too
            meta = json.loads(session.get_modelmeta().custom_metadata_map["simsearch"])
            files = meta["weight_files"]
            if files and file_identity([Path(f[0]) for f in files]) != files:
                return None
        except Exception:  # noqa: BLE001 - an unreadable graph (or vanished weights) is rebuilt, never fatal
            return None
        with suppress(OSError):  # a read-only cache still serves its graphs
            os.utime(path)
        return cls(path, meta["size"], meta["fingerprint"], files, meta["min_cosine"],
                   outputs=tuple(meta.get("outputs", OUTPUTS)), sessions={1: session})


def export_graph(head, size: int, path: Path, fingerprint: str, weight_files: list[Path],
                 outputs: tuple[str, ...] = OUTPUTS) -> OnnxGraph:
    """Export `head` (a DescriptorHead on the CPU, float32, or another head returning `outputs`) at
    input side `size` to `path`, verified against the eager module; RuntimeRefusedError when it
    differs. Written atomically."""
    import onnx
    import torch

    gen = torch.Generator().manual_seed(0)
    check = torch.randn(3, 3, size, size, generator=gen)
    with torch.inference_mode():
        want = [t.numpy() for t in head(check)]  # eager first: it also fills the pooling's caches
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # tracer notes on shapes: constants at one input size is the point
            torch.onnx.export(head, (check[:1],), tmp, input_names=["pixels"], output_names=list(outputs),
                              dynamic_axes={n: {0: "batch"} for n in ("pixels", *outputs)}, opset_version=OPSET,
                              dynamo=False)
        graph = OnnxGraph(Path(tmp), size, fingerprint, [], 0.0, outputs=outputs)
        got, single = graph.run(check.numpy()), graph.run(check[:1].numpy())  # both sessions
        worst = min(min(float(cosines(w, got[n]).min()), float(cosines(w[:1], single[n]).min()))
                    for w, n in zip(want, outputs))
        if worst < MIN_COSINE["onnx"]:
            raise RuntimeRefusedError(f"the exported ONNX graph differs from the eager model (cosine {worst:.6f} < "
                                      f"{MIN_COSINE['onnx']}); runtime torch still works")
        graph.weight_files, graph.min_cosine = file_identity(weight_files), worst
        model = onnx.load(tmp)
        meta = {"size": size, "fingerprint": fingerprint, "weight_files": graph.weight_files, "min_cosine": worst,
                "torch": torch.__version__, "outputs": list(outputs)}
        model.metadata_props.add(key="simsearch", value=json.dumps(meta))
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    graph = OnnxGraph(path, size, fingerprint, graph.weight_files, worst, outputs=outputs)
    cutoff = time.time() - UNUSED_DAYS * 86400
    for old in path.parent.glob("*.onnx"):
        if old != path and old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)
    return graph


# -- auto -----------------------------------------------------------------------------------------
def machine() -> dict:
    """What a measured choice depends on: the CPU, its flags that matter, the cores, the libraries."""
    from importlib.metadata import version

    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", *BF16_FLAGS)
    return {"cpu": cpu_name(), "flags": sorted(f for f in wanted if f in flags), "cores": os.cpu_count(),
            "threads": os.environ.get("OMP_NUM_THREADS") or "default",
            "torch": version("torch"), "onnxruntime": version("onnxruntime")}


def choice_path() -> Path:
    return cache_dir() / "choice.json"


def busy() -> bool:
    """Whether other work holds the cores (1-minute load above their count): timings then mislead."""
    return os.getloadavg()[0] > (os.cpu_count() or 1)


def recorded_choice() -> dict | None:
    """The measurement recorded for this machine, or None: none yet, made on another CPU or libraries,
    or made while the machine was busy and it is quiet now (measured again, once)."""
    with suppress(OSError, ValueError):
        found = json.loads(choice_path().read_text())
        if found.get("machine") == machine() and found.get("choice") in RUNTIMES:
            return None if found.get("busy") and not busy() else found
    return None


def choose(measure: Callable[[tuple[str, ...]], dict[str, float]] | None = None) -> dict:
    """The CPU runtime `auto` means on this machine: {"choice", "img_per_s", "machine", "reason"}.

    Measured once (`measure_runtimes` unless given: a few forwards of a small random ViT-S-shaped model
    in each candidate) and recorded in `choice_path()`; later calls read the record."""
    if found := recorded_choice():
        return found
    names = candidates(cpu_flags())
    speeds = (measure or measure_runtimes)(names)
    skipped = "" if "torch-bf16" in names else "; torch-bf16 not measured: no native bf16 (avx512_bf16/amx_bf16)"
    return record_choice(max(speeds, key=speeds.get), speeds,
                         f"fastest of {', '.join(names)} on a 4-block ViT-S/14 at 224 px, batch 8{skipped}")


def record_choice(choice: str, speeds: dict[str, float], reason: str) -> dict:
    """Record what `auto` means on this machine (atomically) and return the record."""
    found = {"choice": check_runtime(choice), "img_per_s": {k: round(v, 2) for k, v in speeds.items()},
             "machine": machine(), "reason": reason, "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "load": round(os.getloadavg()[0], 2), "busy": bool(speeds) and busy()}
    path = choice_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="choice", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(found, f, indent=2)
    os.replace(tmp, path)
    return found


def measure_runtimes(names: tuple[str, ...], blocks: int = 4, batch: int = 8, repeats: int = 3) -> dict[str, float]:
    """img/s of each runtime in `names` on a random-weight DINOv2-S/14 of `blocks` blocks at 224 px,
    loaded as any hf-vit checkpoint is (best of `repeats` after a warm-up)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from ..descriptors.head import DescriptorHead
    from .hf_vit import KINDS, HFViT

    torch.manual_seed(0)
    net = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=blocks, num_attention_heads=6, patch_size=14,
                                   image_size=518, layerscale_value=1.0)).eval()
    backbone = HFViT(net, KINDS["dinov2"]).requires_grad_(False)
    wanted = {"content": (blocks, "features"), "dense": (blocks - 1, "source"), "style0": (blocks // 2, "features")}
    head = DescriptorHead(backbone, wanted, "cls", "meanstd").eval()
    pixels = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="simsearch-measure-") as tmp:
        runners = {name: export_graph(head, 224, Path(tmp) / "probe.onnx", "probe", []) if name == "onnx"
                   else TorchRunner(head, bf16=name == "torch-bf16") for name in names}
        for runner in runners.values():
            runner.run(pixels)  # warm-up: kernels chosen, memory allocated
        best = dict.fromkeys(names, float("inf"))
        for _ in range(repeats):  # interleaved, so that a burst of load on a shared machine hits every runtime
            for name, runner in runners.items():
                t0 = time.perf_counter()
                runner.run(pixels)
                best[name] = min(best[name], time.perf_counter() - t0)
    return {name: batch / seconds for name, seconds in best.items()}
