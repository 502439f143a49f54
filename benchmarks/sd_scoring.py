"""Stable Diffusion as a scoring backbone: what one image costs in the UNet, how all-pairs scoring grows
with N for simsearch (each image through VAE + UNet once, AAS from the cached attention inputs) against
DiffSim's per-pair protocol (both images through VAE + UNet for every pair), and what the stored dense
tensor costs per image, in float16 and int8, with int8's effect on AAS rankings.

    python benchmarks/sd_scoring.py [--quick] [--full-n 4 8] [--tiny-n 10 25 50 100 200] [--out-dir DIR]

No real SD weights exist offline: the models are SD 1.x's own architecture (its original config, the
one simsearch uses for single files) with random weights, full size (860M-parameter UNet) and with
every width divided by 10 (the tests' tiny model). Random weights give honest timings; the rankings
they produce only show what the int8 codec does to them. DiffSim's protocol is timed generously: one
UNet pass on the pair (batch 2), no classifier-free guidance (DiffSim doubles the batch), and on a
sample of pairs (each pair costs the same), reported as pairs / (seconds per pair).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import common
from common import log, measure

IMAGES = sorted(common.EXAMPLES.glob("*.jpg"))


def pixels_of(bb, n: int, size: int) -> torch.Tensor:
    """n real photos (examples/images, repeated with flips beyond 12) as model input."""
    from simsearch.images import open_image

    out = []
    for i in range(n):
        img = open_image(IMAGES[i % len(IMAGES)]).image
        out.append(bb.preprocess(img if i < len(IMAGES) else img.transpose(i // len(IMAGES) % 2), size))
    return torch.stack(out)


@torch.inference_mode()
def simsearch_all_pairs(bb, layer, pixels: torch.Tensor, batch: int) -> tuple[dict, torch.Tensor]:
    """Each image once through VAE + UNet (stopped after the last tap), then AAS on every pair from the
    attention inputs. -> (timings, the dense sources)"""
    from simsearch.rerank.aas import aligned_attention_score, attend

    with measure() as embed:
        dense = torch.cat([bb.tokens(pixels[i:i + batch], {"d": (layer, "source")})["d"] for i in range(0, len(pixels), batch)])
    n = len(pixels)
    with measure() as aas:
        q, k, v = bb.attention_inputs(layer, dense)
        own = attend(q, k, v)
        for a in range(n - 1):
            b = torch.arange(a + 1, n)
            aligned_attention_score((q[a:a + 1], k[a:a + 1], v[a:a + 1]), (q[b], k[b], v[b]), own[a:a + 1], own[b])
    pairs = n * (n - 1) // 2
    total = embed.seconds + aas.seconds
    return {"n": n, "pairs": pairs, "embed_s": embed.seconds, "aas_s": aas.seconds, "seconds": total,
            "pairs_per_s": pairs / total, "load": [embed.load_before, aas.load_after]}, dense


@torch.inference_mode()
def diffsim_per_pair(bb, layer, pixels: torch.Tensor, sample: int) -> dict:
    """DiffSim's protocol on `sample` pairs: for each, VAE-encode both images and run the whole UNet on the
    pair, q/k/v read by a hook on the attention layer that lets the forward finish; then AAS."""
    from simsearch.backbones.base import module_at
    from simsearch.rerank.aas import aligned_attention_score

    attn = module_at(bb.unet, layer)[1]
    seen = {}

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen["qkv"] = tuple(f(h).unflatten(-1, (module.heads, -1)).transpose(1, 2) for f in (module.to_q, module.to_k, module.to_v))

    n = len(pixels)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)][:sample]
    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with measure() as m:
            for a, b in pairs:
                noisy = bb.noisy_latents(pixels[[a, b]])
                t = torch.full((2,), bb.timestep, device=bb.device)
                bb.unet(noisy, t, encoder_hidden_states=bb.prompt_embedding.expand(2, -1, -1))
                q, k, v = seen["qkv"]
                aligned_attention_score((q[:1], k[:1], v[:1]), (q[1:], k[1:], v[1:]))
    finally:
        handle.remove()
    per_pair = m.seconds / len(pairs)
    total_pairs = n * (n - 1) // 2
    return {"n": n, "pairs": total_pairs, "timed_pairs": len(pairs), "seconds_per_pair": per_pair,
            "seconds": per_pair * total_pairs, "pairs_per_s": 1 / per_pair, "load": [m.load_before, m.load_after]}


@torch.inference_mode()
def per_image_costs(bb, layer, size: int, repeats: int) -> dict:
    """One image at `size` px: VAE encode, simsearch's stopped UNet pass, the whole UNet."""
    x = pixels_of(bb, 1, size)
    out = {}
    for name, fn in (("vae_encode", lambda: bb.noisy_latents(x)),
                     ("unet_to_last_tap", lambda: bb.tokens(x, {"d": (layer, "source"), "c": ("up_blocks.1", "features")})),
                     ("unet_whole", lambda: bb.unet(bb.noisy_latents(x), torch.tensor([bb.timestep], device=bb.device),
                                                    encoder_hidden_states=bb.prompt_embedding))):
        fn()  # warm-up
        runs = []
        for _ in range(repeats):
            with measure() as m:
                fn()
            runs.append((m.seconds, m.cpu_seconds, m.load_before))
        out[name] = {"seconds": float(np.median([r[0] for r in runs])), "cpu_seconds": float(np.median([r[1] for r in runs])),
                     "load": float(np.median([r[2] for r in runs]))}
    return out


def int8_agreement(bb, layer, dense: torch.Tensor) -> dict:
    """AAS over all pairs from float32 sources against int8-coded ones: per-query Spearman, same top-1."""
    from simsearch.descriptors.codec import decode_dense, dense_nbytes, encode_dense
    from simsearch.rerank.aas import aligned_attention_score

    t, c = dense.shape[1:]
    coded = torch.stack([torch.from_numpy(decode_dense(encode_dense(d.numpy(), "int8"), t, c, "int8")) for d in dense])

    @torch.inference_mode()
    def matrix(src):
        q, k, v = bb.attention_inputs(layer, src)
        return torch.stack([aligned_attention_score((q[i:i + 1], k[i:i + 1], v[i:i + 1]), (q, k, v)) for i in range(len(q))]).float().cpu().numpy()

    exact, approx = matrix(dense), matrix(coded)
    rho, top1 = [], []
    for i in range(len(exact)):
        others = [j for j in range(len(exact)) if j != i]
        a, b = exact[i, others], approx[i, others]
        rho.append(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])
        top1.append(int(np.argmax(a) == np.argmax(b)))
    return {"tokens": t, "channels": c, "bytes_float16": dense_nbytes(t, c, "float16"), "bytes_int8": dense_nbytes(t, c, "int8"),
            "spearman_mean": float(np.mean(rho)), "spearman_min": float(np.min(rho)), "top1_same": float(np.mean(top1)),
            "queries": len(exact)}


def render(r: dict) -> str:
    m = r["machine"]
    lines = ["# Stable Diffusion scoring: per-image cost, all pairs vs DiffSim's per-pair protocol, storage",
             "", f"`{r['command']}` on {r['date']}: {common.machine_line(m)}. Random-weight SD 1.x architecture "
             "(full size: 860M-parameter UNet; tiny: widths / 10). Timings are wall seconds on a machine shared with "
             "other jobs (load averages beside them); CPU seconds are this process's.", ""]
    if "per_image" in r:
        labels = {"vae_encode": "VAE encode (posterior mean, noised)",
                  "unet_to_last_tap": "VAE + UNet up to its last tap (simsearch: stops after up_blocks[1])",
                  "unet_whole": "VAE + the whole UNet (what DiffSim runs per image)"}
        lines += [f"## One image at 512 px (full-size UNet, {r.get('device', 'cpu')})", "", "| step | wall s | CPU s | load |", "|---|---|---|---|"]
        lines += [f"| {labels[k]} | {v['seconds']:.2f} | {v['cpu_seconds']:.2f} | {v['load']:.1f} |" for k, v in r["per_image"].items()]
        pi = r["per_image"]
        unet_part = pi["unet_to_last_tap"]["cpu_seconds"] - pi["vae_encode"]["cpu_seconds"]
        unet_all = pi["unet_whole"]["cpu_seconds"] - pi["vae_encode"]["cpu_seconds"]
        lines += ["", f"In CPU seconds (the wall times are dominated by the machine's other load): the UNet up to "
                  f"the last tap costs {unet_part:.1f} s, the whole UNet {unet_all:.1f} s ({100 * unet_part / unet_all:.0f}%).", ""]
    for model in ("full", "tiny"):
        if model not in r:
            continue
        rows = r[model]
        lines += [f"## All pairs, {model} model at {rows['size']} px", "",
                  "| N | pairs | simsearch s | simsearch pairs/s | DiffSim per-pair s (timed pairs) | DiffSim pairs/s | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for s, d in zip(rows["simsearch"], rows["diffsim"]):
            lines.append(f"| {s['n']} | {s['pairs']} | {s['seconds']:.1f} | {s['pairs_per_s']:.2f} | "
                         f"{d['seconds']:.1f} ({d['timed_pairs']}) | {d['pairs_per_s']:.3f} | **{d['seconds'] / s['seconds']:.1f}x** |")
        lines.append("")
    if "storage" in r:
        s = r["storage"]
        lines += ["## Stored dense tensor (full size, 512 px: DiffSim's attn1 input)", "",
                  f"{s['tokens']} tokens x {s['channels']} channels: {s['bytes_float16']:,} B per image in float16, "
                  f"{s['bytes_int8']:,} B in int8. AAS rankings over {s['queries']} queries, int8 against float32: "
                  f"Spearman {s['spearman_mean']:.5f} (min {s['spearman_min']:.5f}), same top-1 in "
                  f"{100 * s['top1_same']:.0f}% of queries.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-n", type=int, nargs="*", default=[4, 8], help="N for the full-size model (0 values: skip it)")
    ap.add_argument("--full-size", type=int, default=512)
    ap.add_argument("--full-sample", type=int, default=2, help="pairs timed for DiffSim's protocol, full size")
    ap.add_argument("--tiny-n", type=int, nargs="*", default=[10, 25, 50, 100, 200])
    ap.add_argument("--tiny-size", type=int, default=512)
    ap.add_argument("--tiny-sample", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="seconds, not minutes: tiny model only, small N")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (fp16 and channels-last on CUDA, as simsearch runs it)")
    ap.add_argument("--out-dir", type=common.Path, default=common.RESULTS)
    args = common.parse_args(ap, argv, quick=dict(full_n=[], tiny_n=[4, 6], tiny_size=128, tiny_sample=3, repeats=1))
    common.setup_logging()
    results = {"command": common.command_line(), "date": common.now(), "machine": common.machine_info(),
               "device": args.device}
    if args.full_n:
        bb, layer = common.random_sd(1.0, device=args.device)
        log.info("full-size UNet: %.0fM parameters", sum(p.numel() for p in bb.unet.parameters()) / 1e6)
        results["per_image"] = per_image_costs(bb, layer, args.full_size, args.repeats)
        sims, difs = [], []
        for n in args.full_n:
            x = pixels_of(bb, n, args.full_size)
            s, dense = simsearch_all_pairs(bb, layer, x, args.batch)
            sims.append(s)
            difs.append(diffsim_per_pair(bb, layer, x, args.full_sample))
            log.info("full N=%d: simsearch %.1f s, DiffSim %.1f s", n, s["seconds"], difs[-1]["seconds"])
        results["full"] = {"size": args.full_size, "simsearch": sims, "diffsim": difs}
        results["storage"] = int8_agreement(bb, layer, dense.float().cpu())
        del bb
    if args.tiny_n:
        bb, layer = common.random_sd(0.1, device=args.device)
        sims, difs = [], []
        for n in args.tiny_n:
            x = pixels_of(bb, n, args.tiny_size)
            sims.append(simsearch_all_pairs(bb, layer, x, args.batch)[0])
            difs.append(diffsim_per_pair(bb, layer, x, args.tiny_sample))
            log.info("tiny N=%d: simsearch %.1f s, DiffSim %.1f s", n, sims[-1]["seconds"], difs[-1]["seconds"])
        results["tiny"] = {"size": args.tiny_size, "simsearch": sims, "diffsim": difs}
    # one results file per device kind: sd_scoring (CPU), sd_scoring_cuda
    common.write_results("sd_scoring" if args.device == "cpu" else f"sd_scoring_{args.device}", results, render(results), args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
