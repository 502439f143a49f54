"""Stable Diffusion's denoising UNet behind the Backbone interface, through diffusers.

Loading: a hub id or a diffusers folder (unet, vae, text_encoder, tokenizer, scheduler), or one
original-layout `.safetensors`/`.ckpt` file whose LDM config comes from `<stem>.yaml` beside it (the
A1111/ComfyUI convention) or, failing that, is SD 1.x's. `.ckpt` files are read with
`torch.load(weights_only=True)`: no pickled code runs. Only what the descriptors need stays in memory:
the UNet, the VAE encoder and the empty prompt's embedding (the text encoder embeds it once and goes).

Layers are module paths, negative indices allowed as papers write them:
- an Attention module (attn1 / attn2): its input hidden states, from which its own projections give
  q, k, v ("features" and "source");
- any other module: its output, e.g. `up_blocks.1` (DIFT) ("features").
With an IP-Adapter (DiffSim-C) the source of an attn2 is [Q | K_ip | V_ip] of the image's own pass
(B, T + 2 * ip_tokens, inner): A's queries against B's image-prompt keys and values.

Noise and time are fixed so that a stored descriptor depends on its image alone (an index must not
depend on which image a row is later compared with): LANCZOS resize to the preset size, (x/255-0.5)/0.5,
the VAE posterior MEAN times the scaling factor, one noise tensor per latent shape drawn from a seeded
CPU generator (sd-dino's choice), `add_noise` at `timestep` in DDPM units, the empty prompt. DiffSim's
"target step" indexes PNDM's 1000 timesteps [1000, 999, 999, 998, ...]: step 900 is t = 101 (its Sref
setting), 750 is t = 251 (IP). DiffSim itself draws fresh noise per pair and prompts "High quality image"
under guidance; those are the deliberate differences (see `../shared/notes/sd-diffusers.md`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import SimsearchError, WeightsNotFoundError
from .base import Backbone, GridFeatures, Layer, captured, fingerprint, module_at, projection_metric

DIFFSIM_LAYER = "up_blocks.1.attentions.-1.transformer_blocks.-1.attn1"  # DiffSim-S: 16 x 16 tokens at 512 px
DIFFSIM_C_LAYER = "up_blocks.1.attentions.-1.transformer_blocks.-1.attn2"  # DiffSim-C, with an IP-Adapter
DIFT_LAYER = "up_blocks.1"  # DIFT: up_blocks[1] after its upsampler, 1/16 of the input
# Zhang et al. (sd-dino via ODISE): the decoder stream ENTERING LDM output blocks 2, 5, 8, before the skip
# concat, is the output of these modules (diffusers' converter: output_blocks.k.0 -> up_blocks[k//3].resnets[k%3],
# .1 -> attentions[k%3]; a public port hooks resnets[k%3] instead, which is another tensor).
ZHANG_LAYERS = {2: "up_blocks.0.resnets.1", 5: "up_blocks.1.attentions.1", 8: "up_blocks.2.attentions.1"}
DIFT_TIMESTEP = 261
IP_ADAPTER_WEIGHT = "ip-adapter-plus_sd15.safetensors"  # h94/IP-Adapter layout: models/<weight>, models/image_encoder
IP_SCALE = 0.5  # DiffSim-C
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DESCRIPTOR_DEFAULTS = dict(image_size=512, content_pooling="mean", content_layer=DIFT_LAYER, style_layer=DIFFSIM_LAYER,
                           dense_layer=DIFFSIM_LAYER, timestep=101, noise_seed=42)

# SD 1.x's original config (v1-inference.yaml), for single files with no <stem>.yaml beside them.
SD1_ORIGINAL_CONFIG = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 64, "channels": 4,
    "conditioning_key": "crossattn", "scale_factor": 0.18215, "use_ema": False,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True,
        "legacy": False}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                     "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                     "attn_resolutions": [], "dropout": 0.0}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}
TEXT_PREFIX = "cond_stage_model.transformer."  # CLIP text weights in SD 1.x single files (HF names below it)


class StableDiffusionBackbone(Backbone):
    family = "sd"
    prefix_tokens = 0

    def __init__(self, unet: nn.Module, vae: nn.Module, prompt_embedding: torch.Tensor, scheduler,
                 timestep: int = DIFT_TIMESTEP, noise_seed: int = 42, image_encoder: nn.Module | None = None):
        super().__init__()
        self.unet, self.vae, self.image_encoder = unet.eval(), vae.eval(), image_encoder
        self.register_buffer("prompt_embedding", prompt_embedding)  # (1, 77, D), the empty prompt
        self.scheduler = scheduler  # DDPM: only its add_noise (the noise schedule) is used
        steps = scheduler.config.num_train_timesteps
        if not 0 <= timestep < steps:
            raise SimsearchError(f"timestep {timestep} is outside 0..{steps - 1}")
        self.timestep, self.noise_seed = int(timestep), int(noise_seed)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.ip_tokens = 0
        if image_encoder is not None:
            self.ip_tokens = int(unet.encoder_hid_proj.image_projection_layers[0].latents.shape[1])

    # -- images to noisy latents ------------------------------------------------------------------
    def preprocess(self, img: Image.Image, size: int) -> torch.Tensor:
        x = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
        return torch.from_numpy((x / 255.0 - 0.5) / 0.5).permute(2, 0, 1)  # (3, size, size) in [-1, 1]

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The one noise tensor of a latent shape (C, h, w): the same for every image and run."""
        gen = torch.Generator().manual_seed(self.noise_seed)
        return torch.randn(shape, generator=gen)

    def noisy_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> VAE posterior mean, noised at `timestep` (B, 4, H/8, W/8)."""
        x = pixels.to(self.device, self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mean * self.scaling_factor
        noise = self.noise(tuple(latents.shape[1:])).to(latents).expand_as(latents)
        t = torch.full((len(latents),), self.timestep, device=latents.device, dtype=torch.long)
        return self.scheduler.add_noise(latents, noise, t)

    def image_prompt(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """IP-Adapter Plus input: CLIP vision penultimate hidden states of the image, [(B, 1, T, D)].
        The CLIP input is made from the model input (224 px bicubic, CLIP-normalised), not re-read."""
        enc = self.image_encoder
        size = enc.config.image_size
        x = F.interpolate((pixels.to(self.device).float() + 1) / 2, size=(size, size), mode="bicubic",
                          align_corners=False, antialias=True).clamp(0, 1)
        x = (x - torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        hidden = enc(x.to(enc.dtype), output_hidden_states=True).hidden_states[-2]
        return [hidden[:, None]]

    def run(self, pixels: torch.Tensor, taps: dict[str, tuple[nn.Module, object]], transform) -> dict[str, torch.Tensor]:
        """One UNet pass on the noisy latents, stopped once every tap is captured."""
        noisy = self.noisy_latents(pixels)
        b = noisy.shape[0]
        t = torch.full((b,), self.timestep, device=self.device, dtype=torch.long)
        kwargs = {"added_cond_kwargs": {"image_embeds": self.image_prompt(pixels)}} if self.image_encoder else {}
        with captured(taps, transform) as got:
            self.unet(noisy, t, encoder_hidden_states=self.prompt_embedding.expand(b, -1, -1), return_dict=False, **kwargs)
        missing = set(taps) - set(got)
        if missing:
            raise SimsearchError(f"the UNet pass never reached {', '.join(sorted(missing))}")
        return got

    # -- taps -----------------------------------------------------------------------------------
    def _module(self, layer: Layer, role: str) -> tuple[str, nn.Module]:
        if not isinstance(layer, str):
            raise SimsearchError(f"{role}={layer!r}: Stable Diffusion layers are module paths such as '{DIFFSIM_LAYER}'")
        return module_at(self.unet, layer)

    @staticmethod
    def _is_attention(module: nn.Module) -> bool:
        from diffusers.models.attention_processor import Attention

        return isinstance(module, Attention)

    def _ip_attention(self, module: nn.Module) -> bool:
        return self.image_encoder is not None and hasattr(module.processor, "to_k_ip")

    def check_layer(self, layer: Layer, kind: str, role: str) -> None:
        path, module = self._module(layer, role)
        if kind == "source":
            if not self._is_attention(module):
                raise SimsearchError(f"{role}='{layer}' is not an attention module (e.g. '{DIFFSIM_LAYER}')")
            if module.is_cross_attention and not self._ip_attention(module):
                raise SimsearchError(f"{role}='{layer}' is a cross-attention: its keys are the prompt's, the same for "
                                     "every image; use a self-attention (attn1), or an attn2 with an IP-Adapter")

    size_multiple = 64

    def check_size(self, size: int) -> None:
        if size % 64:
            raise SimsearchError(f"image size {size} must be a multiple of 64 for Stable Diffusion (VAE x8, UNet x8)")

    def _how(self, module: nn.Module, kind: str):
        """What to capture at a module for a kind of tap (see the module docstring)."""
        if not self._is_attention(module):
            return "output"
        if kind == "source" and self._ip_attention(module):
            return partial(_ip_source, self.ip_tokens)
        return "input"

    @torch.inference_mode()
    def tokens(self, pixels: torch.Tensor, wanted: dict[str, tuple[Layer, str]]) -> dict[str, torch.Tensor]:
        taps = {}
        for name, (layer, kind) in wanted.items():
            self.check_layer(layer, kind, name)
            module = self._module(layer, name)[1]
            taps[name] = (module, self._how(module, kind))

        def as_tokens(name: str, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x  # (B, C, h, w) -> (B, h*w, C)

        return self.run(pixels, taps, as_tokens)

    @torch.inference_mode()
    def attention_inputs(self, layer: Layer, source: torch.Tensor):
        module = self._module(layer, "dense_layer")[1]
        x = source.to(self.device, module.to_q.weight.dtype)
        heads = module.heads
        if self._ip_attention(module):  # [Q | K_ip | V_ip], already projected
            n = self.ip_tokens
            q, k, v = x[:, :-2 * n], x[:, -2 * n:-n], x[:, -n:]
        else:
            q, k, v = module.to_q(x), module.to_k(x), module.to_v(x)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
        if module.norm_q is not None:  # as AttnProcessor2_0 (None for SD 1.x)
            q, k = module.norm_q(q), module.norm_k(k)
        return q, k, v

    def dense_metric(self, layer: Layer):
        # the source is the attention's input: an error in the standardised token reaches q, k, v
        # through to_q, to_k, to_v (times the token's scale); IP sources are stored already projected
        module = self._module(layer, "dense_layer")[1]
        if self._ip_attention(module):
            return None
        return projection_metric([module.to_q.weight, module.to_k.weight, module.to_v.weight])

    @torch.inference_mode()
    def dense_descriptors(self, pixels: torch.Tensor, layer: Layer | None = None, facet: str | None = None,
                          stride: int | None = None) -> GridFeatures:
        """DIFT-style: the output of `layer` (default up_blocks[1]) as a cell grid; no saliency."""
        given = {k: v for k, v in (("facet", facet if facet != "token" else None), ("stride", stride)) if v is not None}
        if given:
            raise SimsearchError("Stable Diffusion descriptors are module outputs: they take no "
                                 + " or ".join(f"{{{k}}}" for k in given), **given)
        layer = layer or DIFT_LAYER
        module = self._module(layer, "layer")[1]
        out = self.run(pixels, {"f": (module, "output")}, lambda name, x: x)["f"]
        if out.dim() != 4:
            raise SimsearchError(f"layer '{layer}' does not output a feature map")
        h, w = out.shape[-2:]
        cell = pixels.shape[-1] // w
        return GridFeatures(desc=out.flatten(2).transpose(1, 2).float(), saliency=None, grid=(h, w), stride=cell,
                            patch=cell)

    @property
    def match_defaults(self) -> dict:
        return dict(layer=DIFT_LAYER, facet=None, stride=None, log_bin=False, image_size=512)

    @property
    def final_layer(self) -> Layer:
        return DIFT_LAYER


def _ip_source(ip_tokens: int, module, args, kwargs) -> torch.Tensor:
    """At an IP-Adapter attn2: [Q | K_ip | V_ip] (B, T + 2 * ip_tokens, inner) from its inputs."""
    hidden = args[0] if args else kwargs["hidden_states"]
    ip = kwargs["encoder_hidden_states"][1][0].flatten(1, -2)  # (text, [(B, images, T, D) per adapter]) -> (B, T, D)
    proc = module.processor
    return torch.cat([module.to_q(hidden), proc.to_k_ip[0](ip), proc.to_v_ip[0](ip)], dim=1)


# -- loading ------------------------------------------------------------------------------------------
def detect(path: Path) -> bool:
    """A diffusers pipeline folder, or a single-file checkpoint."""
    if path.is_dir():
        return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()
    return path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a single file: safetensors, or a pickle read by the restricted (weights-only) unpickler."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a pickle that needs code to load is refused, whatever it raises
            raise WeightsNotFoundError(f"{path}: not loadable as plain tensors (weights_only): {str(e).splitlines()[0]}") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _original_config(path: Path, state: dict) -> dict:
    yaml_file = path.with_suffix(".yaml")
    if yaml_file.is_file():
        import yaml

        return yaml.safe_load(yaml_file.read_text())
    probe = state.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if probe is not None and tuple(probe.shape) == (320, 768):
        return SD1_ORIGINAL_CONFIG
    raise WeightsNotFoundError(f"{path}: not an SD 1.x checkpoint and no {yaml_file.name} beside it with its original config")


def _text_encoder_from_state(state: dict):
    """The CLIP text encoder of an SD 1.x single file. Its config is not in the LDM yaml; it follows
    from the tensor shapes with CLIP's conventions (64-wide heads, quick GELU)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text = {k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    if not text:
        raise WeightsNotFoundError("the checkpoint holds no CLIP text encoder (cond_stage_model.transformer.*)")
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.items()}
    vocab, hidden = text["text_model.embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[3]) for k in text if k.startswith("text_model.encoder.layers."))
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         intermediate_size=text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                         max_position_embeddings=text["text_model.embeddings.position_embedding.weight"].shape[0],
                         hidden_act="quick_gelu", projection_dim=hidden, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return CLIPTextModel.from_pretrained(None, config=cfg, state_dict=text)


def empty_prompt_ids(text_encoder, tokenizer=None) -> torch.Tensor:
    """(1, 77) ids of the empty prompt: the tokenizer's, or, without one (single files), CLIP BPE's
    layout as SD 1.x's tokenizer pads it: start, end, then end again (the two specials are the
    vocabulary's last ids)."""
    length = text_encoder.config.max_position_embeddings
    if tokenizer is not None:
        return tokenizer("", padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    vocab = text_encoder.config.vocab_size
    return torch.tensor([[vocab - 2] + [vocab - 1] * (length - 1)])


@torch.inference_mode()
def embed_prompt(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(ids)[0].float()  # (1, 77, D): last hidden state, as StableDiffusionPipeline.encode_prompt


def _load_parts(source: str, name: str) -> tuple:
    """(unet, vae, prompt embedding, DDPM scheduler) from a hub id, a folder or a single file."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    path = Path(source).expanduser()
    try:
        if path.is_file():
            state = read_checkpoint(path)
            original = _original_config(path, state)
            unet = UNet2DConditionModel.from_single_file(state, original_config=original, local_files_only=True)
            vae = AutoencoderKL.from_single_file(state, original_config=original, local_files_only=True)
            text_encoder = _text_encoder_from_state(state)
            prompt = embed_prompt(text_encoder, empty_prompt_ids(text_encoder))
            p = original["model"]["params"]  # LDM's "linear" schedule is diffusers' "scaled_linear"
            scheduler = DDPMScheduler(beta_start=p["linear_start"], beta_end=p["linear_end"],
                                      beta_schedule="scaled_linear", num_train_timesteps=p["timesteps"])
        else:
            from transformers import CLIPTextModel, CLIPTokenizer

            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
            prompt = embed_prompt(text_encoder, empty_prompt_ids(text_encoder, CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")))
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except (OSError, ValueError, KeyError) as e:
        raise WeightsNotFoundError(f"{name}: cannot load Stable Diffusion ({str(e).splitlines()[0]})") from None
    vae.decoder = vae.post_quant_conv = None  # never decoded: half the VAE's memory
    return unet, vae, prompt, scheduler


def _load_ip_adapter(unet, vae, ip_adapter: str, name: str):
    """Load IP-Adapter Plus into `unet` through diffusers' own loader. -> the CLIP image encoder.
    `ip_adapter`: a folder or hub id in h94/IP-Adapter's layout (models/<weight>, models/image_encoder)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=PNDMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe.load_ip_adapter(ip_adapter, subfolder="models", weight_name=IP_ADAPTER_WEIGHT)
    except (OSError, ValueError, KeyError) as e:
        raise WeightsNotFoundError(f"{ip_adapter}: cannot load IP-Adapter Plus for {name} ({str(e).splitlines()[0]})") from None
    pipe.set_ip_adapter_scale(IP_SCALE)
    return pipe.image_encoder.eval()


def load(source: str, name: str | None = None, timestep: int | None = None, noise_seed: int | None = None,
         ip_adapter: str | None = None) -> StableDiffusionBackbone:
    name = name or source
    unet, vae, prompt, scheduler = _load_parts(source, name)
    image_encoder = _load_ip_adapter(unet, vae, ip_adapter, name) if ip_adapter else None
    parts = [unet, vae.encoder, vae.quant_conv] + ([image_encoder] if image_encoder is not None else [])
    backbone = StableDiffusionBackbone(unet, vae, prompt, scheduler, DIFT_TIMESTEP if timestep is None else timestep,
                                       42 if noise_seed is None else noise_seed, image_encoder)
    backbone.fingerprint = fingerprint(*parts, extra=prompt.numpy().tobytes())
    return backbone
