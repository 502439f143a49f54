"""The tiny SD fixtures load offline through diffusers' real loaders, and the papers' reference taps
(papers_reference) capture what they claim to capture.

Everything runs on random weights at small latent grids (8x8 / 16x16); the whole file takes seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import papers_reference as ref
import tiny_sd


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny_sd.save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), seed=0)


@pytest.fixture(scope="module")
def pipe(sd_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, local_files_only=True)


@pytest.fixture(scope="module")
def unet(pipe):
    return pipe.unet


def inputs(seed=0, batch=1, grid=8):
    """(noisy latents (B, 4, grid, grid), t, text embedding (B, 77, 64))."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, grid, grid, generator=g), 101, torch.randn(batch, 77, 64, generator=g)


def pil(seed, size=(40, 56)):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def recorder(store, key, pre=False):
    """A hook storing the module's first input (pre=True) or its output. It returns None: a returned
    value would replace the module's input or output."""
    def hook(module, args, output=None):
        store.setdefault(key, args[0] if pre else output)
    return hook


def plain_config(model):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")}


# -- the builders ----------------------------------------------------------------------------------
def test_folder_loads_offline_as_pipeline_and_as_components(sd_dir, pipe):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    for cls, sub in [(UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")]:
        state_equal(cls.from_pretrained(sd_dir, subfolder=sub, local_files_only=True), getattr(pipe, sub))
    sched = PNDMScheduler.from_pretrained(sd_dir, subfolder="scheduler", local_files_only=True)
    assert {k: sched.config[k] for k in tiny_sd.SD15_SCHEDULER} == tiny_sd.SD15_SCHEDULER
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 64
    assert pipe.safety_checker is None and pipe.feature_extractor is None

    tok = CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer", local_files_only=True)
    assert sorted(p.name for p in (sd_dir / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    cfg = pipe.text_encoder.config
    assert tok.model_max_length == cfg.max_position_embeddings == 77 and len(tok) == cfg.vocab_size
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|startoftext|>"
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id)
    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]
    ids = tok("a photo of a cat").input_ids
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    padded = tok("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (1, 77) and (padded[0, len(ids):] == tok.eos_token_id).all()
    emb = pipe.encode_prompt(["", "a photo of a cat"], "cpu", 1, False)[0]
    assert emb.shape == (2, 77, 64)


def test_sd15_module_names_and_shapes(unet, pipe):
    from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D

    assert isinstance(unet.get_submodule(ref.DIFFSIM_LAYER), torch.nn.Module)
    assert type(unet.up_blocks[0]) is UpBlock2D and not hasattr(unet.up_blocks[0], "attentions")
    assert len(unet.up_blocks[0].resnets) == 3 and unet.up_blocks[0].resnets[1] is not None
    assert all(type(b) is CrossAttnUpBlock2D for b in unet.up_blocks[1:])
    assert unet.up_blocks[1].attentions[1] is unet.get_submodule("up_blocks.1.attentions.1")
    assert unet.get_submodule(ref.DIFFSIM_LAYER).heads == 8  # SD 1.5's head count
    assert len(ref.ldm_output_blocks(unet)) == 12
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        assert pipe.vae.encode(x).latent_dist.mean.shape == (1, 4, 8, 8)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`:UserWarning")  # diffusers, failing lookup
def test_single_file_holds_the_folder_weights_and_loads_offline(tmp_path, sd_dir, pipe):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    ckpt = tiny_sd.save_tiny_sd_single_file(tmp_path / "tiny.safetensors", seed=0)
    yaml_path = ckpt.with_suffix(".yaml")
    assert yaml_path.is_file()
    sd = load_file(ckpt)
    assert infer_diffusers_model_type(sd) == "v1"
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}

    for cls, part in [(UNet2DConditionModel, pipe.unet), (AutoencoderKL, pipe.vae)]:
        loaded = cls.from_single_file(str(ckpt), original_config=str(yaml_path), local_files_only=True)
        state_equal(loaded, part)
        assert plain_config(loaded) == plain_config(part)  # the YAML describes the same model
        sub = "unet" if cls is UNet2DConditionModel else "vae"
        state_equal(cls.from_single_file(str(ckpt), config=str(sd_dir), subfolder=sub, local_files_only=True), part)
    with pytest.raises(OSError):  # neither: diffusers wants stable-diffusion-v1-5's config from the hub
        UNet2DConditionModel.from_single_file(str(ckpt), local_files_only=True, cache_dir=tmp_path / "empty")

    prefix = "cond_stage_model.transformer."
    text = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    assert all(k.startswith("text_model.") for k in text)  # as real SD 1.x files
    loaded = CLIPTextModel.from_pretrained(None, config=pipe.text_encoder.config, state_dict=text)
    state_equal(loaded, pipe.text_encoder)

    whole = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(sd_dir), local_files_only=True,
                                                     safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        state_equal(getattr(whole, name), getattr(pipe, name))


def test_ip_adapter_plus_loads_offline_and_conditions_the_unet(tmp_path, sd_dir, unet):
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from safetensors.torch import load_file

    ip_dir = tiny_sd.save_tiny_ip_adapter(tmp_path / "ip", seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, local_files_only=True)
    pipe.load_ip_adapter(str(ip_dir), subfolder="models", weight_name=tiny_sd.IP_ADAPTER_WEIGHT, local_files_only=True)
    ip_unet = pipe.unet
    attn2 = {n: p for n, p in ip_unet.attn_processors.items() if n.endswith("attn2.processor")}
    assert len(attn2) == 16 and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in attn2.values())

    saved = load_file(ip_dir / "models" / tiny_sd.IP_ADAPTER_WEIGHT)
    for key_id, proc in zip(range(1, 32, 2), attn2.values()):
        assert torch.equal(proc.to_k_ip[0].weight, saved[f"ip_adapter.{key_id}.to_k_ip.weight"])
        assert torch.equal(proc.to_v_ip[0].weight, saved[f"ip_adapter.{key_id}.to_v_ip.weight"])
    proj = ip_unet.encoder_hid_proj.image_projection_layers[0]
    back = tiny_sd.plus_projection_to_original(proj.state_dict())  # our key mapping inverts diffusers'
    assert back.keys() == {k.removeprefix("image_proj.") for k in saved if k.startswith("image_proj.")}
    assert all(torch.equal(v, saved["image_proj." + k]) for k, v in back.items())

    px = pipe.feature_extractor(pil(3), return_tensors="pt").pixel_values
    with torch.no_grad():
        h = pipe.image_encoder(px, output_hidden_states=True).hidden_states[-2]  # Plus consumes this
        (embeds,) = pipe.prepare_ip_adapter_image_embeds(pil(3), None, "cpu", 1, False)
        assert torch.allclose(embeds, h[:, None])  # (B, 1, 1 + patches, vision hidden)
        x, t, text = inputs()
        cond = dict(added_cond_kwargs={"image_embeds": [embeds]})
        with_ip = ip_unet(x, t, text, **cond).sample
        pipe.set_ip_adapter_scale(0.0)
        without = ip_unet(x, t, text, **cond).sample
        pipe.set_ip_adapter_scale(1.0)
        assert torch.allclose(without, unet(x, t, text).sample, atol=1e-6)  # the same UNet without adapter
    assert not torch.allclose(with_ip, without, atol=1e-4)

    q, k, v = ref.diffsim_qkv(ip_unet, x, t, text, ref.DIFFSIM_LAYER.replace("attn1", "attn2"), **cond)
    assert q.shape[:2] == (1, 8) and len(k) == len(v) == 1 and k[0].shape == (1, 8, 4, 16)  # 4 IP tokens of the 128-wide attn2 (8 heads x 16)


# -- the papers' taps ------------------------------------------------------------------------------
def test_diffsim_qkv_equals_linear_hooks_in_the_same_pass_and_leaves_no_hook(unet):
    x, t, text = inputs(batch=2)
    with torch.no_grad():
        before = unet(x, t, text).sample
    attn = unet.get_submodule(ref.DIFFSIM_LAYER)
    seen = {}
    handles = [getattr(attn, f"to_{n}").register_forward_hook(recorder(seen, n)) for n in "qkv"]
    try:
        q, k, v = ref.diffsim_qkv(unet, x, t, text, ref.DIFFSIM_LAYER)
    finally:
        for h in handles:
            h.remove()
    heads = attn.heads
    for name, got in zip("qkv", (q, k, v)):
        b, n, c = seen[name].shape
        assert got.shape == (2, heads, 4, c // heads)  # 2x2 grid at up_blocks[1] for an 8x8 latent
        assert torch.equal(got, seen[name].view(b, n, heads, c // heads).transpose(1, 2))
    assert not attn._forward_pre_hooks and not attn._forward_hooks
    with torch.no_grad():
        assert torch.equal(unet(x, t, text).sample, before)


def test_diffsim_timestep_and_latents():
    from diffusers import AutoencoderKL

    assert (ref.diffsim_timestep(900), ref.diffsim_timestep(750), ref.diffsim_timestep(0)) == (101, 251, 1000)
    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny_sd.VAE).eval()
    a1, b1 = ref.diffsim_latents(pil(1), pil(2), vae, size=64)
    a2, b2 = ref.diffsim_latents(pil(1), pil(2), vae, size=64)
    a3, _ = ref.diffsim_latents(pil(1), pil(1), vae, size=64)
    assert a1.shape == (1, 4, 8, 8) and torch.equal(a1, a2) and torch.equal(b1, b2)
    assert torch.equal(a1, a3)  # A's draws come first, whatever B is
    _, b4 = ref.diffsim_latents(pil(2), pil(2), vae, size=64)
    assert not torch.equal(b4, a3)  # one generator per pair: B's noise is a later draw than A's


def test_diffsim_aas_properties(unet):
    x, t, text = inputs(batch=2)
    qkv_a = ref.diffsim_qkv(unet, x, t, text)
    qkv_b = ref.diffsim_qkv(unet, inputs(seed=5, batch=2)[0], t, text)
    assert ref.diffsim_aas(*qkv_a, *qkv_a) == pytest.approx(1.0, abs=1e-6)
    ab, ba = ref.diffsim_aas(*qkv_a, *qkv_b), ref.diffsim_aas(*qkv_b, *qkv_a)
    assert ab == pytest.approx(ba.item(), abs=1e-6) and ab < 1
    q, k, v = qkv_a
    assert ref.diffsim_aas(q, [k, k], [v, v], *qkv_b[:1], [qkv_b[1]] * 2, [qkv_b[2]] * 2) == pytest.approx(
        ref.diffsim_aas(q, k, v, *qkv_b).item(), abs=1e-6)


def test_odise_features_are_the_stream_entering_ldm_output_blocks(unet):
    x, t, text = inputs(grid=16)
    feats = ref.odise_decoder_features(unet, x, t, text)
    assert {k: tuple(f.shape) for k, f in feats.items()} == {2: (1, 128, 2, 2), 5: (1, 128, 4, 4), 8: (1, 64, 8, 8)}
    # Before the skip concat: the first channels of what the first resnet of block k receives.
    entering = {}
    blocks = ref.ldm_output_blocks(unet)
    handles = [blocks[k][0].register_forward_pre_hook(recorder(entering, k, pre=True))
               for k in feats]
    try:
        with torch.no_grad():
            unet(x, t, text)
    finally:
        for h in handles:
            h.remove()
    for k, f in feats.items():
        assert entering[k].shape[1] > f.shape[1] and torch.equal(entering[k][:, : f.shape[1]], f)
    assert unet.up_blocks[0].resnets[1] is blocks[1][-1] and unet.up_blocks[2].attentions[1] is blocks[7][-1]

    offset = torch.randn(1, unet.time_embedding.linear_2.out_features)
    shifted = ref.odise_decoder_features(unet, x, t, text, time_emb_offset=offset)
    assert not torch.allclose(shifted[2], feats[2]) and not unet.time_embedding._forward_hooks
    noisy = ref.odise_noisy_latent(torch.zeros(1, 4, 15, 15), t=100)
    assert noisy.shape == (1, 4, 15, 15) and torch.equal(noisy, ref.odise_noisy_latent(torch.zeros(1, 4, 15, 15)))


def test_dift_is_the_up_block_output(unet, pipe):
    x, t, text = inputs(grid=16)
    seen = {}
    h = unet.up_blocks[1].register_forward_hook(recorder(seen, "o"))
    try:
        with torch.no_grad():
            unet(x, t, text)
    finally:
        h.remove()
    ft = ref.dift_features(unet, x, t, text, up_ft_index=1)
    assert ft.shape == (1, 128, 8, 8) and torch.equal(ft, seen["o"])  # after the upsampler: 4x4 -> 8x8
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    one = ref.dift_featurize(pipe, img, "a photo of a cat", ensemble_size=2, generator=torch.Generator().manual_seed(0))
    assert one.shape == (1, 128, 4, 4)  # 64 px -> 8x8 latent -> up_blocks[1] out at 4x4


def test_sd_dino_co_pca_and_gather():
    g = torch.Generator().manual_seed(0)
    feats = [{k: torch.randn(1, c, s, s, generator=g) for k, c, s in [(2, 32, 2), (5, 32, 4), (8, 16, 8)]}
             for _ in range(2)]
    a, b = ref.sd_dino_co_pca(feats[0][8], feats[1][8], q=4)
    assert a.shape == b.shape == (1, 4, 8, 8)
    joint = torch.cat([a.flatten(2), b.flatten(2)], -1)[0]
    assert joint.mean(1).abs().max() < 1e-5  # projections of jointly centred tokens
    assert torch.equal(ref.sd_dino_co_pca(feats[0][8], feats[1][8], q=4)[0], a)  # seeded
    da, db = ref.sd_dino_gather(*feats, dims=(3, 4, 5), seed=0)
    assert da.shape == db.shape == (1, 12, 8, 8)
    assert torch.equal(da[:, :5], ref.sd_dino_co_pca(feats[0][8], feats[1][8], q=5)[0])  # layer 8 first
    two = ref.sd_dino_co_pca(feats[0][2], feats[1][2], q=3)[0]
    twice = F.interpolate(F.interpolate(two, size=(4, 4), mode="bilinear"), size=(8, 8), mode="bilinear")
    assert torch.allclose(da[:, 9:], twice)  # layer 2 last, upsampled twice


def test_hedlin_maps(unet):
    x, t, _ = inputs(grid=16)
    context = torch.randn(1, 77, 64, requires_grad=True)
    maps = ref.hedlin_cross_attention_maps(unet, x, t, context, layers=range(3), max_tokens=8**2, upsample_res=16)
    assert maps.shape == (3, 16, 16)
    maps.sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert not any(m._forward_pre_hooks for m in unet.modules())
