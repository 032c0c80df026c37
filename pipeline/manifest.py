"""Parquet manifests: the only way stages hand data to each other.

Images travel as PNG bytes inside Parquet shards (one file per `shard_rows` rows): DVC and file systems are
slow with many small files. Every shard is written to a temporary name and renamed, so a reader never sees
a half-written file. Schemas are in docs/architecture.md; `read` checks them and names the bad row or file.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from .config import ConfigError
from .world import ATTRS

# The triplet manifest (data/train, data/bench, data/val): one row per (subject, context).
TRIPLET_SCHEMA = pa.schema(
    [("id", pa.string()), ("subject_id", pa.int64())]
    + [(k, pa.int64()) for k in ("cls", "body_color", "pattern", "pattern_color", "pattern_scale",
                                 "pattern_angle", "mark_corner", "mark_color", "background", "position", "size")]
    + [("prompt", pa.string()), ("generic_prompt", pa.string()),
       ("ref_png", pa.binary()), ("target_png", pa.binary()), ("mask_png", pa.binary())])

# The negative manifest (data/negatives/manifest.parquet): one row per triplet that got a negative.
# `pos_png` is null unless the pair's positive is not the triplet's target (sfo.pairs: judge_dpo).
NEGATIVE_SCHEMA = pa.schema([
    ("id", pa.string()), ("neg_png", pa.binary()), ("cond_png", pa.binary()), ("neg_prompt", pa.string()),
    ("image_degradation", pa.string()), ("text_degradation", pa.string()), ("blur_radius", pa.float64()),
    ("noise_std", pa.float64()), ("seed", pa.int64()), ("pairs", pa.string()), ("pos_png", pa.binary())])

# Evaluation samples (data/eval/<model>/): one row per generated bench image; id = "<row_id>/<k>".
SAMPLE_SCHEMA = pa.schema([("id", pa.string()), ("row_id", pa.string()), ("k", pa.int64()), ("seed", pa.int64()),
                           ("png", pa.binary())])

assert set(ATTRS) <= set(TRIPLET_SCHEMA.names)
UNKNOWN = -1   # an attribute column's value in real-scale rows (Subjects200K, DreamBench): the world's labels only


# ---------------------------------------------------------------------------------------------------------
# PNG helpers
# ---------------------------------------------------------------------------------------------------------
def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def full_mask(size: int) -> bytes:
    """The mask PNG of an image with no known subject mask (real-scale data): all of it."""
    return encode_png(np.full((size, size), 255, np.uint8))


def decode_png(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L", "1") else im).copy()
    except Exception as e:  # PIL raises several types for bad bytes
        raise ConfigError(f"{where}: image bytes cannot be decoded as PNG ({type(e).__name__}: {e})") from None


def decode_column(table: pa.Table, column: str, source: str) -> np.ndarray:
    """Decode a PNG column into one uint8 array (N, H, W, 3) (masks: (N, H, W) bool); errors name the row."""
    ids = table.column("id").to_pylist()
    imgs = [decode_png(b, f"{source}: row id={i!r} column {column!r}")
            for i, b in zip(ids, table.column(column).to_pylist())]
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise ConfigError(f"{source}: column {column!r} mixes image shapes {sorted(shapes)}")
    arr = np.stack(imgs) if imgs else np.zeros((0,), np.uint8)
    return arr.astype(bool) if column == "mask_png" else arr


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def write_table_atomic(table: pa.Table, path: str | Path):
    """Write one Parquet file under a temporary name, then rename it (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


class ShardWriter:
    """Rows to `directory/shard-00000.parquet`, `shard-00001.parquet`, ...: a shard is written as soon as it
    holds `shard_rows` rows, so a stream (a real-scale source) is never held in memory whole. `close` writes
    the rest, and one empty shard for no rows, so a reader always finds the directory."""

    def __init__(self, directory: str | Path, schema: pa.Schema, shard_rows: int):
        self.directory, self.schema, self.shard_rows = Path(directory), schema, shard_rows
        self.buffer: list[dict] = []
        self.paths: list[Path] = []
        self.rows = 0

    def add(self, row: dict):
        self.buffer.append(row)
        self.rows += 1
        if len(self.buffer) == self.shard_rows:
            self._flush()

    def _flush(self):
        path = self.directory / f"shard-{len(self.paths):05d}.parquet"
        write_table_atomic(pa.Table.from_pylist(self.buffer, schema=self.schema), path)
        self.paths.append(path)
        self.buffer = []

    def close(self) -> list[Path]:
        if self.buffer or not self.paths:
            self._flush()
        return self.paths


def write_shards(rows: Iterable[dict], directory: str | Path, schema: pa.Schema, shard_rows: int) -> list[Path]:
    """All of `rows` as shards of `shard_rows` rows (`ShardWriter`); returns the shard paths."""
    writer = ShardWriter(directory, schema, shard_rows)
    for row in rows:
        writer.add(row)
    return writer.close()


# ---------------------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------------------
def read(path: str | Path, schema: pa.Schema = TRIPLET_SCHEMA) -> pa.Table:
    """Read a manifest (a Parquet file or a directory of shards) and check it against `schema`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found (has the stage that writes it run? try `dvc repro`)")
    files = sorted(path.glob("shard-*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"{path}: no shard-*.parquet files in this directory")
    tables = []
    for f in files:
        try:
            t = pq.read_table(f)
        except Exception as e:
            raise ConfigError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        check_schema(t, schema, str(f))
        tables.append(t.select(schema.names).cast(schema))
    table = pa.concat_tables(tables)
    check_rows(table, str(path))
    return table


def check_schema(table: pa.Table, schema: pa.Schema, source: str):
    for fld in schema:
        if fld.name not in table.column_names:
            raise ConfigError(f"{source}: missing required column {fld.name!r} (schema: {schema.names})")
        got = table.schema.field(fld.name).type
        if got != fld.type and not (pa.types.is_integer(got) and pa.types.is_integer(fld.type)) \
                and not (pa.types.is_large_binary(got) and pa.types.is_binary(fld.type)) \
                and not (pa.types.is_large_string(got) and pa.types.is_string(fld.type)):
            raise ConfigError(f"{source}: column {fld.name!r} has type {got}, expected {fld.type}")


def check_rows(table: pa.Table, source: str):
    ids = table.column("id").to_pylist()
    if None in ids:
        raise ConfigError(f"{source}: a row has no id")
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise ConfigError(f"{source}: duplicate id {dup!r}")
    for col in ("prompt", "generic_prompt"):
        if col in table.column_names:
            for i, p in zip(ids, table.column(col).to_pylist()):
                if p is None or not p.strip():
                    raise ConfigError(f"{source}: row id={i!r} has an empty {col!r}")
    for k, values in ATTRS.items():
        if k in table.column_names:
            col = np.asarray(table.column(k).to_numpy(zero_copy_only=False))
            bad = np.flatnonzero((col < UNKNOWN) | (col >= len(values)))
            if bad.size:
                raise ConfigError(f"{source}: row id={ids[bad[0]]!r} has {k}={col[bad[0]]}, "
                                  f"outside 0..{len(values) - 1} (or {UNKNOWN}: unknown, real-scale data)")


def triplets_of(negatives: pa.Table, triplets: pa.Table, negatives_source: str, triplets_source: str) -> pa.Table:
    """The triplet of each negatives row, row-aligned with `negatives` (joined on `id`)."""
    idx = pc.index_in(negatives.column("id"), value_set=triplets.column("id"))
    if idx.null_count:
        missing = negatives.column("id").filter(pc.is_null(idx))[0].as_py()
        raise ConfigError(f"{negatives_source}: row id={missing!r} has no triplet in {triplets_source}")
    return triplets.take(idx)


def positives(negatives: pa.Table, triplets: pa.Table, negatives_source: str, triplets_source: str) -> np.ndarray:
    """x+ of each negatives row, uint8 (N, H, W, 3): the row's `pos_png` where it has one (judge DPO: the judge's
    preferred sample), else its triplet's target. `triplets` is row-aligned with `negatives` (`triplets_of`)."""
    pos = decode_column(triplets, "target_png", triplets_source)
    judged = negatives.column("pos_png").is_valid().to_numpy(zero_copy_only=False)
    if judged.any():
        pos[judged] = decode_column(negatives.filter(pa.array(judged)), "pos_png", negatives_source)
    return pos


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], the models' pixel space."""
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] (numpy or torch) -> uint8 (N, H, W, 3)."""
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return np.clip((x.transpose(0, 2, 3, 1) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
