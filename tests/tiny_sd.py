"""Tiny random-weight Stable-Diffusion-1.5-shaped models, built offline, for tests.

Every builder writes files that the real loading code reads (`from_pretrained`, `from_single_file`,
`load_ip_adapter`), so tests exercise the same paths as a user's downloaded model. Nothing touches the
network; everything is seeded, so the same seed gives the same weights in every format.

Shape: SD 1.5 with every width divided by 10 (model_channels 320 -> 32, VAE ch 128 -> 32) and a 64-wide
text encoder with one 64-wide head (CLIP's head width, from which a single file's text config follows). Module names, block types, head count (8), layers per block (2) and the timestep schedule
are SD 1.5's, so paper tap points such as `up_blocks.1.attentions.2.transformer_blocks.0.attn1` exist.

Why widths of 32 and not smaller: original LDM code hard-codes GroupNorm(32, C) in both the UNet and the
VAE, and diffusers' single-file config mappers (`create_unet_diffusers_config_from_ldm`,
`create_vae_diffusers_config_from_ldm`) read no group count, so a model loaded with `original_config=`
always gets `norm_num_groups=32`. A tiny model with 4 groups cannot be written as a faithful LDM
checkpoint and cannot load through that path at all (no kwarg reaches the config there). With widths that
are multiples of 32 the tiny model loads exactly like a real SD 1.5 file. (~8.5M UNet parameters; a
16x16-latent forward takes ~50 ms on one thread.)

Single-file loading offline -- what the library's loader must pass
------------------------------------------------------------------
UNet and VAE, from `tiny.safetensors` + `tiny.yaml` (the A1111/ComfyUI convention)::

    UNet2DConditionModel.from_single_file(ckpt, original_config=yaml_path, local_files_only=True)
    AutoencoderKL.from_single_file(ckpt, original_config=yaml_path, local_files_only=True)

`original_config` must be a local path (a URL is fetched, and refused with local_files_only). Without it
diffusers infers the model type from the keys ("v1") and fetches `stable-diffusion-v1-5/...` configs from
the hub, which fails offline. Alternatively pass a local diffusers folder instead of the YAML (never
both): `config=<folder>, subfolder="unet"` (or "vae"), `local_files_only=True`; that path also accepts
config overrides as kwargs, the YAML path ignores them.

The text encoder has no YAML description (LDM's `FrozenCLIPEmbedder` loads CLIP ViT-L/14 by name), so it
needs a `CLIPTextConfig` from elsewhere (a folder's `text_encoder/config.json`): strip the prefix
`cond_stage_model.transformer.` (keys then start with `text_model.`, as in real SD 1.5 files) and call
`CLIPTextModel.from_pretrained(None, config=cfg, state_dict=sd)` or `load_state_dict` after removing
`text_model.` (transformers >= 5.6 flattened `CLIPTextModel`). The whole pipeline loads offline with
`StableDiffusionPipeline.from_single_file(ckpt, config=<diffusers folder>, local_files_only=True)`;
with only `original_config` it falls back to "legacy" loading, which looks for openai/clip-vit-large-
patch14 in the hub cache and fails offline.

IP-Adapter Plus offline
-----------------------
`save_tiny_ip_adapter(d)` mirrors the h94/IP-Adapter layout::

    pipe.load_ip_adapter(d, subfolder="models", weight_name=IP_ADAPTER_WEIGHT, local_files_only=True)

which also loads `d/models/image_encoder` (a tiny CLIPVisionModelWithProjection) into `pipe.image_encoder`
and registers a CLIPImageProcessor sized to it. The Plus image projection consumes the CLIP vision
PENULTIMATE hidden states, `image_encoder(px, output_hidden_states=True).hidden_states[-2]`
(B, 1 + patches, vision_hidden), not `image_embeds`; pass them to the UNet as
`added_cond_kwargs={"image_embeds": [h[:, None]]}` (B, num_images=1, T, D).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False, trained_betas=None)
SCALE_FACTOR = 0.18215
# SD 1.5 / 10. attention_head_dim is the HEAD COUNT in SD 1.x configs (8 heads of 4/8/16 channels here).
UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=64, attention_head_dim=8)
VAE = dict(sample_size=512, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           latent_channels=4, scaling_factor=SCALE_FACTOR)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
            max_position_embeddings=77, hidden_act="quick_gelu")
# Words that become single BPE tokens (anything else still tokenizes, byte by byte).
WORDS = ("a", "photo", "of", "cat", "dog", "high", "quality", "image")
IP_ADAPTER_WEIGHT = "ip-adapter-plus_sd15.safetensors"


# -- tokenizer ------------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to 256+n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """A small CLIP BPE vocabulary and its merges.

    Order follows CLIP's: 256 byte symbols, the same with `</w>`, merged tokens, then `<|startoftext|>`
    and `<|endoftext|>` last. Merges build each of WORDS left to right, so those words are one token each.
    """
    base = _byte_chars()
    vocab = base + [c + "</w>" for c in base]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            parts[:2] = ["".join(parts[:2])]
            if pair not in merges:
                merges.append(pair)
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer(directory: Path) -> Path:
    """A CLIP tokenizer folder as SD 1.5 ships it: vocab.json, merges.txt and two small configs."""
    ids, merges = bpe_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                    pad_token="<|endoftext|>")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True)))
    return directory


# -- diffusers folder -----------------------------------------------------------------------------
def build_models(seed: int = 0) -> dict:
    """Seeded UNet, VAE and text encoder (in that order from one seed, whatever format they are saved in)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = bpe_vocab()
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**TEXT, vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                                        eos_token_id=eos, pad_token_id=eos)).eval()
    return dict(unet=unet, vae=vae, text_encoder=text)


def save_tiny_sd(directory, seed: int = 0) -> Path:
    """A diffusers pipeline folder shaped like stable-diffusion-v1-5 (no safety checker)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    directory = Path(directory)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(directory / "tokenizer"))
    pipe = StableDiffusionPipeline(**build_models(seed), tokenizer=tokenizer, scheduler=PNDMScheduler(**SD15_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    # save_pretrained re-serialises the tokenizer and adds tokenizer.json, which loaders then prefer; put
    # back the hand-written files alone so loading goes through vocab.json + merges.txt as for SD 1.5.
    shutil.rmtree(directory / "tokenizer")
    write_tokenizer(directory / "tokenizer")
    return directory


# -- original LDM single file ----------------------------------------------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_key(key: str, config) -> str:
    """diffusers UNet2DConditionModel key -> LDM `openaimodel.UNetModel` key (SD 1.x layout).

    LDM numbers blocks flat: input block 0 is conv_in, then each level has `n` [resnet, attention] blocks
    and one [downsampler] block; output blocks are [resnet, attention?, upsampler?], n + 1 per level, the
    upsampler in the last one (slot 1 without attention, 2 with). Transformer internals keep their names.
    """
    n = config.layers_per_block
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, leaf = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"

    def resnet(rest: str) -> str:
        name, _, leaf = rest.rpartition(".")
        return f"{_RESNET[name]}.{leaf}"

    def block_part(block: str, kind: str, rest: str) -> str:
        return f"{block}.1.{rest}" if kind == "attentions" else f"{block}.0.{resnet(rest)}"

    if m := re.fullmatch(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", key):
        return block_part(f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[3])}", m[2], m[4])
    if m := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):  # middle_block = [resnet, attention, resnet]
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", key):
        return block_part(f"output_blocks.{int(m[1]) * (n + 1) + int(m[3])}", m[2], m[4])
    if m := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        slot = 2 if config.up_block_types[i].startswith("CrossAttn") else 1
        return f"output_blocks.{i * (n + 1) + n}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def ldm_unet_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under `model.diffusion_model.` with LDM names."""
    return {"model.diffusion_model." + ldm_unet_key(k, unet.config): v for k, v in unet.state_dict().items()}


def ldm_vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights under `first_stage_model.` with LDM names (decoder levels count upwards in LDM,
    so diffusers' decoder up_blocks[i] is LDM up[L-1-i]; attention projections are 1x1 convs there)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        k = key.replace("conv_norm_out", "norm_out")
        k = re.sub(r"down_blocks\.(\d)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        k = k.replace("conv_shortcut", "nin_shortcut")
        if m := re.fullmatch(r"(.+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k):
            k = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # Linear (out, in) -> Conv2d 1x1 (out, in, 1, 1)
        out["first_stage_model." + k] = value
    return out


def ldm_text_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP text weights as SD 1.x files store them: `cond_stage_model.transformer.text_model.*`."""
    sd = text_encoder.state_dict()
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items()}


def ldm_config() -> dict:
    """The original LDM config of the tiny model, shaped like SD's v1-inference.yaml."""
    mc = UNET["block_out_channels"][0]
    ch = VAE["block_out_channels"][0]
    return {"model": {
        "base_learning_rate": 1.0e-04,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": SD15_SCHEDULER["beta_start"], "linear_end": SD15_SCHEDULER["beta_end"],
            "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": SD15_SCHEDULER["num_train_timesteps"],
            "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": UNET["sample_size"], "channels": 4,
            "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
            "scale_factor": SCALE_FACTOR, "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": 32, "in_channels": UNET["in_channels"], "out_channels": UNET["out_channels"],
                "model_channels": mc, "attention_resolutions": [4, 2, 1], "num_res_blocks": UNET["layers_per_block"],
                "channel_mult": [c // mc for c in UNET["block_out_channels"]], "num_heads": UNET["attention_head_dim"],
                "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": UNET["cross_attention_dim"],
                "use_checkpoint": True, "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": VAE["latent_channels"], "monitor": "val/rec_loss",
                "ddconfig": {"double_z": True, "z_channels": VAE["latent_channels"], "resolution": 256,
                             "in_channels": VAE["in_channels"], "out_ch": VAE["out_channels"], "ch": ch,
                             "ch_mult": [c // ch for c in VAE["block_out_channels"]],
                             "num_res_blocks": VAE["layers_per_block"], "attn_resolutions": [], "dropout": 0.0},
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        }}}


def save_tiny_sd_single_file(path, seed: int = 0) -> Path:
    """The weights of `save_tiny_sd(..., seed)` as one LDM-format `.safetensors` plus `<stem>.yaml`
    (no tokenizer or scheduler inside, as in real single files)."""
    import yaml
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = build_models(seed)
    sd = {**ldm_unet_state_dict(parts["unet"]), **ldm_vae_state_dict(parts["vae"]),
          **ldm_text_state_dict(parts["text_encoder"])}
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(ldm_config(), sort_keys=False))
    return path


# -- IP-Adapter Plus ------------------------------------------------------------------------------
_PLUS_LAYER = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out",
               "ff.0": "1.0", "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}


def plus_projection_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers IPAdapterPlusImageProjection keys -> the original IP-Adapter `Resampler` keys that
    `load_ip_adapter` expects (each layer is [PerceiverAttention, FeedForward]; K and V are one `to_kv`)."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if not m:
            out[key] = value  # latents, proj_in, proj_out, norm_out
            continue
        i, (name, _, leaf) = m[1], m[2].rpartition(".")
        if name == "attn.to_k":
            out[f"layers.{i}.0.to_kv.{leaf}"] = torch.cat([value, sd[f"layers.{i}.attn.to_v.{leaf}"]])
        elif name != "attn.to_v":
            out[f"layers.{i}.{_PLUS_LAYER[name]}.{leaf}"] = value
    return out


def save_tiny_ip_adapter(directory, unet_cross_dim: int = UNET["cross_attention_dim"], seed: int = 0, num_tokens: int = 4) -> Path:
    """Random IP-Adapter Plus weights for the tiny UNet, in h94/IP-Adapter's layout:
    `directory/models/ip-adapter-plus_sd15.safetensors` and `directory/models/image_encoder/`.

    The per-layer K/V projections are numbered like the original (1, 3, 5, ...: the attn2 processors in
    `unet.attn_processors` order) with shape (hidden of that layer, unet_cross_dim). The Resampler must
    have depth 4 and 64-wide heads: diffusers' converter renames layers 0-3 only and infers heads as
    to_q rows // 64.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    directory = Path(directory)
    models = directory / "models"
    torch.manual_seed(seed)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=unet_cross_dim)).eval()
    vision.save_pretrained(models / "image_encoder")

    proj = IPAdapterPlusImageProjection(embed_dims=vision.config.hidden_size, output_dims=unet_cross_dim,
                                        hidden_dims=unet_cross_dim, depth=4, dim_head=64, heads=1,
                                        num_queries=num_tokens)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(UNET, cross_attention_dim=unet_cross_dim))
    ip = {}
    attn2 = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]
    for key_id, name in zip(range(1, 2 * len(attn2), 2), attn2):
        hidden = unet.get_submodule(name).to_q.out_features
        for kv in ("k", "v"):
            ip[f"ip_adapter.{key_id}.to_{kv}_ip.weight"] = torch.randn(hidden, unet_cross_dim) / unet_cross_dim**0.5
    image_proj = {"image_proj." + k: v for k, v in plus_projection_to_original(proj.state_dict()).items()}
    save_file({k: v.contiguous() for k, v in {**image_proj, **ip}.items()}, models / IP_ADAPTER_WEIGHT)
    return directory
