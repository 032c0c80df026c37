"""OminiControl-style subject conditioning on a diffusers `FluxTransformer2DModel` (METHOD.md section 2).

The reference image is tokenised exactly like the target and its tokens join the image side of FLUX's joint
attention as a second *branch*: their own position ids (shifted by `position_delta`, in token units; the embedded
default [0, -8] is one width of its 32 px / patch-4 grid, params/real.yaml sets FLUX's) and their own timestep,
0, because the reference is clean. The stock `FluxTransformer2DModel.forward` gives every token one timestep, so
this module runs the model's own blocks with a per-branch modulation: `_double_block` and `_single_block` below
mirror diffusers' block forwards with one AdaLN modulation per branch and one joint attention over all tokens.
Everything else (attention processor, RoPE, embedders, LoRA layers from peft) is diffusers' own.

Token branches, in attention order: text (L tokens) | noisy image (N) | condition (N).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from . import flow
from .config import ConfigError, Model, Train
from .stage import progress
from .text import TextEncoder


# ---------------------------------------------------------------------------------------------------------
# Tokens and position ids
# ---------------------------------------------------------------------------------------------------------
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C p p), row-major over the patch grid."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    b, n, d = tokens.shape
    c = d // (p * p)
    x = tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def position_ids(rows: int, cols: int, delta: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """FLUX image ids (rows*cols, 3): (0, row + delta_row, col + delta_col), row-major like `patchify`."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None] + delta[0]
    ids[..., 2] = torch.arange(cols)[None, :] + delta[1]
    return ids.reshape(rows * cols, 3)


# ---------------------------------------------------------------------------------------------------------
# Block forwards with one modulation per branch
# ---------------------------------------------------------------------------------------------------------
def _modulated_residual(x, attn_out, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm, ff):
    """The second half of a FLUX double block for one branch: gated attention residual, then modulated MLP."""
    x = x + gate_msa[:, None] * attn_out
    return x + gate_mlp[:, None] * ff(norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])


def _next_branch(route, index: int, n: int | None):
    """Tell `route` (None: no routed LoRA) which branch the next per-branch layers read (`Route.branch`)."""
    if route is not None:
        route.branch(index, n)


def _double_block(block, txt, branches, tembs, temb_txt, rope, route=None):
    """FluxTransformerBlock over text + image-side branches, each branch modulated by its own temb. `route`
    (a `Route`, backbone flux) tells the routed LoRA which branch the per-branch MLP is reading."""
    mods = []                                                          # (normed, gate_msa, shift, scale, gate_mlp)
    for i, (x, e) in enumerate(zip(branches, tembs)):
        _next_branch(route, i, x.shape[1])
        mods.append(block.norm1(x, emb=e))
    _next_branch(route, -1, txt.shape[1])
    txt_mod = block.norm1_context(txt, emb=temb_txt)
    img_attn, txt_attn = block.attn(hidden_states=torch.cat([m[0] for m in mods], 1),
                                    encoder_hidden_states=txt_mod[0], image_rotary_emb=rope)
    sizes = [x.shape[1] for x in branches]
    out = []
    for i, (x, a, m) in enumerate(zip(branches, img_attn.split(sizes, 1), mods)):
        _next_branch(route, i, x.shape[1])
        out.append(_modulated_residual(x, a, *m[1:], block.norm2, block.ff))
    branches = out
    _next_branch(route, -1, txt.shape[1])
    txt = _modulated_residual(txt, txt_attn, *txt_mod[1:], block.norm2_context, block.ff_context)
    return txt, branches


def _single_block(block, txt, branches, tembs, temb_txt, rope, route=None):
    """FluxSingleTransformerBlock (parallel attention + MLP) with one modulation per branch."""
    seqs, embs = [txt, *branches], [temb_txt, *tembs]
    mods = []
    for i, (x, e) in enumerate(zip(seqs, embs)):
        _next_branch(route, i - 1, None)   # a routed LoRA on the AdaLN (released OminiControl LoRAs have one)
        mods.append(block.norm(x, emb=e))
    normed, gates = zip(*mods)
    h = torch.cat(normed, 1)
    out = block.proj_out(torch.cat([block.attn(hidden_states=h, image_rotary_emb=rope),
                                    block.act_mlp(block.proj_mlp(h))], 2))
    outs = [x + g[:, None] * o for x, g, o in zip(seqs, gates, out.split([x.shape[1] for x in seqs], 1))]
    return outs[0], outs[1:]


# ---------------------------------------------------------------------------------------------------------
# OminiControl's LoRA routing: an adapter that acts on the condition tokens only
# ---------------------------------------------------------------------------------------------------------
class Route:
    """Per-token masks of the condition branch, by sequence length, set by `SubjectFlux.forward` for each call:
    the image side of a double block's attention is [noisy | condition] (2N tokens), a single block's sequence is
    [text | noisy | condition] (L + 2N), and per-branch layers (a double block's AdaLN and MLP, the text's own
    layers, the final norm and projection) read one branch at a time, set by `branch` before each: the text and
    the noisy branch get no routed LoRA, the condition branch all of it. A sequence with no entry gets none."""

    def __init__(self):
        self.masks: dict[int, torch.Tensor] = {}
        self.cond_index: int | None = None
        self.current = 0.0        # for inputs with no token axis (an AdaLN's embedding): the branch being modulated
        self.like = {}            # device and dtype of the masks: those of the model's input

    def set(self, txt_len: int, sizes: list[int], has_cond: bool, like: torch.Tensor | None = None):
        """The layout of one call of the model. The masks are made on `like`'s device and in its dtype, so
        that no adapted layer copies one from the host (a synchronising copy per layer and call on a GPU)."""
        self.masks, self.cond_index, self.current = {}, (len(sizes) - 1 if has_cond else None), 0.0
        self.like = {} if like is None else {"device": like.device, "dtype": like.dtype}
        if has_cond:
            flags = [torch.full((n,), float(i == self.cond_index), **self.like) for i, n in enumerate(sizes)]
            image = torch.cat(flags)
            self.masks[len(image)] = image[None, :, None]
            self.masks[txt_len + len(image)] = torch.cat([torch.zeros(txt_len, **self.like), image])[None, :, None]
            if txt_len in self.masks:     # masks are found by length: the text must not match a whole sequence's
                raise ValueError(f"routed LoRA: {txt_len} text tokens, as many as the image-side sequence; "
                                 f"change model.max_text_len")

    def branch(self, index: int, n: int | None):
        """Branch `index` (-1: text) is next, alone, through per-branch layers (`n` tokens; None: no token axis)."""
        self.current = float(index == self.cond_index)
        if n is not None:
            self.masks[n] = torch.full((1, n, 1), self.current, **self.like)


class RoutedInput(torch.nn.Module):
    """Installed as a LoRA's dropout (identity at p = 0, which peft applies to the adapter's input only): zeroes
    the input rows of every token outside the condition branch, so B A (m x) = m (B A x) adds the adapter's
    update to the condition tokens alone. Holds no weights: the saved LoRA is a plain diffusers LoRA."""

    def __init__(self, route: Route):
        super().__init__()
        self.route = route

    def forward(self, x):
        if x.dim() == 2:                                  # (B, D): a per-branch embedding, e.g. AdaLN's
            return x * self.route.current
        m = self.route.masks.get(x.shape[-2])            # made on x's device and dtype: `.to` is a no-op
        return x * m.to(x.device, x.dtype) if m is not None else torch.zeros_like(x)


class PixelCodec(torch.nn.Module):
    """The embedded world's "VAE": the image itself (3 channels, no downsampling)."""
    factor, channels = 1, 3

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


# ---------------------------------------------------------------------------------------------------------
# The conditioned model
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Conditioning:
    """What the transformer sees besides (x_t, t): computed once per sample, reused across steps."""
    cond: torch.Tensor | None  # (B, N, D) condition tokens (the reference, tokenised like the target), or None
    txt: torch.Tensor       # (B, L, text_dim) T5-stand-in sequence
    pooled: torch.Tensor    # (B, pooled_dim) CLIP-stand-in pooled vector

    def select(self, rows) -> "Conditioning":
        return Conditioning(None if self.cond is None else self.cond[rows], self.txt[rows], self.pooled[rows])

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        cond = None if items[0].cond is None else torch.cat([c.cond for c in items])
        return Conditioning(cond, torch.cat([c.txt for c in items]), torch.cat([c.pooled for c in items]))


class SubjectFlux(torch.nn.Module):
    """FluxTransformer2DModel + frozen text encoders + image tokens + the subject branch.

    Two backbones share everything but the components (`model.backbone`): `embedded` builds a small transformer
    from params.yaml over pixel patches; `flux` loads FLUX.1-dev (pipeline/flux.py) over 2 x 2-packed VAE latents,
    with the SFT LoRA routed to the condition tokens (OminiControl) and the scheduler's resolution shift."""

    guidance: float = 1.0   # the embedded guidance value of a guidance-distilled transformer (FLUX.1-dev)

    def __init__(self, transformer: FluxTransformer2DModel, text, cfg: Model, image_size: int, codec=None,
                 scheduler=None):
        """`image_size` is the side of what `tokens` patchifies: pixels here, VAE latents at real scale.
        `text` may be None when every caller brings its own prompt embeddings (the GPU benchmark)."""
        super().__init__()
        if image_size % cfg.patch_size:
            raise ConfigError(f"params.yaml: model.patch_size={cfg.patch_size} does not divide the image size "
                              f"{image_size}")
        self.transformer, self.text, self.cfg, self.image_size = transformer, text, cfg, image_size
        self.codec, self.scheduler = codec if codec is not None else PixelCodec(), scheduler
        self.route: Route | None = None
        g = image_size // cfg.patch_size
        self.register_buffer("img_ids", position_ids(g, g), persistent=False)
        self.register_buffer("cond_ids", position_ids(g, g, tuple(cfg.position_delta)), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(cfg.max_text_len, 3), persistent=False)

    @property
    def pixel_size(self) -> int:
        return self.image_size * self.codec.factor

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """The shape of one sample's starting noise (latent channels, side, side)."""
        return (self.codec.channels, self.image_size, self.image_size)

    # --- construction and persistence -------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: Model, image_size: int, words: list[str], seed: int) -> "SubjectFlux":
        """A new model for images of `image_size` pixels: the embedded backbone from scratch, or FLUX.1-dev
        (`cfg.pretrained`) for `backbone: flux`."""
        if cfg.backbone == "flux":
            return cls.from_flux(cfg, image_size)
        text = TextEncoder.build(words, cfg.max_text_len, cfg.text_dim, cfg.pooled_dim, cfg.text_seed)
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=3 * cfg.patch_size ** 2, num_layers=cfg.num_layers,
            num_single_layers=cfg.num_single_layers, attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.text_dim,
            pooled_projection_dim=cfg.pooled_dim, guidance_embeds=False, axes_dims_rope=tuple(cfg.axes_dims_rope))
        return cls(transformer, text, cfg, image_size)

    @classmethod
    def from_flux(cls, cfg: Model, pixels: int) -> "SubjectFlux":
        """FLUX.1-dev's components (or any FluxPipeline folder) for `pixels`-px images; bf16 on CUDA."""
        from . import flux
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        parts = flux.load(cfg.pretrained, dtype)
        codec, tr = flux.VaeCodec(parts["vae"]), parts["transformer"]
        if cfg.patch_size != 2 or tr.config.in_channels != 4 * codec.channels:
            raise ConfigError(f"params.yaml: model.patch_size must be 2 for backbone flux (2 x 2 latent packing, "
                              f"{codec.channels} latent channels, transformer in_channels {tr.config.in_channels})")
        if pixels % (2 * codec.factor):
            raise ConfigError(f"image size {pixels} px: must be a multiple of {2 * codec.factor} for backbone flux")
        text = flux.FluxText(parts["text_encoder"], parts["tokenizer"], parts["text_encoder_2"],
                             parts["tokenizer_2"], cfg.max_text_len)
        return cls(tr, text, cfg, pixels // codec.factor, codec, parts["scheduler"])

    def save_pretrained(self, directory: str | Path):
        """Embedded: the whole model. Flux: the SFT LoRA only (FLUX.1-dev itself is loaded from
        `model.pretrained`), in the layout `FluxPipeline.load_lora_weights` reads."""
        directory = Path(directory)
        meta = {"image_size": self.image_size, "pixel_size": self.pixel_size, "model": self.cfg.__dict__}
        if self.cfg.backbone == "flux":
            save_lora(self, directory, SFT_ADAPTER)
        else:
            self.transformer.save_pretrained(directory / "transformer")
            self.text.save_pretrained(directory)
        (directory / "subject_flux.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "SubjectFlux":
        directory = Path(directory)
        meta_file = directory / "subject_flux.json"
        if not meta_file.exists():
            raise ConfigError(f"{directory}: not a SubjectFlux model directory (no subject_flux.json); "
                              f"train one with `dvc repro sft`")
        meta = json.loads(meta_file.read_text())
        cfg = Model(**meta["model"])
        if cfg.backbone == "flux":
            model = cls.from_flux(cfg, meta["pixel_size"])
            add_lora(model, SFT_ADAPTER, 1, 1.0, routed=True, weights=directory)
            return model
        transformer = FluxTransformer2DModel.from_pretrained(directory / "transformer")
        return cls(transformer, TextEncoder.from_pretrained(directory), cfg, meta["image_size"])

    # --- tokens ------------------------------------------------------------------------------------------
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> tokens (B, N, D): pixel patches, or packed VAE latents."""
        return patchify(self.codec.encode(images), self.cfg.patch_size)

    def images(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(unpatchify(tokens, self.cfg.patch_size, self.image_size, self.image_size))

    def condition(self, refs: torch.Tensor, prompts: list[str]) -> Conditioning:
        """Reference images (B, 3, H, W) in [-1, 1] and prompts -> the cached conditioning of a batch."""
        return self.condition_tokens(self.tokens(refs), prompts)

    def condition_tokens(self, cond: torch.Tensor, prompts: list[str]) -> Conditioning:
        """The conditioning from reference tokens computed once (`tokens`) and prompts (cached per prompt)."""
        txt, pooled = self.text.encode(prompts)
        return Conditioning(cond, txt.to(cond.device), pooled.to(cond.device))

    # --- the forward ---------------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        """Predicted velocity tokens (B, N, D) for noisy tokens x_t (B, N, D) at times t (B,) in [0, 1]."""
        tr, route = self.transformer, self.route
        if route is not None:         # token layout for a LoRA routed to the condition tokens (backbone flux)
            route.set(c.txt.shape[1], [x_t.shape[1]] + ([c.cond.shape[1]] if c.cond is not None else []),
                      c.cond is not None, like=x_t)
        temb = self._temb(t.to(x_t.dtype), c.pooled)                                      # noisy branch and text
        _next_branch(route, -1, c.txt.shape[1])
        txt = tr.context_embedder(c.txt)
        _next_branch(route, 0, x_t.shape[1])
        branches, tembs, ids = [tr.x_embedder(x_t)], [temb], [self.txt_ids, self.img_ids]
        if c.cond is not None:                                                            # the subject branch
            _next_branch(route, 1, c.cond.shape[1])
            branches.append(tr.x_embedder(c.cond))
            tembs.append(self._temb(torch.zeros_like(t, dtype=x_t.dtype), c.pooled))      # clean: t = 0
            ids.append(self.cond_ids)
        rope = tr.pos_embed(torch.cat(ids))
        for block in tr.transformer_blocks:
            txt, branches = self._maybe_checkpoint(_double_block, block, txt, branches, tembs, temb, rope, self.route)
        for block in tr.single_transformer_blocks:
            txt, branches = self._maybe_checkpoint(_single_block, block, txt, branches, tembs, temb, rope, self.route)
        _next_branch(route, 0, x_t.shape[1])         # the final norm and projection read the noisy branch alone
        return tr.proj_out(tr.norm_out(branches[0], temb))

    def _temb(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Time (+ guidance, for guidance-distilled FLUX.1-dev) + pooled-text embedding; diffusers scales by 1000."""
        tr = self.transformer
        if tr.config.guidance_embeds:
            return tr.time_text_embed(t * 1000, torch.full_like(t, self.guidance) * 1000, pooled)
        return tr.time_text_embed(t * 1000, pooled)

    def _maybe_checkpoint(self, fn, *args):
        if torch.is_grad_enabled() and self.transformer.gradient_checkpointing:
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # --- sampling ------------------------------------------------------------------------------------------
    def time_grid(self, steps: int, shift: float) -> torch.Tensor:
        """Euler times from 1 to 0: `sampler.shift` (embedded), or FLUX's scheduler with its resolution shift."""
        if self.scheduler is not None:
            from .flux import flux_time_grid
            return flux_time_grid(self.scheduler, steps, (self.image_size // self.cfg.patch_size) ** 2)
        return flow.time_grid(steps, shift)

    @torch.no_grad()
    def sample(self, refs: torch.Tensor, prompts: list[str], noise: torch.Tensor, steps: int,
               guidance: float = 1.0, shift: float = 1.0) -> torch.Tensor:
        """Euler sampling from `noise` (B, *noise_shape); returns images (B, 3, H, W) in [-1, 1]. A guidance-
        distilled transformer (FLUX.1-dev) takes `guidance` as its embedded guidance; otherwise CFG drops the
        text and keeps the reference."""
        c = self.condition(refs, prompts)
        grid = self.time_grid(steps, shift).to(noise.device)
        previous = self.guidance
        if self.transformer.config.guidance_embeds:
            self.guidance = guidance          # for this call only: restored below

            def velocity(x, t):
                return self(x, t, c)
        elif guidance != 1.0:
            c_all = Conditioning.cat([c, self.condition(refs, [""] * len(prompts))])

            def velocity(x, t):
                v_c, v_u = self(torch.cat([x, x]), torch.cat([t, t]), c_all).chunk(2)
                return flow.guided(v_c, v_u, guidance)
        else:
            def velocity(x, t):
                return self(x, t, c)
        try:
            x = flow.euler_sample(velocity, patchify(noise, self.cfg.patch_size), steps, shift, grid)
        finally:
            self.guidance = previous
        return self.images(x).clamp(-1, 1)


def encode_all(model: SubjectFlux, imgs: torch.Tensor | None, desc: str, batch: int = 64) -> torch.Tensor | None:
    """Tokens of every image, computed once before training (at real scale: VAE latents, packed), on the CPU."""
    if imgs is None:
        return None
    device = next(model.transformer.parameters()).device
    chunks = [model.tokens(imgs[i:i + batch].to(device)).cpu()
              for i in progress(range(0, len(imgs), batch), desc=desc)]
    return torch.cat(chunks)


def fill_prompt_cache(model: SubjectFlux, prompts: list[str]):
    """Encode every distinct prompt once: in batches of 64 at real scale (FLUX.1-dev's T5 cannot take thousands
    at once), in one batch for the embedded encoders (the embeddings every earlier run was trained on)."""
    unique = sorted(set(prompts))
    batch = 64 if model.cfg.backbone == "flux" else max(1, len(unique))
    for i in range(0, len(unique), batch):
        model.text.encode(unique[i:i + batch])


def speed_options(model: SubjectFlux, train: Train, cuda: bool) -> SubjectFlux:
    """Wrap the model's forward in bf16 autocast and/or torch.compile (`train.bf16`, `train.compile`). The
    backward stays outside autocast; the errors are computed in float32 (`flow.per_sample_error`). FLUX.1-dev on
    CUDA also recomputes each block in the backward (`model.gradient_checkpointing`)."""
    if cuda and model.cfg.backbone == "flux" and model.cfg.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    forward, bf16, compile = model.forward, train.enabled("bf16", cuda), train.enabled("compile", cuda)
    if bf16:
        forward = torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)(forward)
    if compile:
        forward = torch.compile(forward)
    model.forward = forward
    return model


@contextlib.contextmanager
def adapters_active(model: SubjectFlux, names: list[str]):
    """Run with only the LoRA adapters `names` switched on, all frozen (the reference of a two-LoRA model is its
    SFT LoRA alone), then restore the active adapters and every parameter's requires_grad: peft's set_adapter
    marks each active adapter trainable, so the flags are put back explicitly."""
    tr = model.transformer
    before = tr.active_adapters()
    grads = {n: p.requires_grad for n, p in tr.named_parameters()}
    try:
        tr.set_adapters(names)
        tr.requires_grad_(False)
        yield
    finally:
        tr.set_adapters(before)
        for n, p in tr.named_parameters():
            p.requires_grad_(grads[n])


@contextlib.contextmanager
def adapters_disabled(model: SubjectFlux):
    """Run the reference: the same weights with every LoRA adapter switched off (no second copy)."""
    model.transformer.disable_adapters()
    try:
        yield
    finally:
        model.transformer.enable_adapters()


def seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal tensor of `shape` per seed: a sample's noise depends only on its own seed, so
    results do not depend on batch size, worker or order."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# ---------------------------------------------------------------------------------------------------------
# LoRA adapters (peft through diffusers' PeftAdapterMixin)
# ---------------------------------------------------------------------------------------------------------
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
LORA_FILE = "pytorch_lora_weights.safetensors"
SFT_ADAPTER = "sft"   # backbone flux: the OminiControl LoRA, the whole of the SFT base's training
# The layers that read condition tokens (image side of double blocks, all of single blocks); text-only layers
# and the final projection never see them, so the routed SFT LoRA has nothing to do there.
SFT_TARGETS = (r".*(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
               r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))")


def add_lora(model: SubjectFlux, name: str, rank: int, alpha: float, routed: bool = False,
             weights: str | Path | None = None) -> list[torch.nn.Parameter]:
    """Freeze the model, add a trainable LoRA `name` and return exactly its parameters (the only ones an
    optimizer may see); adapters added before stay active and frozen (the SFO LoRA sits on the SFT LoRA).
    `routed`: OminiControl's SFT LoRA, on `SFT_TARGETS`, acting on the condition tokens only (`RoutedInput`).
    `weights`: load the adapter from a saved LoRA (a folder with LORA_FILE, a .safetensors file, or a hub id
    `owner/name[:file]`) instead of a fresh one; its rank and alpha then come from the file."""
    from peft import LoraConfig
    model.requires_grad_(False)
    tr = model.transformer
    if weights is not None:
        _load_adapter(tr, weights, name)
    else:
        tr.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=SFT_TARGETS if routed else
                                  list(LORA_TARGETS)), adapter_name=name)
    if routed:
        model.route = model.route or Route()
        for module in tr.modules():
            if hasattr(module, "lora_dropout") and name in module.lora_dropout:
                module.lora_dropout[name] = RoutedInput(model.route)
    tr.set_adapters(list(tr.peft_config))
    params = [p for n, p in tr.named_parameters() if f".{name}." in n]
    for n, p in model.named_parameters():
        p.requires_grad_(f".{name}." in n)
    return params


def _load_adapter(tr, weights: str | Path, name: str):
    """A saved diffusers/peft LoRA into adapter `name`, with a ConfigError that names the source."""
    w = str(weights)
    kw = {}
    if Path(w).is_dir():
        w = str(Path(w) / LORA_FILE)
    elif not Path(w).exists():
        from . import hub
        repo, _, file = w.partition(":")
        hub.check(repo, "sft.init_lora")
        w, kw = repo, ({"weight_name": file} if file else {})
    if Path(w).suffix == ".safetensors" and not Path(w).exists():
        raise ConfigError(f"{w}: no LoRA adapter here; run `dvc repro sft` (or `sfo`)")
    try:
        tr.load_lora_adapter(w, adapter_name=name, prefix="transformer", **kw)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{weights}: the LoRA does not fit this transformer ({type(e).__name__}: "
                          f"{str(e)[:300]})") from None


def reference_of(model: SubjectFlux):
    """The SFO reference as a context: the SFT base, i.e. the SFT LoRA alone (flux) or no adapter (embedded)."""
    if SFT_ADAPTER in getattr(model.transformer, "peft_config", {}):
        return adapters_active(model, [SFT_ADAPTER])
    return adapters_disabled(model)


def save_lora(model: SubjectFlux, directory: str | Path, name: str):
    """The adapter as safetensors with keys prefixed `transformer.` (the layout diffusers' LoRA loaders read)
    and its LoraConfig in the metadata, keys prefixed likewise (without the prefix `FluxPipeline.load_lora_weights`
    finds no config, and `load_lora_adapter` infers one with alpha = rank), serialised deterministically: one metadata key only, because
    safetensors writes the metadata map in a per-process random order."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model.transformer, adapter_name=name)
    cfg = {k: (sorted(v) if isinstance(v, (set, list)) and k == "target_modules" else v)
           for k, v in model.transformer.peft_config[name].to_dict().items()}
    save_file({f"transformer.{k}": v.contiguous() for k, v in sorted(state.items())}, str(directory / LORA_FILE),
              metadata={LORA_ADAPTER_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in cfg.items()},
                                                              sort_keys=True, default=list)})


def load_trained(model_dir: str | Path, base: str | Path | None = None) -> SubjectFlux:
    """A model directory the pipeline wrote, ready to sample: a whole model (`models/sft`, or `models/sfo` under
    `sfo.direct`), or an SFO adapter on top of its base (`base`, by default the `sft` directory beside it)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no such model directory (train one with `dvc repro`)")
    if (model_dir / "subject_flux.json").exists():
        return SubjectFlux.from_pretrained(model_dir).eval()
    if not (model_dir / LORA_FILE).exists():
        raise ConfigError(f"{model_dir}: not a model directory written by the sft or sfo stage "
                          f"(no subject_flux.json, no {LORA_FILE})")
    base = Path(base) if base is not None else model_dir.parent / "sft"
    if not (base / "subject_flux.json").exists():
        raise ConfigError(f"{model_dir} holds an SFO adapter, and its base {base} is not a model directory; "
                          f"pass the SFT base it was trained on")
    model = SubjectFlux.from_pretrained(base)
    load_lora(model, model_dir, "sfo")
    return model.eval()


def load_lora(model: SubjectFlux, directory: str | Path, name: str):
    """Add the saved adapter `name` on top of the model's adapters (all active, all frozen)."""
    path = Path(directory) / LORA_FILE
    if not path.exists():
        raise ConfigError(f"{path}: no LoRA adapter here; run `dvc repro sfo`")
    add_lora(model, name, 1, 1.0, weights=directory)
    model.requires_grad_(False)
