"""Stable Diffusion as a backbone, on the tiny SD1.5-shaped random model of tests/tiny_sd.py loaded
through the user-facing paths: loading (diffusers folder, single file, .ckpt, refusals), simsearch's
taps against the papers' own way of computing them (tests/papers_reference.py), noise and time, and
index / query --rerank aas / score / bench through the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import papers_reference as ref
from conftest import EXAMPLES, SD_SIZE
from simsearch.backbones import family_of, load_backbone
from simsearch.backbones.sd import DIFFSIM_C_LAYER, DIFFSIM_LAYER, DIFT_LAYER, SD1_ORIGINAL_CONFIG, ZHANG_LAYERS
from simsearch.errors import SimsearchError, WeightsNotFoundError
from simsearch.images import open_image
from simsearch.rerank.aas import aligned_attention_score

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return load_backbone(str(tiny_sd), "cpu", timestep=101)


@pytest.fixture(scope="module")
def pixels(sd):
    """Three photos as the backbone's input (B, 3, 128, 128)."""
    return torch.stack([sd.preprocess(open_image(EXAMPLES / f"{n}.jpg").image, SD_SIZE)
                        for n in ("chelsea", "coffee", "astronaut")])


def their_inputs(bb, pixels):
    """The UNet inputs of our pipeline, for the papers' own hooks: (noisy latents, t, prompt)."""
    noisy = bb.noisy_latents(pixels)
    return noisy, torch.full((len(noisy),), bb.timestep), bb.prompt_embedding.expand(len(noisy), -1, -1)


def hooks(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# -- loading ---------------------------------------------------------------------------------------
def test_single_file_loads_what_the_folder_holds(sd, tiny_sd_file, pixels):
    single = load_backbone(str(tiny_sd_file), "cpu", timestep=101)
    assert family_of(str(tiny_sd_file))[0].name == "sd"
    assert single.fingerprint == sd.fingerprint
    for name, t in sd.unet.state_dict().items():
        assert torch.equal(t, single.unet.state_dict()[name]), name
    torch.testing.assert_close(single.prompt_embedding, sd.prompt_embedding)  # no tokenizer in the file
    wanted = {"d": (DIFFSIM_LAYER, "source"), "c": (DIFT_LAYER, "features")}
    for k, v in single.tokens(pixels, wanted).items():
        torch.testing.assert_close(v, sd.tokens(pixels, wanted)[k], atol=1e-5, rtol=1e-5)


def test_ckpt_is_read_without_running_pickles(tmp_path, sd, tiny_sd_file):
    """A .ckpt of plain tensors loads (torch.load weights_only); one whose unpickling would run code
    is refused before that code runs."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_sd_file))
    shutil.copy(tiny_sd_file.with_suffix(".yaml"), tmp_path / "plain.yaml")
    torch.save({"state_dict": state}, tmp_path / "plain.ckpt")
    assert load_backbone(str(tmp_path / "plain.ckpt"), "cpu").fingerprint == sd.fingerprint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return marker.touch, ()

    shutil.copy(tiny_sd_file.with_suffix(".yaml"), tmp_path / "evil.yaml")
    torch.save({"state_dict": state, "extra": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsNotFoundError, match="weights_only"):
        load_backbone(str(tmp_path / "evil.ckpt"), "cpu")
    assert not marker.exists()


def test_single_file_needs_its_config(tmp_path, tiny_sd_file):
    """Not SD 1.x and no <stem>.yaml beside it: a clear error naming the yaml, not a hub lookup."""
    shutil.copy(tiny_sd_file, tmp_path / "lonely.safetensors")
    with pytest.raises(WeightsNotFoundError, match="lonely.yaml"):
        load_backbone(str(tmp_path / "lonely.safetensors"), "cpu")


def test_embedded_sd1_config_is_sd15():
    """The config used for SD 1.x files without a yaml maps to SD 1.5's diffusers UNet and VAE."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm

    unet = create_unet_diffusers_config_from_ldm(SD1_ORIGINAL_CONFIG, {})
    assert (tuple(unet["block_out_channels"]), unet["cross_attention_dim"], unet["layers_per_block"]) == ((320, 640, 1280, 1280), 768, 2)
    assert unet["attention_head_dim"] == 8 and unet["sample_size"] == 64
    vae = create_vae_diffusers_config_from_ldm(SD1_ORIGINAL_CONFIG, {})
    assert tuple(vae["block_out_channels"]) == (128, 256, 512, 512) and vae["scaling_factor"] == 0.18215


def test_empty_prompt_without_a_tokenizer_is_the_tokenizers(tiny_sd):
    from transformers import CLIPTextModel, CLIPTokenizer

    from simsearch.backbones.sd import empty_prompt_ids

    text = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder")
    ids = empty_prompt_ids(text)
    assert torch.equal(ids, empty_prompt_ids(text, CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")))
    assert ids.shape == (1, 77)


def test_unloadable_sources_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="config.json or model_index.json"):
        load_backbone(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsNotFoundError, match="not a checkpoint"):
        load_backbone(str(tmp_path / "notes.txt"))
    with pytest.raises(WeightsNotFoundError, match="Stable Diffusion models only"):
        load_backbone("dinov2-s14-imgfocus", timestep=101)


# -- our taps against the papers' own code ------------------------------------------------------------
def test_diffsim_attention_and_aas_are_diffsims(sd, pixels):
    """DiffSim's forward pre-hook re-running to_q/to_k/to_v on the attn1 input, and its AAS formula,
    give exactly simsearch's stored source -> attention_inputs -> aligned_attention_score."""
    theirs = ref.diffsim_qkv(sd.unet, *their_inputs(sd, pixels), ref.DIFFSIM_LAYER)
    source = sd.tokens(pixels, {"d": (DIFFSIM_LAYER, "source")})["d"]  # what an index stores
    ours = sd.attention_inputs(DIFFSIM_LAYER, source)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for i, j in [(0, 1), (0, 2), (1, 2), (2, 2)]:
        pick = lambda qkv, n: tuple(x[n:n + 1] for x in qkv)  # noqa: E731
        torch.testing.assert_close(aligned_attention_score(pick(ours, i), pick(ours, j))[0],
                                   ref.diffsim_aas(*pick(theirs, i), *pick(theirs, j)), atol=1e-6, rtol=0)
    assert aligned_attention_score(pick(ours, 2), pick(ours, 2))[0] == pytest.approx(1.0, abs=1e-6)
    assert hooks(sd.unet) == 0


def test_zhang_layers_are_odise_decoder_features(sd, pixels):
    """The decoder stream entering LDM output blocks 2, 5, 8, before the skip concat, as ODISE's
    decoder_only walk collects it."""
    theirs = ref.odise_decoder_features(sd.unet, *their_inputs(sd, pixels), indices=(2, 5, 8))
    ours = sd.tokens(pixels, {k: (path, "features") for k, path in ZHANG_LAYERS.items()})
    for k in (2, 5, 8):
        assert torch.equal(ours[k], theirs[k].flatten(2).transpose(1, 2)), k


def test_dift_layer_is_difts_up_block_output(sd, pixels):
    theirs = ref.dift_features(sd.unet, *their_inputs(sd, pixels[:1]), up_ft_index=1)
    ours = sd.dense_descriptors(pixels[:1])
    assert ours.grid == tuple(theirs.shape[-2:]) and ours.stride == SD_SIZE // theirs.shape[-1]
    assert torch.equal(ours.desc, theirs.flatten(2).transpose(1, 2))
    assert ours.saliency is None
    assert torch.equal(sd.dense_descriptors(pixels[:1], facet="token").desc, ours.desc)  # the one facet it has
    with pytest.raises(SimsearchError, match=r"module outputs: they take no facet='key' or stride=4$"):
        sd.dense_descriptors(pixels[:1], facet="key", stride=4)


def test_taps_leave_the_unet_unchanged_and_stop_early(sd, pixels):
    """After a capture no hook or processor change remains and the UNet output is what it was;
    nothing after the last tap runs (the last up block and conv_out are never called)."""
    noisy, t, text = their_inputs(sd, pixels[:1])
    processors = dict(sd.unet.attn_processors)
    with torch.inference_mode():
        before = sd.unet(noisy, t, encoder_hidden_states=text).sample
    calls = []
    counters = [m.register_forward_hook(lambda *a, name=name: calls.append(name))
                for name, m in [("last up block", sd.unet.up_blocks[-1]), ("conv_out", sd.unet.conv_out)]]
    try:
        sd.tokens(pixels[:1], {"d": (DIFFSIM_LAYER, "source"), "c": (DIFT_LAYER, "features")})
    finally:
        for c in counters:
            c.remove()
    assert calls == []
    assert hooks(sd.unet) == 0 and sd.unet.attn_processors == processors
    with torch.inference_mode():
        assert torch.equal(sd.unet(noisy, t, encoder_hidden_states=text).sample, before)


def test_ip_adapter_source_is_diffsim_c(tiny_sd, tiny_ip_adapter, pixels):
    """DiffSim-C: A's attn2 queries against B's IP-Adapter keys and values (text ones ignored), the
    adapter at scale 0.5 with each image's own image prompt, as DiffSim's IP hook computes them."""
    bb = load_backbone(str(tiny_sd), "cpu", timestep=251, ip_adapter=str(tiny_ip_adapter))
    assert {p.scale[0] for p in bb.unet.attn_processors.values() if hasattr(p, "to_k_ip")} == {0.5}
    path = ref.DIFFSIM_LAYER.replace("attn1", "attn2")
    theirs = ref.diffsim_qkv(bb.unet, *their_inputs(bb, pixels), path,
                             added_cond_kwargs={"image_embeds": bb.image_prompt(pixels)})
    source = bb.tokens(pixels, {"d": (DIFFSIM_C_LAYER, "source")})["d"]
    assert source.shape[1] == 16 + 2 * bb.ip_tokens  # [Q | K_ip | V_ip]
    q, k, v = bb.attention_inputs(DIFFSIM_C_LAYER, source)
    assert torch.equal(q, theirs[0]) and torch.equal(k, theirs[1][0]) and torch.equal(v, theirs[2][0])
    pick = lambda x, n: x[n:n + 1]  # noqa: E731
    torch.testing.assert_close(aligned_attention_score((pick(q, 0), pick(k, 0), pick(v, 0)), (pick(q, 1), pick(k, 1), pick(v, 1)))[0],
                               ref.diffsim_aas(pick(q, 0), [pick(k, 0)], [pick(v, 0)], pick(q, 1), [pick(k, 1)], [pick(v, 1)]),
                               atol=1e-6, rtol=0)
    with pytest.raises(SimsearchError, match="cross-attention"):
        load_backbone(str(tiny_sd), "cpu").check_layer(DIFFSIM_C_LAYER, "source", "dense_layer")


# -- noise and time --------------------------------------------------------------------------------------
def test_noise_and_time_are_fixed(sd, tiny_sd, pixels):
    """VAE posterior mean, one seeded noise tensor for every image, scheduler.add_noise at the DDPM
    timestep; an image's descriptors do not depend on its batch, and repeat bit for bit."""
    from diffusers import DDPMScheduler

    with torch.inference_mode():
        mean = sd.vae.encode(pixels).latent_dist.mean * sd.scaling_factor
    noise = torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(42))
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    expected = scheduler.add_noise(mean, noise.expand_as(mean), torch.full((3,), 101))
    assert torch.equal(sd.noisy_latents(pixels), expected)
    wanted = {"d": (DIFFSIM_LAYER, "source")}
    batch, alone = sd.tokens(pixels, wanted)["d"], sd.tokens(pixels[1:2], wanted)["d"]
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(sd.tokens(pixels, wanted)["d"], batch)
    # DiffSim's "target step" 900 / 750 index PNDM's schedule: they are DDPM t = 101 / 251
    assert (ref.diffsim_timestep(900), ref.diffsim_timestep(750)) == (101, 251)


# -- end to end ----------------------------------------------------------------------------------------
def test_index_query_score_bench_through_the_cli(cli, tiny_sd_file, photos, tmp_path):
    db = tmp_path / "db"
    code, out, err = cli("index", photos, "--db", db, "--model", tiny_sd_file, "--image-size", SD_SIZE)
    assert code == 0, err
    info = json.loads(cli("info", "--db", db, "--json")[1])
    assert info["config"]["dense_layer"] == DIFFSIM_LAYER and info["config"]["timestep"] == 101
    assert info["dense"]["shape"] == [16, 128]  # 4 x 4 tokens of up_blocks[1]'s last attn1, 128 wide

    code, out, err = cli("query", photos / "gravel.jpg", "--db", db, "--mode", "style", "--rerank", "aas", "-k", "3", "--json")
    assert code == 0, err
    hits = [json.loads(line) for line in out.splitlines()]
    assert hits[0]["path"] == str(photos / "gravel.jpg")
    assert hits[0]["scores"]["aas"] == pytest.approx(1.0, abs=1e-5) and all("aas" in h["scores"] for h in hits)

    report = tmp_path / "score.json"
    code, out, err = cli("score", "--ref", photos / "horse.jpg", "--gen", photos, "--metric", "aas,style", "--model",
                         tiny_sd_file, "--image-size", SD_SIZE, "--timestep", "251", "--out", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["config"]["descriptors"]["timestep"] == 251 and len(data["pairs"]) == 12
    self_pair = next(p for p in data["pairs"] if p["gen"] == str(photos / "horse.jpg"))
    assert self_pair["aas"] == pytest.approx(1.0, abs=1e-5)
    assert max(p["aas"] for p in data["pairs"] if p is not self_pair) < self_pair["aas"]

    groups = tmp_path / "groups"
    for i, name in enumerate(sorted(p.name for p in photos.iterdir())):
        (groups / f"g{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(photos / name, groups / f"g{i % 3}" / name)
    code, out, err = cli("bench", "sref", groups, "--model", tiny_sd_file, "--image-size", SD_SIZE,
                         "--triplets", "50", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 12 and set(result["metrics"]) >= {"aas", "style", "cosine", "combined"}
    assert 0 <= result["metrics"]["aas"]["triplet_accuracy"]["value"] <= 1


def test_models_lists_the_sd_presets(cli):
    code, out, _ = cli("models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["sd15"]["family"] == "sd" and rows["sd15"]["source"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert rows["timm-dinov2-small"]["family"] == "timm-vit"
