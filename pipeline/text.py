"""Prompt encoding: a word-level tokenizer over the world's vocabulary and two small frozen text encoders.

They stand in for FLUX's text encoders (METHOD.md section 7): a T5 encoder gives the token sequence
(`encoder_hidden_states`), a CLIP text model gives the pooled vector (`pooled_projections`). Both are
`transformers` models built from configs with seeded random weights and never trained: the transformer
learns to read them, as FLUX learns to read frozen T5/CLIP. Embeddings are cached per prompt string, so each
distinct prompt is encoded once per process.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

SPECIAL_TOKENS = ("[PAD]", "[EOS]", "[UNK]")   # ids 0, 1, 2. CLIP reads its pooled vector at [EOS].


def build_tokenizer(words: list[str], max_length: int) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]", model_max_length=max_length)


def tokenize(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt")


class TextEncoder(torch.nn.Module):
    """Frozen (T5 sequence, CLIP pooled) prompt encoder with a per-prompt cache."""

    def __init__(self, tokenizer, t5: T5EncoderModel, clip: CLIPTextModel):
        super().__init__()
        self.tokenizer, self.t5, self.clip = tokenizer, t5.eval(), clip.eval()
        self.requires_grad_(False)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def build(cls, words: list[str], max_length: int, seq_dim: int, pooled_dim: int, seed: int) -> "TextEncoder":
        tokenizer = build_tokenizer(words, max_length)
        torch.manual_seed(seed)
        t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=seq_dim, d_kv=seq_dim // 4,
                                     d_ff=2 * seq_dim, num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=pooled_dim,
                                            intermediate_size=2 * pooled_dim, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=max_length,
                                            pad_token_id=0, bos_token_id=0, eos_token_id=1))
        return cls(tokenizer, t5, clip)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence (B, L, seq_dim), pooled (B, pooled_dim)) for a list of prompts."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            dev = next(self.t5.parameters()).device         # the encoders move with the model (to a GPU)
            ids = {k: v.to(dev) for k, v in tokenize(self.tokenizer, missing).items()}
            seq = self.t5(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
            pooled = self.clip(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output
            for i, p in enumerate(missing):
                self._cache[p] = (seq[i], pooled[i])
        seq, pooled = zip(*(self._cache[p] for p in prompts))
        return torch.stack(seq), torch.stack(pooled)

    def save_pretrained(self, directory: str | Path):
        directory = Path(directory)   # FLUX pipeline layout: tokenizer/, text_encoder/ (CLIP), text_encoder_2/ (T5)
        self.tokenizer.save_pretrained(directory / "tokenizer")
        self.clip.save_pretrained(directory / "text_encoder")
        self.t5.save_pretrained(directory / "text_encoder_2")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "TextEncoder":
        directory = Path(directory)
        return cls(PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer"),
                   T5EncoderModel.from_pretrained(directory / "text_encoder_2"),
                   CLIPTextModel.from_pretrained(directory / "text_encoder"))
