"""What every benchmark script shares: machine facts, load average, the data root, logging, grouped
folders, results files and timing. A script imports it as `common` (a script's own folder is on
sys.path when it runs), and calls the library only through its public API.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby, islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from debian_data import data_root  # noqa: F401  (one definition of the data root, shared with the tests)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EXAMPLES = HERE.parent / "examples" / "images"

log = logging.getLogger("bench")


def setup_logging() -> None:
    """Progress (`log`) to stderr with the wall-clock time; transformers' warnings and progress bars off."""
    import transformers

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None, quick: dict) -> argparse.Namespace:
    """ap.parse_args; with --quick, `quick` replaces the defaults (options given explicitly still win)."""
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**quick)
        args = ap.parse_args(argv)
    return args


def command_line() -> str:
    """How this run was started, for the results page."""
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def loadavg() -> float:
    """1-minute load average: the machine may be shared (2.0 = both cores of 2 busy)."""
    return os.getloadavg()[0]


def machine_info() -> dict:
    import faiss
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    return {
        "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "faiss": faiss.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
    }


def cpu_facts() -> dict:
    """What `lscpu` calls the CPU, its SIMD flags (what torch and FAISS kernels can use) and `uptime` (the load)."""
    import re
    import subprocess

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    simd = [f for f in flags if re.fullmatch(r"sse4_2|avx|avx2|fma|f16c|avx512\w*|amx\w*|avx_vnni", f)]
    return {"lscpu_model": model, "simd_flags": simd,
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}


def machine_line(m: dict) -> str:
    """One sentence of machine facts for a results page (a fact an older results file lacks is left out)."""
    mem = f", {m['mem_gib']} GiB RAM" if "mem_gib" in m else ""
    return (f"{m['nproc']} CPUs ({m['cpu_model']}){mem}, GPU: {m.get('gpu') or 'none'}; "
            f"torch {m['torch']} with {m['torch_threads']} threads, Python {m['python']}")


# -- data --------------------------------------------------------------------------------------------
def read_grouped(root: str | Path, per_group: int | None = None) -> tuple[list[str], np.ndarray]:
    """(image paths, group labels) of the grouped folder ROOT/<group>/<image>
    (simsearch.bench.suites.read_groups); with `per_group`, the first that many of each group."""
    from simsearch.bench.suites import read_groups  # imports torch: not for scripts that only build data

    paths, labels = read_groups(root)
    if per_group:
        # read_groups lists each group's images together, in sorted order
        groups = groupby(zip(paths, labels), key=lambda pair: pair[1])
        kept = [pair for _, group in groups for pair in islice(group, per_group)]
        paths, labels = [p for p, _ in kept], [g for _, g in kept]
    return paths, np.array(labels)


# -- models ----------------------------------------------------------------------------------------
def random_sd(width: float = 1.0, seed: int = 0, device: str = "cpu"):
    """SD 1.x (v1-inference, simsearch's config for single files) with every channel count times `width` and
    random weights, as a simsearch backbone (no real SD weights exist offline). -> (backbone, DiffSim's layer)"""
    import copy

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm

    from simsearch.backbones import place
    from simsearch.backbones.sd import DIFFSIM_LAYER, SD1_ORIGINAL_CONFIG, StableDiffusionBackbone

    def scaled(channels: int) -> int:  # multiples of 32: LDM's GroupNorm has 32 groups
        return max(32, round(channels * width / 32) * 32)

    cfg = copy.deepcopy(SD1_ORIGINAL_CONFIG)
    p = cfg["model"]["params"]
    p["unet_config"]["params"]["model_channels"] = scaled(320)
    p["unet_config"]["params"]["context_dim"] = scaled(768)
    p["first_stage_config"]["params"]["ddconfig"]["ch"] = scaled(128)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(cfg, {}))
    vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(cfg, {}))
    vae.decoder = vae.post_quant_conv = None
    prompt = torch.randn(1, 77, p["unet_config"]["params"]["context_dim"])
    scheduler = DDPMScheduler(beta_start=p["linear_start"], beta_end=p["linear_end"], beta_schedule="scaled_linear")
    bb = StableDiffusionBackbone(unet, vae, prompt, scheduler, timestep=101).requires_grad_(False).eval()
    return place(bb, device, channels_last=True), DIFFSIM_LAYER



# -- results -----------------------------------------------------------------------------------------
def write_results(name: str, data: dict, markdown: str, out_dir: Path = RESULTS) -> Path:
    """out_dir/<name>.json and out_dir/<name>.md, side by side. -> the JSON path"""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown)
    log.info("wrote %s and %s", path, path.with_suffix(".md").name)
    return path


def update_sections(name: str, sections: dict, render: Callable[[dict], str], out_dir: Path = RESULTS) -> None:
    """Results files made of sections that commands re-run separately (speed, dense): replace the
    given sections and render the markdown from the whole JSON."""
    path = out_dir / f"{name}.json"
    results = {**(json.loads(path.read_text()) if path.exists() else {}), **sections}
    write_results(name, results, render(results), out_dir)


# -- timing ------------------------------------------------------------------------------------------
@dataclass
class Measured:
    """Wall and CPU seconds (all threads of this process) of a block, with the load around it."""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0


@contextmanager
def measure() -> Iterator[Measured]:
    """with measure() as m: ...  then m.seconds, m.cpu_seconds, m.load_before, m.load_after"""
    m = Measured(load_before=loadavg())
    _cuda_sync()
    t, c = time.perf_counter(), time.process_time()
    try:
        yield m
    finally:
        _cuda_sync()  # GPU work launched in the block counts in its time
        m.seconds, m.cpu_seconds, m.load_after = time.perf_counter() - t, time.process_time() - c, loadavg()


def _cuda_sync() -> None:
    torch = sys.modules.get("torch")  # a script that never imported torch launched no GPU work
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def percentile(values, q: float) -> float:
    """Percentile with linear interpolation (numpy's default), values in any order."""
    return float(np.percentile(np.asarray(values, dtype=float), q))
