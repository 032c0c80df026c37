"""The real-scale backbone on tiny random FLUX components built from configs (pipeline/flux.py): latents and
packing as diffusers' FluxPipeline does them, OminiControl's routing of the SFT LoRA to the condition tokens,
the SFO reference (the SFT LoRA alone), persistence, and LoRA files that diffusers' FluxPipeline loads."""
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from pipeline import flux, world
from pipeline.config import ConfigError, Model
from pipeline.model import (SFT_ADAPTER, Conditioning, Route, SubjectFlux, add_lora, load_lora, reference_of,
                            save_lora, seeded_noise)

PX = 64
PROMPTS = ["a photo of a circle on grass", "a photo of a square in the snow"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return flux.build_tiny(tmp_path_factory.mktemp("flux") / "tiny", world.vocabulary())


def flux_cfg(tiny, **kw) -> Model:
    return Model(backbone="flux", pretrained=str(tiny), patch_size=2, position_delta=[0, -PX // 16],
                 max_text_len=16, **kw)


def build(tiny) -> SubjectFlux:
    return SubjectFlux.build(flux_cfg(tiny), PX, [], 0)


def randomize(model: SubjectFlux, name: str, seed: int):
    """LoRA B matrices start at zero (the adapter is a no-op); give them values so the adapter acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if f"lora_B.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def inputs(model: SubjectFlux, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(2, 3, PX, PX, generator=g) * 2 - 1
    x = model.tokens(imgs)
    c = model.condition(torch.rand(2, 3, PX, PX, generator=g) * 2 - 1, PROMPTS)
    return torch.randn(x.shape, generator=g), torch.tensor([0.3, 0.8]), c


def on_and_off(model: SubjectFlux, layer, x, t, c):
    """The model's output with its adapters on, then off, and `layer`'s outputs in call order."""
    seen = []
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        on = model(x, t, c)
        model.transformer.disable_adapters()
        off = model(x, t, c)
        model.transformer.enable_adapters()
    hook.remove()
    return on, off, seen


def test_tokens_are_flux_pipeline_latents_packed(tiny):
    model = build(tiny)
    img = torch.rand(2, 3, PX, PX) * 2 - 1
    vae = model.codec.vae
    lat = (vae.encode(img).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    packed = FluxPipeline._pack_latents(lat, 2, lat.shape[1], lat.shape[2], lat.shape[3])
    assert model.noise_shape == (16, PX // 8, PX // 8) and model.pixel_size == PX
    torch.testing.assert_close(model.tokens(img), packed)
    assert model.images(model.tokens(img)).shape == img.shape
    # the condition tokens sit one image width to the left: position delta (0, -W/16) in packed-token units
    assert model.cond_ids[:, 2].min().item() == -PX // 16 and model.img_ids[:, 2].min().item() == 0


def test_prompt_embeddings_are_flux_pipeline_encode_prompt(tiny):
    model = build(tiny)
    parts = flux.load(str(tiny))
    pipe = FluxPipeline(**parts)
    seq, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=16)
    c = model.condition(torch.zeros(2, 3, PX, PX), PROMPTS)
    torch.testing.assert_close(c.txt, seq)
    torch.testing.assert_close(c.pooled, pooled)


def test_sft_lora_acts_on_the_condition_tokens_only(tiny):
    model = build(tiny)
    add_lora(model, SFT_ADAPTER, 4, 4.0, routed=True)
    randomize(model, SFT_ADAPTER, 1)
    keys = [n for n, _ in model.transformer.named_parameters() if f".{SFT_ADAPTER}." in n]
    assert keys and not any(k in n for n in keys for k in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                                            "ff_context", "x_embedder", "norm"))
    assert not any(n.startswith("proj_out") for n in keys)        # the final projection reads no condition
    x, t, c = inputs(model)
    # the first double block's query projection over [noisy | condition]: with, then without LoRA
    on, off, seen = on_and_off(model, model.transformer.transformer_blocks[0].attn.to_q, x, t, c)
    n = x.shape[1]
    # the LoRA's update is exactly zero on the noisy tokens and nonzero on the condition tokens
    torch.testing.assert_close(seen[0][:, :n], seen[1][:, :n], rtol=0, atol=0)
    assert (seen[0][:, n:] - seen[1][:, n:]).abs().max() > 1e-3
    assert (on - off).abs().max() > 1e-4                          # ... and reaches the output through attention
    # without condition tokens the routed LoRA has nothing to act on: the base model exactly
    a, b, _ = on_and_off(model, model.transformer.transformer_blocks[0].attn.to_q, x, t,
                         Conditioning(None, c.txt, c.pooled))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_route_masks_are_made_where_the_input_lives(tiny):
    """The routing masks are built once per call on the input's device and in its dtype: on a GPU a host mask
    costs each adapted layer a synchronising copy (bench/gpu_flux.py --sft-lora). Checked here with float64."""
    model = build(tiny).double()
    add_lora(model, SFT_ADAPTER, 4, 4.0, routed=True)
    randomize(model, SFT_ADAPTER, 1)
    x, t, c = inputs(model)
    c = Conditioning(c.cond.double(), c.txt.double(), c.pooled.double())
    with torch.no_grad():
        model(x.double(), t.double(), c)
    masks = model.route.masks
    assert masks and all(m.dtype == torch.float64 and m.device == x.device for m in masks.values())
    n = x.shape[1]
    assert masks[2 * n][0, :n].eq(0).all() and masks[2 * n][0, n:].eq(1).all()   # [noisy | condition]


def test_sfo_reference_is_the_sft_lora_alone_and_stays_frozen(tiny, tmp_path):
    model = build(tiny)
    add_lora(model, SFT_ADAPTER, 4, 4.0, routed=True)
    randomize(model, SFT_ADAPTER, 1)
    x, t, c = inputs(model)
    with torch.no_grad():
        base = model(x, t, c)
    sft_before = {n: p.clone() for n, p in model.transformer.named_parameters() if ".sft." in n}
    params = add_lora(model, "sfo", 8, 8.0)
    assert params and all(".sfo." in n for n, p in model.transformer.named_parameters() if p.requires_grad)
    randomize(model, "sfo", 2)
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = model(x, t, c).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        policy = model(x, t, c)
        with reference_of(model):
            ref = model(x, t, c)
    torch.testing.assert_close(ref, base)                         # the reference: SFT LoRA, no SFO LoRA
    assert (policy - base).abs().max() > 1e-4
    for n, p in model.transformer.named_parameters():
        if ".sft." in n:
            assert torch.equal(p, sft_before[n]), f"{n} moved"
    assert model.transformer.active_adapters() == [SFT_ADAPTER, "sfo"]


def test_saved_models_reload_and_load_into_flux_pipeline(tiny, tmp_path):
    model = build(tiny)
    add_lora(model, SFT_ADAPTER, 4, 4.0, routed=True)
    randomize(model, SFT_ADAPTER, 1)
    model.save_pretrained(tmp_path / "sft")
    add_lora(model, "sfo", 8, 8.0)
    randomize(model, "sfo", 2)
    save_lora(model, tmp_path / "sfo", "sfo")
    x, t, c = inputs(model)

    again = SubjectFlux.from_pretrained(tmp_path / "sft")
    load_lora(again, tmp_path / "sfo", "sfo")
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, c), model(x, t, c))

    pipe = FluxPipeline.from_pretrained(tiny)
    pipe.load_lora_weights(tmp_path / "sft", adapter_name="sft")
    pipe.load_lora_weights(tmp_path / "sfo", adapter_name="sfo")
    ours = dict(model.transformer.named_parameters())
    theirs = dict(pipe.transformer.named_parameters())
    lora = [n for n in ours if ".lora_" in n]
    assert lora and all(torch.equal(ours[n], theirs[n]) for n in lora)
    out = pipe(PROMPTS[0], height=PX, width=PX, num_inference_steps=2, max_sequence_length=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, PX, PX, 3) and np.isfinite(out).all()


def test_sampling_uses_the_flux_scheduler_and_distilled_guidance(tiny):
    model = build(tiny).eval()
    grid = model.time_grid(4, 1.0)
    assert grid[0] == 1 and grid[-1] == 0 and len(grid) == 5
    assert not torch.allclose(grid, torch.linspace(1, 0, 5))     # FLUX's resolution-dependent shift
    refs = torch.rand(2, 3, PX, PX) * 2 - 1
    a = model.sample(refs, PROMPTS, seeded_noise([1, 2], model.noise_shape), 2, guidance=3.5)
    b = model.sample(refs, PROMPTS, seeded_noise([1, 2], model.noise_shape), 2, guidance=3.5)
    c = model.sample(refs, PROMPTS, seeded_noise([1, 2], model.noise_shape), 2, guidance=1.0)
    assert a.shape == (2, 3, PX, PX) and torch.equal(a, b) and not torch.equal(a, c)
    model.sample(refs, PROMPTS, seeded_noise([1, 2], model.noise_shape), 2, guidance=3.5)
    assert model.guidance == 1.0          # the sampling guidance does not stay behind for a training forward


def test_route_refuses_text_as_long_as_the_image_side():
    with pytest.raises(ValueError, match="max_text_len"):
        Route().set(32, [16, 16], True)
    Route().set(16, [16, 16], True)       # as long as one branch is fine: branches are routed one at a time


def test_bad_flux_configs_fail_clearly(tiny, tmp_path):
    with pytest.raises(ConfigError, match="patch_size must be 2"):
        SubjectFlux.build(Model(backbone="flux", pretrained=str(tiny), patch_size=4), PX, [], 0)
    with pytest.raises(ConfigError, match="not a FluxPipeline folder"):
        SubjectFlux.build(flux_cfg(tmp_path), PX, [], 0)
    with pytest.raises(ConfigError, match="multiple of 16"):
        SubjectFlux.build(flux_cfg(tiny), 40, [], 0)


# OminiControl's released LoRAs also adapt x_embedder and the blocks' AdaLN linears (their target regex).
OMINI_TARGETS = (r".*(x_embedder|(?<!single_)transformer_blocks\.\d+\.(norm1\.linear|attn\.(to_q|to_k|to_v|to_out\.0)"
                 r"|ff\.net\.2)|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.(to_q|to_k|to_v)))")


def lora_on(tiny, targets: str, seed: int) -> SubjectFlux:
    """A tiny model with a random-valued (acting) LoRA "sft" on `targets` (a peft regex), not routed."""
    from peft import LoraConfig
    model = build(tiny)
    model.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets), adapter_name="sft")
    randomize(model, "sft", seed)
    return model


def routed_from_file(tiny, donor: SubjectFlux, folder) -> SubjectFlux:
    """`donor`'s LoRA saved as a file and loaded into a fresh model as the routed SFT LoRA (`sft.init_lora`)."""
    save_lora(donor, folder, "sft")
    model = build(tiny)
    add_lora(model, SFT_ADAPTER, 1, 1.0, routed=True, weights=folder / "pytorch_lora_weights.safetensors")
    return model


def test_a_released_style_lora_loads_routed_to_the_condition_branch(tiny, tmp_path):
    model = routed_from_file(tiny, lora_on(tiny, OMINI_TARGETS, 3), tmp_path / "omini")
    assert any("x_embedder" in n for n, _ in model.transformer.named_parameters() if ".sft." in n)
    x, t, c = inputs(model)
    norm = model.transformer.transformer_blocks[0].norm1.linear
    on, off, seen = on_and_off(model, norm, x, t, c)
    a, b, _ = on_and_off(model, norm, x, t, Conditioning(None, c.txt, c.pooled))
    # AdaLN of the noisy branch (call 0 of each pass) untouched; of the condition branch (call 1) adapted
    torch.testing.assert_close(seen[0], seen[2], rtol=0, atol=0)
    assert (seen[1] - seen[3]).abs().max() > 1e-3
    assert (on - off).abs().max() > 1e-4
    torch.testing.assert_close(a, b, rtol=0, atol=0)     # no condition tokens: the base model exactly


# Layers that read the text or the noisy branch alone: a routed LoRA on them must add nothing. In the tiny model the
# text is as long as one branch (16 tokens), so a mask left over from the condition branch would reach the text.
TEXT_AND_FINAL = (r"(context_embedder|norm_out\.linear|proj_out|transformer_blocks\.\d+\.(norm1_context\.linear"
                  r"|ff_context\.net\.(0\.proj|2)|attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)))")


def test_a_routed_lora_on_text_and_final_layers_adds_nothing(tiny, tmp_path):
    plain = lora_on(tiny, TEXT_AND_FINAL, 5)
    model = routed_from_file(tiny, plain, tmp_path / "textside")
    names = {n.split(".lora_")[0] for n, _ in model.transformer.named_parameters() if ".sft." in n}
    assert {"proj_out", "norm_out.linear", "context_embedder"} <= names
    x, t, c = inputs(model)
    assert c.txt.shape[1] == x.shape[1]
    on, off, seen = on_and_off(model, model.transformer.proj_out, x, t, c)
    torch.testing.assert_close(on, off, rtol=0, atol=0)
    # the same LoRA unrouted does change the output: the test would see a leak
    a, b, _ = on_and_off(plain, plain.transformer.proj_out, x, t, c)
    assert (a - b).abs().max() > 1e-4
