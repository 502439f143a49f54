"""Query + AAS rerank of 50 candidates, warm, in-process, on each device: what `Index.search(rerank="aas")`
computes after FAISS (the query's forward to the dense layer, then rerank_scores over 50 stored float16
dense tensors), without the model download: the embedded model's architecture (DINOv2-S/14, 224 px)
with random weights, saved and loaded through simsearch's loader (fp16 on CUDA).

    python benchmarks/rerank_device.py [--devices cuda cpu] [--candidates 50] [--runs 20]

Results: benchmarks/results/rerank_device.{json,md} (median and p95 wall ms per device); the committed runs
are rerank_device_h100 (an H100 machine) and rerank_device_2cpu (the 2-core development machine).
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

import common
from common import log


def time_query(device: str, model_dir: str, candidates: int, runs: int) -> dict:
    from simsearch.backbones import load_backbone
    from simsearch.rerank import rerank_scores

    bb = load_backbone(model_dir, device)
    layer = 9  # the embedded model's dense layer
    pixels = torch.randn(1, 3, 224, 224)
    tokens = 1 + (224 // bb.patch_size) ** 2
    # stored tensors come back from the table as float16 values in float32 arrays
    stored = np.random.default_rng(0).standard_normal((candidates, tokens, bb.dim)).astype(np.float16).astype(np.float32)

    def query() -> np.ndarray:
        dense = bb.tokens(pixels, {"d": (layer, "source")})["d"][0].float().cpu().numpy()
        return rerank_scores(bb, layer, dense, stored, "aas")["aas"]

    for _ in range(3):  # warm-up: kernels, allocator
        query()
    seconds = []
    for _ in range(runs):
        with common.measure() as m:
            query()
        seconds.append(m.seconds)
    return {"device": device, "runs": runs, "ms_p50": 1000 * common.percentile(seconds, 50),
            "ms_p95": 1000 * common.percentile(seconds, 95), "load": common.loadavg()}


def render(r: dict) -> str:
    lines = ["# Query + AAS rerank of 50 candidates, per device", "",
             f"`{r['command']}` on {r['date']}: {common.machine_line(r['machine'])}. DINOv2-S/14 architecture "
             f"(random weights), 224 px, {r['candidates']} candidates; wall ms, warm, in-process.", "",
             "| device | runs | ms p50 | ms p95 | load |", "|---|---|---|---|---|"]
    lines += [f"| {x['device']} | {x['runs']} | {x['ms_p50']:.1f} | {x['ms_p95']:.1f} | {x['load']:.1f} |" for x in r["results"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from transformers import Dinov2Config, Dinov2Model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs="+", default=["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="a run of seconds on the CPU")
    ap.add_argument("--out-dir", type=common.Path, default=common.RESULTS)
    args = common.parse_args(ap, argv, quick=dict(devices=["cpu"], candidates=4, runs=2))
    common.setup_logging()
    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(hidden_size=384, num_attention_heads=6, num_hidden_layers=12, image_size=518,
                                 patch_size=14)).save_pretrained(model_dir)
        results = []
        for device in args.devices:
            results.append(time_query(device, model_dir, args.candidates, args.runs))
            log.info("%s: %.1f ms p50", device, results[-1]["ms_p50"])
    r = {"command": common.command_line(), "date": common.now(), "machine": common.machine_info(),
         "candidates": args.candidates, "results": results}
    common.write_results("rerank_device", r, render(r), args.out_dir)


if __name__ == "__main__":
    main()
