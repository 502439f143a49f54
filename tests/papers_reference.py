"""The papers' OWN way of computing SD features and scores, re-implemented on current diffusers.

Equivalence tests run the library's hooks and these functions on the same tiny model and compare. Each
function mirrors one file/function of the public code (named in its docstring) and lists where it had to
deviate. The code is ours: structure and formulas follow theirs, nothing is pasted.

Sources read: showlab/DiffSim (diffsim/diffsim.py, diffsim/diffsim_pipeline.py, diffsim/hacked_attn.py,
argprocess.py, *_main.sh); Junyi42/sd-dino (extractor_sd.py, pck_spair_pascal.py,
utils/utils_correspondence.py, and its vendored third_party/ODISE: odise/modeling/meta_arch/ldm.py,
odise/modeling/backbone/feature_extractor.py, odise/modeling/meta_arch/odise.py); NVlabs/ODISE
(odise/modeling/diffusion/gaussian_diffusion.py, configs); Tsingularity/dift (src/models/dift_sd.py);
ubc-vision/LDM_correspondences (utils/optimize_token.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from tiny_sd import SD15_SCHEDULER


class _Stop(Exception):
    """Raised by a hook to end a UNet forward once every wanted tensor is captured."""


@contextmanager
def _hooked(*handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _run(unet, sample, t, text_emb, **kw) -> None:
    try:
        unet(sample, t, encoder_hidden_states=text_emb, return_dict=False, **kw)
    except _Stop:
        pass


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, ..., heads*d) -> (B, heads, T, d), as `.view(B, -1, heads, d).transpose(1, 2)` in DiffSim."""
    return x.reshape(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


# -- DiffSim ----------------------------------------------------------------------------------------
DIFFSIM_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn1"  # up_blocks[1:][0].attentions[-1]...[-1]
DIFFSIM_PROMPT = "High quality image"  # argprocess.py default; the published *_main.sh never pass --prompt


def diffsim_timestep(target_step: int) -> int:
    """DiffSim's "target_step" -> the DDPM timestep t the UNet and add_noise see.

    Mirrors diffsim_pipeline.DiffSimPipeline.step: `retrieve_timesteps(scheduler, 1000)` then
    `t = timesteps[sample_timestep]` with SD 1.5's PNDMScheduler (steps_offset=1, skip_prk_steps):
    timesteps are [1000, 999, 999, 998, ...], so 900 -> 101 (Sref), 750 -> 251 (IPref).
    """
    from diffusers import PNDMScheduler

    sched = PNDMScheduler(**SD15_SCHEDULER)
    sched.set_timesteps(1000)
    return int(sched.timesteps[target_step])


def diffsim_preprocess(pil, size: int = 512) -> torch.Tensor:
    """diffsim.process_image: RGB, LANCZOS to size x size (aspect not kept), (x/255 - 0.5)/0.5.
    (Their load_image also applies the EXIF orientation; pass PIL images already opened that way.)"""
    from PIL import Image

    x = np.asarray(pil.convert("RGB").resize((size, size), resample=Image.Resampling.LANCZOS), np.float32)
    return torch.from_numpy((x / 255.0 - 0.5) / 0.5).permute(2, 0, 1)[None]  # (1, 3, size, size)


@torch.no_grad()
def diffsim_latents(pil_a, pil_b, vae, seed: int = 2334, target_step: int = 900, size: int = 512):
    """Noisy latents of one DiffSim pair -> (noisy_a, noisy_b), each (1, 4, size/8, size/8).

    Mirrors DiffSim.diffsim + DiffSimPipeline.step: ONE generator per pair (get_generator(seed)), drawn
    in the order VAE sample A, VAE sample B (prepare_image_latents: latent_dist.sample(generator) *
    scaling_factor), then noise A, noise B (randn_tensor in step(), one call per image), noised with the
    SD 1.5 PNDM scheduler's add_noise at `diffsim_timestep(target_step)`.
    Deviation: their generator lives on CUDA and they run fp16; here it lives on the VAE's device, so on
    CPU the random numbers (not the procedure) differ from their published runs.
    """
    from diffusers import PNDMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    gen = torch.Generator(vae.device).manual_seed(seed)
    dtype = vae.dtype
    latents = [vae.encode(diffsim_preprocess(p, size).to(vae.device, dtype)).latent_dist.sample(gen)
               * vae.config.scaling_factor for p in (pil_a, pil_b)]
    t = torch.tensor([diffsim_timestep(target_step)], device=vae.device)
    sched = PNDMScheduler(**SD15_SCHEDULER)
    return tuple(sched.add_noise(lat, randn_tensor(lat.shape, generator=gen, device=vae.device, dtype=dtype), t)
                 for lat in latents)


def diffsim_text_emb(pipe, prompt: str = DIFFSIM_PROMPT) -> torch.Tensor:
    """(2, 77, D): [uncond "", cond prompt], the batch DiffSim's step() builds (guidance_scale 7.5 ->
    classifier-free guidance -> `torch.cat([negative_prompt_embeds, prompt_embeds])`). The latent goes
    in twice (`torch.cat([latents] * 2)`), so captured Q/K/V have batch 2 and AAS uses both halves."""
    cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, True)
    return torch.cat([uncond, cond])


def diffsim_qkv(unet, latents_noisy, t, text_emb, layer_path: str = DIFFSIM_LAYER, added_cond_kwargs=None):
    """Q, K, V of one attention module, the DiffSim way -> q (B, heads, T, d) and k, v.

    Mirrors diffsim.sd15_attention_forward_hooked (+ hacked_attn.hacked_AttnProcessor2_0): a forward
    PRE-hook on the Attention module takes its input hidden states and re-runs `to_q`, `to_k`, `to_v`
    and the head split itself; K/V come from the hidden states (self-attention, encoder states None).
    On an IP-Adapter attn2 (sd15_ipa_attention_forward_hooked + hacked_IPAdapterAttnProcessor2_0) it
    returns Q from the hidden states and LISTS k, v with one entry per adapter from `to_k_ip[i]`,
    `to_v_ip[i]` of the IP image tokens; the text K/V and the IP scale are ignored, as theirs.

    Deviations for current diffusers: BasicTransformerBlock calls attn1/attn2 with the hidden states
    positionally and `encoder_hidden_states` as a keyword, so the hook is registered `with_kwargs=True`
    (their IP hook unpacks `input[:2]` and cannot run on diffusers >= 0.29). Their hooks are never
    removed (one more per call); this one is removed in `finally`. Pass `t` as DiffSim's DDPM t
    (see diffsim_timestep); `scheduler.scale_model_input` is the identity for PNDM. For the IP path
    DiffSim's step() builds `image_embeds` with `pipe.prepare_ip_adapter_image_embeds(img, None, device, 1,
    True)`: under CFG the uncond half is the CLIP hidden_states[-2] of an all-zero image.
    """
    attn = unet.get_submodule(layer_path)
    out = {}

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]  # (B, T, C)
        ctx = kwargs.get("encoder_hidden_states")
        q = _heads(module.to_q(h), module.heads)
        if isinstance(ctx, tuple):  # IP-Adapter attn2 gets (text tokens, [ip tokens per adapter])
            proc = module.processor
            k = [_heads(lin(ip), module.heads) for lin, ip in zip(proc.to_k_ip, ctx[1])]
            v = [_heads(lin(ip), module.heads) for lin, ip in zip(proc.to_v_ip, ctx[1])]
        else:
            k, v = _heads(module.to_k(h), module.heads), _heads(module.to_v(h), module.heads)
        out["qkv"] = (q, k, v)

    with _hooked(attn.register_forward_pre_hook(hook, with_kwargs=True)):
        _run(unet, latents_noisy, t, text_emb, added_cond_kwargs=added_cond_kwargs)
    return out["qkv"]


def diffsim_aas(q_a, k_a, v_a, q_b, k_b, v_b) -> torch.Tensor:
    """DiffSim's Aligned Attention Score (DiffSim.diffsim, similarity='cosine' as in every *_main.sh).

        a_on_b = SDPA(Q_A, K_B, V_B)   self_a = SDPA(Q_A, K_A, V_A)     (torch SDPA, scale 1/sqrt(d))
        b_on_a = SDPA(Q_B, K_A, V_A)   self_b = SDPA(Q_B, K_B, V_B)
        AAS = ( cos(flat(a_on_b), flat(self_a)) + cos(flat(b_on_a), flat(self_b)) ) / 2

    `flat` flattens the whole (B, heads, T, d) output, batch (uncond + cond halves) and heads included,
    into one vector: one cosine per direction, not a mean of per-token cosines. With IP-Adapter K/V
    lists (one per adapter) each direction is the mean over adapters of that cosine.
    (The argparse default similarity is 'mse' -- F.mse_loss of the same pairs, lower = closer -- but the
    published scripts pass `--similarity cosine`.)
    """
    if isinstance(k_a, (list, tuple)):
        return torch.stack([diffsim_aas(q_a, ka, va, q_b, kb, vb)
                            for ka, va, kb, vb in zip(k_a, v_a, k_b, v_b)]).mean()

    def cos(x, y):
        return F.cosine_similarity(x.reshape(1, -1), y.reshape(1, -1))[0]

    sdpa = F.scaled_dot_product_attention
    return (cos(sdpa(q_a, k_b, v_b), sdpa(q_a, k_a, v_a)) + cos(sdpa(q_b, k_a, v_a), sdpa(q_b, k_b, v_b))) / 2


# -- ODISE decoder features, as sd-dino uses them --------------------------------------------------
def ldm_output_blocks(unet) -> list[list[torch.nn.Module]]:
    """diffusers' decoder regrouped as LDM's `output_blocks` (12 for SD 1.x).

    LDM output block 3*i + j is [up_blocks[i].resnets[j], up_blocks[i].attentions[j] (if the level has
    attention), up_blocks[i].upsamplers[0] (last j of a level with an upsampler)] -- the mapping diffusers'
    own converter uses (output_blocks.k.0 -> up_blocks[k//3].resnets[k%3], .1 -> attentions[k%3]).
    """
    blocks = []
    for up in unet.up_blocks:
        attns = getattr(up, "attentions", None) or [None] * len(up.resnets)
        for j, (res, att) in enumerate(zip(up.resnets, attns)):
            last = j == len(up.resnets) - 1 and up.upsamplers is not None
            blocks.append([m for m in (res, att, up.upsamplers[0] if last else None) if m is not None])
    return blocks


def odise_decoder_features(unet, latents_noisy, t, text_emb, indices=(2, 5, 8), time_emb_offset=None) -> dict:
    """{k: decoder stream ENTERING LDM output block k, before the skip concat} for k in indices.

    Mirrors ODISE's LdmExtractor.unet_forward, `decoder_only` branch (sd-dino's
    third_party/ODISE/odise/modeling/meta_arch/ldm.py; sd-dino's load_model sets decoder_only=True):

        for module in unet.output_blocks:
            if module in self.unet_blocks: ret_features.append(h)   # before torch.cat([h, hs.pop()])
            h = torch.cat([h, hs.pop()], dim=1); h = module(h, emb, context)

    so feature k is the output of LDM output block k-1 (the middle block for k=0). Structurally the
    same walk here: the forward hook sits on the LAST module of output block k-1 (ldm_output_blocks).
    For SD 1.x: k=2 -> output of up_blocks[0].resnets[1]; k=5 -> up_blocks[1].attentions[1];
    k=8 -> up_blocks[2].attentions[1]. The forward stops after the last tap.

    `time_emb_offset` (B, time_embed_dim) is added to the timestep embedding like ODISE's
    `emb += cond_emb` (a forward hook on unet.time_embedding). sd-dino runs ODISE's
    LdmImplicitCaptionerExtractor, which passes BOTH cond_emb = tanh(alpha_t) * time_embed_project(CLIP
    image embed) and a context = embed("") + tanh(alpha_c) * clip_project(CLIP image embed), from the
    trained ODISE checkpoint (the "implicit captioner") -- not the plain empty-prompt embedding.
    """
    blocks = ldm_output_blocks(unet)
    taps = {k: blocks[k - 1][-1] if k else unet.mid_block for k in indices}
    last = max(indices)
    feats = {}

    def grab(k):
        def hook(module, args, output):
            feats[k] = output[0] if isinstance(output, tuple) else output  # Transformer2DModel: (sample,)
            if k == last:
                raise _Stop
        return hook

    handles = [m.register_forward_hook(grab(k)) for k, m in taps.items()]
    if time_emb_offset is not None:
        handles.append(unet.time_embedding.register_forward_hook(lambda m, a, out: out + time_emb_offset))
    with _hooked(*handles):
        _run(unet, latents_noisy, t, text_emb)
    return {k: feats[k] for k in indices}


def odise_noisy_latent(latent: torch.Tensor, t: int = 100, seed: int = 42, noise_grid=(64, 64)) -> torch.Tensor:
    """ODISE's q_sample with its shared noise (LdmExtractor.__init__ / forward, steps=(t,)).

    One noise tensor for every image: torch.randn(1, 4, 64, 64) from Generator().manual_seed(42),
    bicubically RESIZED (align_corners=False) when the latent grid differs (e.g. 120x120 at 960 px), so
    at other sizes the noise is no longer i.i.d. N(0, 1). q_sample = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps
    with the "ldm_linear" betas (linspace(sqrt(0.00085), sqrt(0.012), 1000)**2) computed in float64.
    `latent` is the VAE posterior MEAN * scale_factor (ODISE encode_to_latent).
    """
    noise = torch.randn(1, latent.shape[1], *noise_grid, generator=torch.Generator().manual_seed(seed))
    if tuple(noise.shape[2:]) != tuple(latent.shape[2:]):
        noise = F.interpolate(noise, size=latent.shape[2:], mode="bicubic", align_corners=False)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1.0 - betas)[t]
    return float(np.sqrt(acp)) * latent + float(np.sqrt(1.0 - acp)) * noise.to(latent).expand_as(latent)


def sd_dino_co_pca(feat_a: torch.Tensor, feat_b: torch.Tensor, q: int = 256, seed: int = 0):
    """One layer of sd-dino's per-pair co-PCA (utils/utils_correspondence.co_pca, loop body).

    (1, C, H, W) twice -> (1, q, H, W) twice. Tokens of both images are concatenated (A's first),
    centred by their joint mean, reduced with `torch.pca_lowrank(centered, q)` (which centres again --
    a no-op -- and is randomised: seeded here, their runs use the global RNG seeded once by main()), and
    projected on V[:, :q]; the result is split back and reshaped. No normalisation inside co_pca.
    Deviation: they split at half and reshape both with image 1's square size, i.e. assume equal square
    grids; this asserts equal shapes instead.
    """
    assert feat_a.shape == feat_b.shape and feat_a.shape[0] == 1, (feat_a.shape, feat_b.shape)
    _, _, h, w = feat_a.shape
    tokens = torch.cat([feat_a.flatten(2), feat_b.flatten(2)], dim=-1)[0].T  # (2HW, C)
    centered = tokens - tokens.mean(0, keepdim=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(centered, q=q)
    reduced = (centered @ v[:, :q]).T.reshape(q, 2, h, w)  # (q, 2, H, W): A's tokens, then B's
    return reduced[None, :, 0], reduced[None, :, 1]


def sd_dino_gather(feats_a: dict, feats_b: dict, dims=(256, 256, 256), seed: int = 0):
    """sd-dino's SD descriptor for a pair (co_pca's tail): -> two (1, sum(dims), H8, W8).

    feats_*: {2: s5, 5: s4, 8: s3} decoder features (odise_decoder_features). `dims` are PCA_DIMS in
    their order (s5=layer 2, s4=layer 5, s3=layer 8). After per-layer co-PCA: layer 2 is bilinearly
    resized to layer 5's grid and concatenated AFTER it ([5, 2]); that block is bilinearly resized to
    layer 8's grid and concatenated after layer 8: channels [8 | 5 | 2] ("current order are layer 8, 5,
    2"). Layer 2 is therefore upsampled twice (15 -> 30 -> 60 at 960 px), not once. align_corners=False.
    """
    def resize(x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    red = {k: sd_dino_co_pca(feats_a[k], feats_b[k], q, seed) for k, q in zip((2, 5, 8), dims)}  # k: (A, B)
    out = []
    for side in (0, 1):
        s5 = torch.cat([red[5][side], resize(red[2][side], red[5][side])], 1)  # [5 | 2] on layer 5's grid
        out.append(torch.cat([red[8][side], resize(s5, red[8][side])], 1))  # [8 | 5 | 2] on layer 8's grid
    return tuple(out)


# -- DIFT -------------------------------------------------------------------------------------------
def dift_features(unet, latents_noisy, t, text_emb, up_ft_index: int = 1) -> torch.Tensor:
    """Output of `up_blocks[up_ft_index]`, after its upsampler (B, C, h, w).

    Mirrors Tsingularity/dift src/models/dift_sd.py MyUNet2DConditionModel.forward, which copies
    diffusers' forward and records `up_ft[i] = sample` right after `upsample_block(...)`, breaking out
    after the highest wanted index. Here: a forward hook on that up block, then stop.
    """
    out = {}

    def hook(module, args, output):
        out["ft"] = output
        raise _Stop

    with _hooked(unet.up_blocks[up_ft_index].register_forward_hook(hook)):
        _run(unet, latents_noisy, t, text_emb)
    return out["ft"]


@torch.no_grad()
def dift_featurize(pipe, img_tensor, prompt: str, t: int = 261, up_ft_index: int = 1, ensemble_size: int = 8,
                   generator=None) -> torch.Tensor:
    """DIFT's SDFeaturizer.forward + OneStepSDPipeline.__call__ -> (1, C, h, w).

    img_tensor (1, 3, H, W) in [-1, 1] is repeated `ensemble_size` times; each copy gets its own VAE
    posterior SAMPLE (not the mean) and its own noise (torch.randn_like), noised with a DDIMScheduler
    built from the model's scheduler config at t; prompt embedded without guidance; the up-block
    features are averaged over the ensemble. Deviation: randomness comes from `generator` instead of
    the global RNG.
    """
    from diffusers import DDIMScheduler

    x = img_tensor.to(pipe.device, pipe.vae.dtype).repeat(ensemble_size, 1, 1, 1)
    latents = pipe.vae.encode(x).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    tt = torch.tensor(t, dtype=torch.long, device=latents.device)
    noisy = DDIMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, tt)
    emb = pipe.encode_prompt(prompt, pipe.device, 1, False)[0].repeat(ensemble_size, 1, 1)
    return dift_features(pipe.unet, noisy, tt, emb, up_ft_index).mean(0, keepdim=True)


# -- Hedlin et al. (LDM_correspondences) -----------------------------------------------------------
def hedlin_cross_attention_maps(unet, latents_noisy, t, context, layers=range(6), token: int = 1,
                                upsample_res: int = 32, max_tokens: int = 32**2) -> torch.Tensor:
    """Per-layer cross-attention maps of one token -> (len(layers), upsample_res, upsample_res).

    Mirrors utils/optimize_token.py (AttentionStore + upscale_to_img_size + optimize_prompt) with its
    prompt-to-prompt controller: every attn2 softmax(QK^T * scale) (B*heads, N, 77) is visited in forward
    order (down, mid, up = their "down_cross", "mid_cross", "up_cross"); only maps with N <= 32**2 are
    stored (absolute token count: at 512 px this drops the 64x64 level); `layers` indexes that stored
    list. The controller keeps `attn[h // 2:]` of the batch*heads axis -- written for a CFG batch, but
    they call it with cfg=False and batch 1, so it keeps heads 4..7 of 8 (reshape(4, ...)). Each map takes
    token `token` (1 = the first word), is reshaped square, bilinearly resized (align_corners=False) to
    upsample_res, and averaged over those heads, as optimize_prompt's `mean(dim=1)` before its MSE to a
    Gaussian. Gradients flow to `context` (their Adam optimises it). Noise in their code is
    `torch.rand_like` (uniform), added at DDIM timesteps[-3] or [noise_level]: pass latents accordingly.
    """
    maps = []

    def hook(module, args, kwargs):
        h, ctx = args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        if h.shape[1] <= max_tokens:
            q, k = module.head_to_batch_dim(module.to_q(h)), module.head_to_batch_dim(module.to_k(ctx))
            maps.append(module.get_attention_scores(q, k))  # (B*heads, N, 77)

    attn2 = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    with _hooked(*[m.register_forward_pre_hook(hook, with_kwargs=True) for m in attn2]):
        unet(latents_noisy, t, encoder_hidden_states=context, return_dict=False)
    out = []
    for i in layers:
        a = maps[i][maps[i].shape[0] // 2:]  # (heads/2, N, 77) for batch 1
        side = int(a.shape[1] ** 0.5)
        a = a[:, :, token].reshape(1, -1, side, side)
        out.append(F.interpolate(a, size=(upsample_res, upsample_res), mode="bilinear", align_corners=False)[0].mean(0))
    return torch.stack(out)
