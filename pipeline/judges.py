"""The embedded world's evaluators (METHOD.md sections 6 and 7).

- DINO stand-in: a `transformers` ViTModel; the embedding is the CLS token of the last hidden state (not the
  pooler), as DreamBench's DINO metric uses it. Trained contrastively so that two renders of one subject in
  different contexts (or a reference and a target) embed together.
- CLIP stand-in: a `transformers` CLIPModel trained contrastively on renders and their full captions
  (identity + context). CLIP-I compares image embeddings, CLIP-T image and prompt embeddings.
- Attribute reader: a small CNN with one classification head per attribute of `world.ATTRS`; it gives the
  world's exact measures id_acc and ctx_acc.

Pinned protocol choices (written into every metrics file by `PROTOCOL`): images enter every judge at the
world's resolution as float in [-1, 1] (no resizing, no ImageNet/CLIP normalisation); each generated image is
compared with the reference of its own bench row; cosine similarities are reported on the x1 scale.
At real scale (`judges.source: pretrained`) `Judges.load` returns pipeline/pretrained_judges.py's judges instead.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, ViTConfig, ViTModel

from . import pretrained_judges, world
from .config import ConfigError
from .text import build_tokenizer, tokenize

PROTOCOL = {
    "dino": "cosine of DINO-stand-in ViT CLS embeddings (last_hidden_state[:, 0]), generated vs its row's reference",
    "clip_i": "cosine of CLIP-stand-in image embeddings, generated vs its row's reference",
    "clip_t": "cosine of CLIP-stand-in image and prompt embeddings",
    "id_acc": "fraction of identity attributes (class, body colour, pattern, pattern colour, mark corner, "
              "mark colour) the attribute reader reads as the reference subject's",
    "ctx_acc": "fraction of context attributes (background, position, size) read as the prompt asks",
    "subject_mse": "mean squared pixel error (pixels in [0, 1]) against the ground-truth render, inside the "
                   "ground-truth subject mask",
    "preprocessing": "images at world.image_size, float in [-1, 1], no resize, no normalisation",
    "reference_pairing": "each generated image vs the reference of its own bench row (one reference per row)",
    "scale": "x1 (cosines in [-1, 1])",
}
CAPTION_LEN = 28


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]: the judges' only preprocessing."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
class AttributeReader(torch.nn.Module):
    """CNN trunk + one linear head per attribute. Input (B, 3, H, W) in [-1, 1]."""

    def __init__(self, image_size: int = 32, width: int = 32):
        super().__init__()
        self.config = {"image_size": image_size, "width": width}
        w = width
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(3, w, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(w, w, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(2 * w, 2 * w, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Flatten(), torch.nn.Linear(4 * w * (image_size // 8) ** 2, 256), torch.nn.GELU())
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(256, len(v)) for k, v in world.ATTRS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}

    def save_pretrained(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(self.config))

    @classmethod
    def from_pretrained(cls, directory: Path) -> "AttributeReader":
        m = cls(**json.loads((directory / "config.json").read_text()))
        m.load_state_dict(load_file(str(directory / "model.safetensors")))
        return m.eval()


def build_dino(image_size: int) -> ViTModel:
    return ViTModel(ViTConfig(image_size=image_size, patch_size=4, num_channels=3, hidden_size=64,
                              num_hidden_layers=3, num_attention_heads=4, intermediate_size=128),
                    add_pooling_layer=False)


def build_clip(image_size: int, tokenizer) -> CLIPModel:
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=CAPTION_LEN, pad_token_id=0, bos_token_id=0,
                eos_token_id=1)
    vision = dict(image_size=image_size, patch_size=4, num_channels=3, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def dino_embed(dino: ViTModel, pixels: torch.Tensor) -> torch.Tensor:
    return dino(pixel_values=pixels).last_hidden_state[:, 0]


def clip_image_embed(clip: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    return clip.get_image_features(pixel_values=pixels).pooler_output


def clip_text_embed(clip: CLIPModel, tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenize(tokenizer, texts)
    return clip.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output


def load_dino(directory: str | Path, device: torch.device):
    """The DINO judge of `models/judges` alone, as a function: uint8 images (N, H, W, 3) -> CLS embeddings
    (for `cdns`' judge_dpo pairs), embedded or pretrained as the directory holds."""
    directory = Path(directory)
    if (directory / pretrained_judges.META).exists():
        dino, processor = pretrained_judges.load_dino(directory / "dino", device)
        return lambda images: pretrained_judges.dino_embed(dino, processor, images)
    if not (directory / "dino").is_dir():
        raise ConfigError(f"{directory / 'dino'}: DINO judge missing; run `dvc repro judges`")
    dino = ViTModel.from_pretrained(directory / "dino").eval().to(device)
    return lambda images: dino_embed(dino, to_pixels(images).to(device))


def caption_tokenizer():
    return build_tokenizer(world.vocabulary(), CAPTION_LEN)


@torch.no_grad()
def read_attributes(reader: AttributeReader, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The reader's label index per attribute for uint8 images (N, H, W, 3)."""
    outs = [reader(to_pixels(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return {k: torch.cat([o[k] for o in outs]).argmax(1).numpy() for k in world.ATTRS}


# ---------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------
class Judges:
    """All three judges, loaded from `models/judges`; `score` gives per-image measures."""
    uses_subject_refs = False     # each image is compared with its own row's reference, as always
    protocol = PROTOCOL

    def __init__(self, dino: ViTModel, clip: CLIPModel, tokenizer, reader: AttributeReader):
        self.dino, self.clip, self.tokenizer, self.reader = dino.eval(), clip.eval(), tokenizer, reader.eval()

    @classmethod
    def load(cls, directory: str | Path):
        """The judges `models/judges` holds: the pretrained ones where the `judges` stage wrote their
        judges.json (real scale), else the embedded ones."""
        directory = Path(directory)
        if (directory / pretrained_judges.META).exists():
            return pretrained_judges.PretrainedJudges.load(directory)
        for sub in ("dino", "clip", "reader"):
            if not (directory / sub).is_dir():
                raise ConfigError(f"{directory / sub}: judge missing; run `dvc repro judges`")
        return cls(ViTModel.from_pretrained(directory / "dino"), CLIPModel.from_pretrained(directory / "clip"),
                   PreTrainedTokenizerFast.from_pretrained(directory / "clip"),
                   AttributeReader.from_pretrained(directory / "reader"))

    def save(self, directory: str | Path):
        directory = Path(directory)
        self.dino.save_pretrained(directory / "dino")
        self.clip.save_pretrained(directory / "clip")
        self.tokenizer.save_pretrained(directory / "clip")
        self.reader.save_pretrained(directory / "reader")

    def read_attributes(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        return read_attributes(self.reader, images, batch_size)

    @torch.no_grad()
    def score(self, generated: np.ndarray, references: np.ndarray, prompts: list[str],
              labels: dict[str, np.ndarray], truth: np.ndarray, masks: np.ndarray,
              batch_size: int = 256, subject_refs=None, subjects=None) -> dict[str, np.ndarray]:
        """Per-image measures of generated images (N, H, W, 3) uint8 against their rows' references,
        prompts, attribute labels, ground-truth renders and subject masks (N, H, W). `subject_refs` and
        `subjects` (the pretrained judges' subject pairing) are ignored: the embedded numbers stay as they were."""
        out = {k: [] for k in ("dino", "clip_i", "clip_t")}
        for i in range(0, len(generated), batch_size):
            g, r = to_pixels(generated[i:i + batch_size]), to_pixels(references[i:i + batch_size])
            out["dino"].append(F.cosine_similarity(dino_embed(self.dino, g), dino_embed(self.dino, r)))
            gi = clip_image_embed(self.clip, g)
            out["clip_i"].append(F.cosine_similarity(gi, clip_image_embed(self.clip, r)))
            out["clip_t"].append(F.cosine_similarity(
                gi, clip_text_embed(self.clip, self.tokenizer, prompts[i:i + batch_size])))
        res = {k: torch.cat(v).numpy() for k, v in out.items()}
        read = self.read_attributes(generated, batch_size)
        res["id_acc"] = np.mean([read[k] == labels[k] for k in world.IDENTITY_ATTRS], axis=0)
        res["ctx_acc"] = np.mean([read[k] == labels[k] for k in world.CONTEXT_ATTRS], axis=0)
        for k in world.ATTRS:
            res[f"acc_{k}"] = (read[k] == labels[k]).astype(np.float64)
        err = ((generated.astype(np.float64) - truth.astype(np.float64)) / 255.0) ** 2
        m = masks[..., None].astype(np.float64)
        res["subject_mse"] = (err * m).sum((1, 2, 3)) / np.maximum(m.sum((1, 2, 3)) * 3, 1)
        return res
