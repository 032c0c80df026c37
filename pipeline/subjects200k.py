"""Subjects200K (the OminiControl training set, hub dataset `Yuanshi/Subjects200K`) as real-scale training triplets.

Read in its published Parquet schema, streamed one record batch at a time (about 200k pair images as PNG bytes
do not fit in memory):

    image               struct{bytes, path}: one side-by-side pair, two S x S crops with padding p around and
                        between them: 1056 x 528 for S = 512, p = 8 (`prepare.padding`)
    collection          string, e.g. "collection_2" (`prepare.collection`, "" = all)
    quality_assessment  struct{compositeStructure, objectConsistency, imageQuality}: GPT-4o scores, null = unrated
    description         struct{item, description_0, description_1, category}: the subject's name and a
                        description of each half's scene

The left crop (the subject in scene 0) is the reference and the right crop the target, prompted with
description_1. OminiControl trains both directions; one direction keeps one row per pair, so every subject
appears once. There is no subject mask (the mask is the whole image) and no world attribute (all -1). The
generic prompt is CDNS's "a photo of {item}" (METHOD.md section 3).

`source` (`prepare.subjects200k`) is a local Parquet file, a local folder of them (searched recursively, read
in sorted order), or a hub id, checked with `hub.check` before its Parquet files are downloaded.
"""
from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from . import config, hub, manifest, stage
from .config import ConfigError

KEY = "prepare.subjects200k"
QUALITY = ("compositeStructure", "objectConsistency", "imageQuality")
REQUIRED = {"image": ("bytes",), "collection": (), "quality_assessment": QUALITY,
            "description": ("item", "description_1")}
UNKNOWN = manifest.UNKNOWN   # the embedded world's attribute columns, which a real photo does not have
ATTR_COLUMNS = [f.name for f in manifest.TRIPLET_SCHEMA
                if f.name not in ("id", "subject_id", "prompt", "generic_prompt", "ref_png", "target_png",
                                  "mask_png")]


def parquet_files(source: str) -> list[Path]:
    """The Parquet files of `source`: a file, a folder (recursively, sorted) or a hub dataset (downloaded)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        hub.check(source, KEY, "dataset")
        from huggingface_hub import snapshot_download
        try:
            path = Path(snapshot_download(source, repo_type="dataset", allow_patterns=["*.parquet"]))
        except Exception as e:
            raise ConfigError(f"params.yaml: {KEY}={source!r}: downloading its Parquet files failed "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise ConfigError(f"{path}: no *.parquet files in this folder ({KEY})")
    return files


def check_columns(f: Path, pf: pq.ParquetFile):
    schema = pf.schema_arrow
    missing = []
    for col, fields in REQUIRED.items():
        if col not in schema.names:
            missing.append(col)
            continue
        typ = schema.field(col).type
        names = [typ.field(i).name for i in range(typ.num_fields)]   # 0 fields unless a struct
        missing += [f"{col}.{k}" for k in fields if k not in names]
    if missing:
        raise ConfigError(f"{f}: missing Subjects200K column(s) {missing} (expected the published schema: "
                          f"image{{bytes}}, collection, quality_assessment{{{', '.join(QUALITY)}}}, "
                          f"description{{item, description_1}})")


def crop_boxes(width: int, height: int, padding: int, where: str) -> tuple[tuple, tuple]:
    """PIL boxes (left, upper, right, lower) of the two S x S halves, S = height - 2 * padding."""
    s, p = height - 2 * padding, padding
    if s < 1 or width != 2 * s + 4 * p:
        raise ConfigError(f"{where}: a {width}x{height} pair image is not two square crops with padding {p} "
                          f"(expected width 2S+4p = {2 * s + 4 * p} for S = height-2p = {s}); check prepare.padding")
    return (p, p, p + s, p + s), (s + 3 * p, p, 2 * s + 3 * p, p + s)


def _crop(im: Image.Image, box: tuple, size: int) -> bytes:
    crop = im.crop(box)
    if crop.size != (size, size):
        crop = crop.resize((size, size), Image.BICUBIC)
    return manifest.encode_png(np.asarray(crop))


def triplet(index: int, image: dict | None, description: dict, size: int, padding: int, where: str,
            mask_png: bytes) -> dict:
    """One triplet row (subject_id is set when the row's split is known)."""
    try:
        with Image.open(io.BytesIO(image["bytes"])) as im:
            im = im.convert("RGB")
    except Exception as e:   # None, truncated or not an image: PIL and indexing raise several types
        raise ConfigError(f"{where}: the pair image cannot be decoded ({type(e).__name__}: {e})") from None
    left, right = crop_boxes(*im.size, padding, where)
    return {"id": f"s200k-{index:07d}", "subject_id": -1, **{k: UNKNOWN for k in ATTR_COLUMNS},
            "prompt": description["description_1"], "generic_prompt": f"a photo of {description['item']}",
            "ref_png": _crop(im, left, size), "target_png": _crop(im, right, size), "mask_png": mask_png}


def _scan(opened: list, p: config.Prepare, n: dict, bar) -> Iterator[tuple[str, int, dict, dict]]:
    """(where, global row index, image, description) of each row that passes the filters; counts go to `n`."""
    index = -1
    for f, pf in opened:
        for batch in pf.iter_batches(batch_size=64, columns=list(REQUIRED)):
            bar.update(batch.num_rows)
            cols = {c: batch.column(c).to_pylist() for c in ("collection", "quality_assessment", "description")}
            for j in range(batch.num_rows):
                index += 1
                n["scanned"] += 1
                if p.collection and cols["collection"][j] != p.collection:
                    continue
                n["collection"] += 1
                q = cols["quality_assessment"][j]
                if not q or any(q.get(k) is None or q[k] < p.min_quality for k in QUALITY):
                    continue
                n["quality"] += 1
                d = cols["description"][j]
                if not d or not (d.get("item") or "").strip() or not (d.get("description_1") or "").strip():
                    continue
                n["kept"] += 1
                yield f"{f}: row {index}", index, batch.column("image")[j].as_py(), d


def passing_rows(p: config.Prepare) -> Iterator[dict]:
    """Triplet rows of the pairs that pass the filters, in dataset order; the scan stops after
    subset + val_subset of them (subset 0: it reads everything)."""
    files = parquet_files(p.subjects200k)
    opened = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise ConfigError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        check_columns(f, pf)
        opened.append((f, pf))
    total = sum(pf.metadata.num_rows for _, pf in opened)
    mask_png = manifest.full_mask(p.image_size)
    n = {"scanned": 0, "collection": 0, "quality": 0, "kept": 0}
    with stage.progress(total=total, desc="prepare: subjects200k", unit="pair") as bar:
        for where, index, image, d in islice(_scan(opened, p, n, bar), p.subset + p.val_subset if p.subset else None):
            yield triplet(index, image, d, p.image_size, p.padding, where, mask_png)
    stage.log.info("subjects200k: scanned %d of %d rows in %d file(s): %d in collection %r, %d of those with every "
                   "quality score >= %d, %d of those with a description (kept)", n["scanned"], total, len(files),
                   n["collection"], p.collection or "(all)", n["quality"], p.min_quality, n["kept"])
    if not n["kept"]:
        raise ConfigError(f"{p.subjects200k}: no row passes the filters (prepare.collection={p.collection!r}, "
                          f"prepare.min_quality={p.min_quality}; {n['collection']} rows in the collection, "
                          f"{n['quality']} of those with the quality)")


def triplets(p: config.Prepare) -> Iterator[tuple[str, dict]]:
    """("train" | "val", row): the first passing pairs go to train, the last `val_subset` read to val (with
    `subset` > 0, the `val_subset` after the first `subset`; with 0, the last of the dataset). subject_id counts
    from 0 in each split, like the embedded world's."""
    held, count = deque(), {"train": 0, "val": 0}

    def out(split, row):
        row["subject_id"], count[split] = count[split], count[split] + 1
        return split, row

    for row in passing_rows(p):
        held.append(row)
        if len(held) > p.val_subset:
            yield out("train", held.popleft())
    if not count["train"]:
        raise ConfigError(f"{p.subjects200k}: only {len(held)} row(s) pass the filters, all held out by "
                          f"prepare.val_subset={p.val_subset}; none is left for training")
    for row in held:
        yield out("val", row)
