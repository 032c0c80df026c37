"""The real-scale backbone (`model.backbone: flux`): FLUX.1-dev's components, through diffusers and transformers.

`SubjectFlux` (pipeline/model.py) is the same model at both scales; this module supplies what differs:
- `VaeCodec`: images <-> FLUX latents, `(vae latent mode - shift_factor) * scaling_factor`; the 2 x 2 packing
  into tokens is model.patchify with patch 2, which is exactly `FluxPipeline._pack_latents`'s layout.
- `FluxText`: T5 sequence + CLIP pooled prompt embeddings from `FluxPipeline.encode_prompt`, cached per prompt.
- `flux_time_grid`: the sampler's sigmas from FLUX's `FlowMatchEulerDiscreteScheduler` with its resolution-
  dependent shift (`calculate_shift` of the packed sequence length), as FluxPipeline samples.
- `load`: every component from a hub id or a local folder in the FluxPipeline layout, checked first
  (pipeline/hub.py) so a missing login, licence or folder stops the stage within seconds.
- `build_tiny`: random-weight components from small configs, in the same layout: what the tests (and a CPU
  smoke run of the real-scale DAG) load instead of FLUX.1-dev.
The OminiControl LoRA routing (the SFT LoRA acts on the condition tokens only) is in model.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import hub
from .config import ConfigError

SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class VaeCodec(torch.nn.Module):
    """Pixels (B, 3, H, W) in [-1, 1] <-> normalised FLUX latents (B, C, H/f, W/f). Frozen; encoding takes the
    posterior's mode, so a cached latent is deterministic."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = vae.config.latent_channels
        self.shift, self.scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        lat = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return ((lat - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents / self.scale + self.shift).to(self.vae.device, self.vae.dtype)
        return self.vae.decode(z).sample.float()


class FluxText(torch.nn.Module):
    """Frozen CLIP (pooled) + T5 (sequence) prompt encoders, through `FluxPipeline.encode_prompt`, with a
    per-prompt cache on the CPU: at real scale a 512-token T5 embedding is 4 MB in bf16, so the cache is what
    makes `model.max_text_len` worth keeping short."""

    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2, max_length: int):
        super().__init__()
        from diffusers import FluxPipeline
        self.clip, self.t5 = text_encoder.eval(), text_encoder_2.eval()
        self.requires_grad_(False)
        self.max_length = max_length
        self.pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=self.clip, tokenizer=tokenizer,
                                 text_encoder_2=self.t5, tokenizer_2=tokenizer_2, transformer=None)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            seq, pooled, _ = self.pipe.encode_prompt(missing, None, device=self.clip.device,
                                                     max_sequence_length=self.max_length)
            for i, p in enumerate(missing):
                self._cache[p] = (seq[i].cpu(), pooled[i].cpu())
        seq, pooled = zip(*(self._cache[p] for p in prompts))
        device = next(self.clip.parameters()).device
        return torch.stack(seq).to(device), torch.stack(pooled).to(device)


def flux_time_grid(scheduler, steps: int, tokens: int) -> torch.Tensor:
    """FluxPipeline's sigmas (steps + 1, from 1 to 0) for a packed sequence of `tokens` image tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    cfg = scheduler.config
    mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
    return scheduler.sigmas.float()


def load(name: str, dtype: torch.dtype = torch.float32, key: str = "model.pretrained") -> dict:
    """The components of a FluxPipeline folder or hub id (FLUX.1-dev by default), checked before loading."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
    name = hub.check(name, key)
    if Path(name).exists():
        missing = [s for s in SUBFOLDERS if not (Path(name) / s).is_dir()]
        if missing:
            raise ConfigError(f"params.yaml: {key}={name!r} is not a FluxPipeline folder: missing {missing}")
    kw = dict(torch_dtype=dtype)
    return {"transformer": FluxTransformer2DModel.from_pretrained(name, subfolder="transformer", **kw),
            "vae": AutoencoderKL.from_pretrained(name, subfolder="vae", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **kw),
            "text_encoder_2": T5EncoderModel.from_pretrained(name, subfolder="text_encoder_2", **kw),
            "tokenizer": AutoTokenizer.from_pretrained(name, subfolder="tokenizer"),
            "tokenizer_2": AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2"),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler")}


def build_tiny(directory: str | Path, words: list[str], seed: int = 0, text_len: int = 16) -> Path:
    """Random-weight FLUX components from small configs, saved as a FluxPipeline folder (the layout `load` and
    `FluxPipeline.from_pretrained` read): 8x VAE with 16 latent channels, a transformer with 64 input channels
    (16 x 2 x 2 packed) and distilled guidance like FLUX.1-dev, CLIP and T5 text encoders over `words` with
    tokenizers built by the `tokenizers` library (hub tokenizers cannot be downloaded in tests)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from .text import build_tokenizer
    torch.manual_seed(seed)
    tok = build_tokenizer(words, text_len)
    clip_tok = build_tokenizer(words, 77)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        pad_token_id=0, bos_token_id=0, eos_token_id=1, projection_dim=16))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=tok, transformer=transformer)
    pipe.save_pretrained(directory)
    return Path(directory)
