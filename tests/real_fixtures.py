"""Real-scale fixtures drawn here, shared by the tests (`from real_fixtures import ...`; tests/ is on sys.path):

- a Subjects200K Parquet file in the published schema (`write_subjects200k`), solid-colour pairs whose crops are
  known pixel for pixel;
- tiny random DINO and CLIP checkpoints built with real `transformers` classes and saved like the hub's
  facebook/dino-vits16 and openai/clip-vit-base-patch32 (`write_tiny_judges`), usable as `judges.dino` /
  `judges.clip` with `judges.source: pretrained` (nothing can be downloaded).

`transformers` and `tokenizers` are imported only by the judges builders, so a test that needs the Parquet file
alone does not pay for them."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline import subjects200k
from pipeline.manifest import encode_png

# ---------------------------------------------------------------------------------------------------------------
# Subjects200K

S, P = 64, 8                          # crop side and padding: a 160 x 80 pair image (the real one: 512, 8)
W, H = 2 * S + 4 * P, S + 2 * P
PAD = (255, 255, 255)
QUALITY = subjects200k.QUALITY
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
DESCRIPTION = pa.struct([("item", pa.string()), ("description_0", pa.string()), ("description_1", pa.string()),
                         ("category", pa.string())])
SCHEMA = pa.schema([("image", IMAGE), ("collection", pa.string()),
                    ("quality_assessment", pa.struct([(k, pa.int64()) for k in QUALITY])),
                    ("description", DESCRIPTION)])


def passes(i: int) -> bool:
    """Whether pair i passes the default filters (collection_2, every quality score >= 5): every i % 4 == 3 is in
    collection_1, pair 5 is unrated, pair 6 has imageQuality 4."""
    return i % 4 != 3 and i not in (5, 6)


def passing(n: int) -> list[int]:
    """The indices among the first n pairs that pass the default filters, in file order."""
    return [i for i in range(n) if passes(i)]


def colours(i: int) -> tuple[tuple, tuple]:
    """Distinct solid colours of pair i's left and right crops (never the padding's white). The same for every
    i < 13 as the original 12-pair fixture; distinct for any i < 64 * 256."""
    v, k = (10 + 20 * i) % 256, (i // 64) % 256
    return (v, k, (250 - 20 * i) % 256), (0, v, (128 + k) % 256)


def pair_png(i: int, width: int | None = None, side: int = S, padding: int = P) -> bytes:
    """Pair i's image: two solid side x side crops, `padding` white pixels around each (width: the default
    2 * side + 4 * padding, or a wrong one)."""
    width = 2 * side + 4 * padding if width is None else width
    im = Image.new("RGB", (width, side + 2 * padding), PAD)
    draw = ImageDraw.Draw(im)
    left, right = colours(i)
    s, p = side, padding
    draw.rectangle((p, p, p + s - 1, p + s - 1), fill=left)            # PIL rectangles include their corner
    draw.rectangle((s + 3 * p, p, 2 * s + 3 * p - 1, p + s - 1), fill=right)
    return encode_png(np.asarray(im))


def pair_row(i: int, width: int | None = None, side: int = S, padding: int = P) -> dict:
    quality = None if i == 5 else {"compositeStructure": 5, "objectConsistency": 5,
                                   "imageQuality": 4 if i == 6 else 5}
    return {"image": {"bytes": pair_png(i, width, side, padding), "path": None},
            "collection": "collection_1" if i % 4 == 3 else "collection_2", "quality_assessment": quality,
            "description": {"item": f"item {i}", "description_0": f"item {i} in scene zero",
                            "description_1": f"item {i} in scene one", "category": "Toys"}}


def write_pairs(path: Path, indices, schema: pa.Schema = SCHEMA, **kw) -> Path:
    """A Parquet file of the pairs `indices` (kw: pair_row's width, side, padding), in row groups of 5."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [pair_row(i, **kw) for i in indices]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=5)   # several row groups
    return path


def write_subjects200k(path: Path, n: int = 12, side: int = 64, padding: int = 8) -> Path:
    """A Subjects200K Parquet file in the published schema at `path`: n pairs (side x side crops with `padding`;
    read them with prepare.padding = padding), of which `passing(n)` pass the default filters (7 of the default
    12; about 3 in 4 for larger n). Returns path."""
    return write_pairs(path, range(n), side=side, padding=padding)


# ---------------------------------------------------------------------------------------------------------------
# Tiny DINO and CLIP judges

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
WORDS = "a photo of dog cat toy on the beach in snow red blue".split()


def tiny_tokenizer():
    """A word-level CLIP-like tokenizer: <|startoftext|> prompt <|endoftext|>, padded with <|endoftext|>."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "[UNK]", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                            special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="[UNK]", model_max_length=16)


def build_tiny_judges(directory: Path) -> dict:
    """Folders `directory`/dino and `directory`/clip laid out like facebook/dino-vits16 and
    openai/clip-vit-base-patch32, with tiny random weights (torch seed 0). Returns their paths ("dino", "clip")
    and the models and tokenizer as built ("dino_model", "clip_model" in eval mode, "tokenizer")."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel
    root = Path(directory)
    torch.manual_seed(0)
    dino = ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2), add_pooling_layer=False)
    dino.save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD).save_pretrained(root / "dino")
    tokenizer = tiny_tokenizer()
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2), projection_dim=16))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    return {"dino": root / "dino", "clip": root / "clip", "dino_model": dino.eval(), "clip_model": clip.eval(),
            "tokenizer": tokenizer}


def write_tiny_judges(directory: Path) -> tuple[Path, Path]:
    """Tiny random DINO and CLIP checkpoints saved under `directory` (see build_tiny_judges). Returns
    (dino_dir, clip_dir), to be given as judges.dino and judges.clip with judges.source: pretrained."""
    built = build_tiny_judges(directory)
    return built["dino"], built["clip"]
