"""The subject-conditioned FLUX transformer: tokens, position ids, the per-branch block forward, LoRA."""
import pytest
import torch

from pipeline import flow, world
from pipeline.config import ConfigError, Model
from pipeline.model import (Conditioning, SubjectFlux, adapters_disabled, add_lora, load_lora, patchify,
                            position_ids, save_lora, seeded_noise, unpatchify)

TINY = Model(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
             axes_dims_rope=[4, 6, 6], text_dim=16, pooled_dim=16)
PROMPTS = ["a small circle in the sky on the left", "a photo of a square"]


def build(seed: int = 0) -> SubjectFlux:
    return SubjectFlux.build(TINY, 16, world.vocabulary(), seed=seed).eval()


@pytest.fixture
def model():
    return build()


def test_patchify_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tok = patchify(x, 4)
    assert tok.shape == (2, 4, 48)
    assert torch.equal(tok[0, 1].reshape(3, 4, 4), x[0, :, 0:4, 4:8])    # token 1 = top-right patch
    assert torch.equal(unpatchify(tok, 4, 8, 8), x)


def test_position_ids_shift_the_condition_one_width_left():
    img, cond = position_ids(2, 3), position_ids(2, 3, (0, -3))
    assert img.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert torch.equal(cond[:, 2], img[:, 2] - 3) and torch.equal(cond[:, 1], img[:, 1])


def test_without_condition_the_forward_equals_diffusers_flux(model):
    """The per-branch block forward is diffusers' block forward when there is only one image branch."""
    x, t = torch.randn(2, 16, 48), torch.tensor([0.3, 0.9])
    c = model.condition(torch.zeros(2, 3, 16, 16), PROMPTS)
    ours = model(x, t, Conditioning(None, c.txt, c.pooled))
    stock = model.transformer(hidden_states=x, encoder_hidden_states=c.txt, pooled_projections=c.pooled,
                              timestep=t, img_ids=model.img_ids, txt_ids=model.txt_ids).sample
    assert torch.allclose(ours, stock, atol=1e-5)


def test_output_depends_on_the_reference_and_condition_sees_t0(model):
    x, t = torch.randn(2, 16, 48), torch.tensor([0.5, 0.5])
    ref = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a = model(x, t, model.condition(ref, PROMPTS))
        b = model(x, t, model.condition(-ref, PROMPTS))
    assert not torch.allclose(a, b)
    # the condition branch is modulated by the embedding of t = 0, whatever the noisy branch's t
    tr = model.transformer
    temb0 = tr.time_text_embed(torch.zeros(2), model.condition(ref, PROMPTS).pooled)
    seen = []
    hook = tr.transformer_blocks[0].norm1.register_forward_hook(lambda m, i, kw, o: seen.append(kw["emb"]),
                                                                with_kwargs=True)
    with torch.no_grad():
        model(x, t, model.condition(ref, PROMPTS))
    hook.remove()
    assert torch.allclose(seen[1], temb0) and not torch.allclose(seen[0], temb0)


def test_sample_is_deterministic_per_seed_and_in_range(model):
    ref = torch.zeros(2, 3, 16, 16)
    a = model.sample(ref, PROMPTS, seeded_noise([1, 2], (3, 16, 16)), steps=3)
    b = model.sample(ref, PROMPTS, seeded_noise([1, 2], (3, 16, 16)), steps=3)
    c = model.sample(ref[:1], PROMPTS[:1], seeded_noise([1], (3, 16, 16)), steps=3)
    assert torch.equal(a, b) and a.shape == (2, 3, 16, 16) and a.abs().max() <= 1
    assert torch.allclose(a[:1], c, atol=1e-5)                        # a sample does not depend on its batch
    g = model.sample(ref, PROMPTS, seeded_noise([1, 2], (3, 16, 16)), steps=3, guidance=2.0)
    assert not torch.allclose(a, g)


def test_lora_policy_starts_at_reference_trains_only_adapter_and_roundtrips(model, tmp_path):
    base = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    params = add_lora(model, "sfo", rank=4, alpha=4.0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".sfo." in n for n in names) and len(params) == len(names)
    x, t = torch.randn(2, 16, 48), torch.tensor([0.2, 0.7])
    c = model.condition(torch.zeros(2, 3, 16, 16), PROMPTS)
    with torch.no_grad():
        assert torch.equal(model(x, t, c), model(x, t, c))
        with adapters_disabled(model):
            ref0 = model(x, t, c)
        assert torch.allclose(model(x, t, c), ref0)                   # LoRA B = 0 at init
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(2):
        loss = flow.flow_loss(model(x, t, c), x, torch.randn_like(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        policy = model(x, t, c)
        with adapters_disabled(model):
            ref1 = model(x, t, c)
    assert not torch.allclose(policy, ref1) and torch.allclose(ref1, ref0)   # the reference never moves
    for k, v in model.transformer.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    save_lora(model, tmp_path, "sfo")
    fresh = build()
    fresh.transformer.load_state_dict(base)
    load_lora(fresh, tmp_path, "sfo")
    with torch.no_grad():
        assert torch.allclose(fresh(x, t, c), policy, atol=1e-6)


def test_save_and_load_pretrained(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = SubjectFlux.from_pretrained(tmp_path).eval()
    x, t = torch.randn(1, 16, 48), torch.tensor([0.4])
    c = model.condition(torch.zeros(1, 3, 16, 16), PROMPTS[:1])
    with torch.no_grad():
        c2 = again.condition(torch.zeros(1, 3, 16, 16), PROMPTS[:1])
    assert torch.equal(c.txt, c2.txt) and torch.equal(c.pooled, c2.pooled)
    with torch.no_grad():
        assert torch.allclose(model(x, t, c), again(x, t, c2), rtol=1e-5, atol=1e-5)


def test_patch_size_must_divide_image_size():
    with pytest.raises(ConfigError, match="model.patch_size=4 does not divide the image size 18"):
        SubjectFlux.build(TINY, 18, world.vocabulary(), seed=0)


def test_two_lora_reference_is_the_first_lora_alone_and_stays_frozen(model):
    """Real scale: the policy is SFT LoRA + SFO LoRA, the reference the SFT LoRA alone (adapters_active)."""
    from pipeline.model import adapters_active
    c = model.condition(torch.rand(2, 3, 16, 16) * 2 - 1, PROMPTS)
    x, t = torch.randn(2, 16, 48), torch.tensor([0.3, 0.9])
    sft = add_lora(model, "sft", 4, 4)
    for p in sft:
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        sft_only = model(x, t, c)
    sfo = add_lora(model, "sfo", 8, 8)
    model.transformer.set_adapters(["sft", "sfo"])
    model.requires_grad_(False)
    for p in sfo:
        torch.nn.init.normal_(p, std=0.05)
        p.requires_grad_(True)
    with torch.no_grad():
        policy = model(x, t, c)
    with torch.no_grad(), adapters_active(model, ["sft"]):
        reference = model(x, t, c)
        assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(reference, sft_only) and not torch.allclose(policy, reference, atol=1e-4)
    assert model.transformer.active_adapters() == ["sft", "sfo"]          # restored, with the same grads
    assert all(p.requires_grad for p in sfo) and not any(p.requires_grad for p in sft)


def test_guidance_embedding_of_a_distilled_transformer_is_used():
    """FLUX.1-dev embeds a guidance value: the forward feeds `SubjectFlux.guidance` to it."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=48, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    m = SubjectFlux(tr, None, TINY, 16).eval()
    c = Conditioning(torch.randn(1, 16, 48), torch.randn(1, TINY.max_text_len, 16), torch.randn(1, 16))
    x, t = torch.randn(1, 16, 48), torch.tensor([0.5])
    with torch.no_grad():
        m.guidance = 1.0
        a = m(x, t, c)
        m.guidance = 3.5
        b = m(x, t, c)
    assert a.shape == (1, 16, 48) and not torch.allclose(a, b)
