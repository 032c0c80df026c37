"""The real-scale judges (METHOD.md section 6, `judges.source: pretrained`): DreamBench's DINO, CLIP-I and CLIP-T.

- dino: cosine of DINO ViT-S/16 (`facebook/dino-vits16`) embeddings, the CLS token of the last hidden state
  (`last_hidden_state[:, 0]`, after the final layer norm; not the pooler), generated image vs reference photo.
- clip_i: cosine of CLIP image embeddings (`get_image_features(...).pooler_output`, the projected embedding).
- clip_t: cosine of the generated image's CLIP image embedding and its prompt's `get_text_features(...)
  .pooler_output` (the CLIP tokenizer, truncated at the text model's 77 positions).

Images go through each model's own image processor, loaded from the same folder with the PIL backend (resize,
centre crop, rescale and normalisation as published; the torchvision backend resizes slightly differently).
With `reference_pairing: all` an image's dino and clip_i are the mean of its cosines against every reference
photo of its subject, with `first` against the first one. The embedded world's label measures (id_acc,
ctx_acc, acc_*, subject_mse) do not exist here: `score` does not return them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel
from transformers.image_utils import PILImageResampling

from . import hub, stage
from .config import ConfigError

META = "judges.json"   # in models/judges: its presence marks the pretrained judges (Judges.load)
MEASURES = ("dino", "clip_i", "clip_t")
PAIRING = {"all": "mean of the cosines against every reference photo of the image's subject",
           "first": "cosine against the first reference photo of the image's subject"}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pixels(processor, images, dev: torch.device) -> torch.Tensor:
    """uint8 images (N, H, W, 3) (an array or a list) -> the processor's pixel_values on `dev`."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"].to(dev)


def dino_embed(dino: ViTModel, processor, images) -> torch.Tensor:
    return dino(pixel_values=pixels(processor, images, dino.device)).last_hidden_state[:, 0]


def clip_image_embed(clip: CLIPModel, processor, images) -> torch.Tensor:
    return clip.get_image_features(pixel_values=pixels(processor, images, clip.device)).pooler_output


def clip_text_embed(clip: CLIPModel, tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                    max_length=clip.config.text_config.max_position_embeddings).to(clip.device)
    return clip.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output


def load_dino(path: str | Path, dev: torch.device | None = None) -> tuple[ViTModel, object]:
    return (ViTModel.from_pretrained(path, add_pooling_layer=False).eval().to(dev or device()),
            AutoImageProcessor.from_pretrained(path, backend="pil"))


def describe(processor) -> dict:
    """What a processor does to an image, read back from it (so the record is what ran, not what we assumed)."""
    def size(s):
        return {k: v for k, v in dict(s).items() if v is not None}
    p = processor
    out = {"processor": type(p).__name__, "resize": size(p.size) if p.do_resize else None,
           "resample": PILImageResampling(p.resample).name if p.do_resize else None,
           "center_crop": size(p.crop_size) if getattr(p, "do_center_crop", False) else None,
           "rescale": p.rescale_factor if p.do_rescale else None,
           "mean": list(p.image_mean) if p.do_normalize else None, "std": list(p.image_std) if p.do_normalize else None}
    return out


class PretrainedJudges:
    """DINO and CLIP with their processors and tokenizer; `score` gives per-image dino, clip_i, clip_t."""
    uses_subject_refs = True      # evaluation hands `score` every reference photo of each subject
    measures = MEASURES

    def __init__(self, dino, dino_processor, clip, clip_processor, tokenizer, pairing: str, sources: dict):
        if pairing not in PAIRING:
            raise ConfigError(f"judges.reference_pairing={pairing!r}: expected one of {sorted(PAIRING)}")
        self.dino, self.dino_processor = dino.eval(), dino_processor
        self.clip, self.clip_processor, self.tokenizer = clip.eval(), clip_processor, tokenizer
        self.pairing, self.sources = pairing, sources

    @classmethod
    def fetch(cls, dino: str, clip: str, pairing: str, dev: torch.device | None = None) -> "PretrainedJudges":
        """From hub ids or local folders (params `judges.dino`, `judges.clip`): both are checked before either
        loads, so a missing or unreachable model stops within seconds. On CUDA where it exists, unless `dev`."""
        hub.check(dino, "judges.dino")
        hub.check(clip, "judges.clip")
        return cls._from(dino, clip, pairing, {"dino": dino, "clip": clip}, dev)

    @classmethod
    def load(cls, directory: str | Path, dev: torch.device | None = None) -> "PretrainedJudges":
        """From `models/judges` as the `judges` stage saved it."""
        directory = Path(directory)
        meta = json.loads((directory / META).read_text())
        return cls._from(directory / "dino", directory / "clip", meta["reference_pairing"], meta["models"], dev)

    @classmethod
    def _from(cls, dino_path, clip_path, pairing: str, sources: dict, dev=None) -> "PretrainedJudges":
        dev = dev or device()
        dino, dino_processor = load_dino(dino_path, dev)
        return cls(dino, dino_processor, CLIPModel.from_pretrained(clip_path).eval().to(dev),
                   AutoImageProcessor.from_pretrained(clip_path, backend="pil"),
                   AutoTokenizer.from_pretrained(clip_path), pairing, sources)

    def save(self, directory: str | Path):
        directory = Path(directory)
        for sub, parts in (("dino", (self.dino, self.dino_processor)),
                           ("clip", (self.clip, self.clip_processor, self.tokenizer))):
            for part in parts:
                part.save_pretrained(directory / sub)
        stage.write_json(directory / META, self.protocol)

    @property
    def protocol(self) -> dict:
        """The evaluation protocol these judges implement: written to models/judges/judges.json,
        reports/judges.json and every evaluation's metrics.json."""
        n_text = self.clip.config.text_config.max_position_embeddings
        return {
            "source": "pretrained", "models": self.sources,
            "dino": "cosine of DINO embeddings, generated image vs its subject's reference photos (reference_pairing)",
            "clip_i": "cosine of CLIP image embeddings, generated image vs its subject's reference photos "
                      "(reference_pairing)",
            "clip_t": "cosine of the generated image's CLIP image embedding and its prompt's CLIP text embedding",
            "embeddings": {
                "dino": "ViTModel last_hidden_state[:, 0] (CLS token after the final layer norm; not the pooler)",
                "clip_image": "CLIPModel.get_image_features(pixel_values).pooler_output (projected)",
                "clip_text": f"CLIPModel.get_text_features(input_ids).pooler_output (projected); the model's "
                             f"tokenizer, prompt as written, truncated at {n_text} tokens"},
            "preprocessing": {"dino": describe(self.dino_processor), "clip": describe(self.clip_processor),
                              "input": "uint8 RGB (N, H, W, 3); the prepare stage has cut every photo to a "
                                       "square (DreamBench: the centre; Subjects200K: each half of the pair, "
                                       "padding removed) and resized it to prepare.image_size (bicubic)"},
            "reference_pairing": self.pairing, "pairing_rule": PAIRING[self.pairing],
            "scale": "x1 (cosines in [-1, 1])",
            "absent": "id_acc, ctx_acc, acc_*, subject_mse: they need the embedded world's labels and renders",
        }

    @torch.no_grad()
    def embed_images(self, images, batch_size: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm (DINO, CLIP image) embeddings of uint8 images, in batches."""
        d, c = [], []
        for i in stage.progress(range(0, len(images), batch_size), desc=desc):
            batch = images[i:i + batch_size]
            d.append(F.normalize(dino_embed(self.dino, self.dino_processor, batch).float(), dim=-1).cpu())
            c.append(F.normalize(clip_image_embed(self.clip, self.clip_processor, batch).float(), dim=-1).cpu())
        return torch.cat(d), torch.cat(c)

    @torch.no_grad()
    def score(self, generated: np.ndarray, references: np.ndarray, prompts: list[str], labels=None, truth=None,
              masks=None, batch_size: int = 64, subject_refs: dict | None = None, subjects=None
              ) -> dict[str, np.ndarray]:
        """Per-image dino, clip_i, clip_t of generated images (N, H, W, 3) uint8. Image i is compared with the
        reference photos `subject_refs[subjects[i]]` (all of them or the first, by the pairing); without
        `subject_refs`, with `references[i]`, its bench row's own reference. `labels`, `truth` and `masks` are
        the embedded world's and unused here (same call as `judges.Judges.score`)."""
        if subject_refs is None:
            groups, photos = np.arange(len(generated)), [references[i:i + 1] for i in range(len(generated))]
        else:
            keys = list(subject_refs)
            where = {k: j for j, k in enumerate(keys)}
            groups, photos = np.array([where[s] for s in subjects]), [subject_refs[k] for k in keys]
        if self.pairing == "first":
            photos = [p[:1] for p in photos]
        ref_d, ref_c = self.embed_images(np.concatenate(photos), batch_size, "judges: references")
        # the mean of cosines against unit vectors r_k is the dot product with their (unnormalised) mean
        sizes = [len(p) for p in photos]
        cent_d = torch.stack([r.mean(0) for r in ref_d.split(sizes)])
        cent_c = torch.stack([r.mean(0) for r in ref_c.split(sizes)])
        gen_d, gen_c = self.embed_images(generated, batch_size, "judges: generated")
        text = torch.cat([F.normalize(clip_text_embed(self.clip, self.tokenizer, prompts[i:i + batch_size]).float(),
                                      dim=-1).cpu() for i in range(0, len(prompts), batch_size)])
        g = torch.from_numpy(groups)
        return {"dino": (gen_d * cent_d[g]).sum(-1).numpy(), "clip_i": (gen_c * cent_c[g]).sum(-1).numpy(),
                "clip_t": (gen_c * text).sum(-1).numpy()}
