"""Stage `prepare`: render the training triplets and the bench as Parquet manifests.

Reads params `world`, `prepare`, `bench`. Writes `data/train/`, `data/bench/` and `data/val/` (shards of
manifest.TRIPLET_SCHEMA). Bench subjects come from `bench.seed` and are drawn first, validation subjects (used
only to choose the guidance scale) from `bench.val_seed`, excluding the bench's; training subjects are drawn
from `world.seed` excluding both, so the three sets are disjoint.
"""
from __future__ import annotations

import numpy as np

from .. import config, manifest, stage, world

TRAIN_DIR, BENCH_DIR, VAL_DIR = "data/train", "data/bench", "data/val"


def triplet_row(row_id: str, subject_id: int, subject: world.Subject, ctx: world.Context, size: int,
                jitter: tuple[float, float], reference_size: str = "target") -> dict:
    ref, _ = world.render(subject, ctx, size, reference=True, reference_size=reference_size)
    target, mask = world.render(subject, ctx, size, jitter)
    return {"id": row_id, "subject_id": subject_id, **world.attribute_labels(subject, ctx),
            "pattern_scale": subject.pattern_scale, "pattern_angle": subject.pattern_angle,
            "prompt": world.prompt(subject, ctx), "generic_prompt": world.generic_prompt(subject),
            "ref_png": manifest.encode_png(ref), "target_png": manifest.encode_png(target),
            "mask_png": manifest.encode_png(mask.astype(np.uint8) * 255)}


def bench_rows(w: config.World, b: config.Bench, split: str = "bench", exclude: set = frozenset()
               ) -> tuple[list[dict], set]:
    """`prompts_per_subject` distinct contexts per subject, rendered without jitter (the ground truth)."""
    seed, n = (b.seed, b.subjects) if split == "bench" else (b.val_seed, b.val_subjects)
    rng = np.random.default_rng(seed)
    subjects = world.sample_subjects(rng, n, exclude=exclude)
    contexts = world.all_contexts()
    if b.prompts_per_subject > len(contexts):
        raise config.ConfigError(f"params.yaml: bench.prompts_per_subject must be <= {len(contexts)}")
    rows = []
    for i, s in enumerate(subjects):
        for k in rng.choice(len(contexts), b.prompts_per_subject, replace=False):
            rows.append(triplet_row(f"{split}-{i:05d}-{k:03d}", i, s, contexts[k], w.image_size, (0.0, 0.0),
                                    w.reference_size))
    return rows, {s.key for s in subjects}


def train_rows(w: config.World, p: config.Prepare, exclude: set) -> list[dict]:
    rng = np.random.default_rng(w.seed)
    subjects = world.sample_subjects(rng, p.train_subjects, exclude=exclude)
    rows = []
    for i, s in enumerate(stage.progress(subjects, desc="prepare: train")):
        for k in range(p.targets_per_subject):
            ctx = world.sample_context(rng)
            jitter = tuple(rng.uniform(-w.jitter, w.jitter, 2))
            rows.append(triplet_row(f"train-{i:06d}-{k:02d}", i, s, ctx, w.image_size, jitter, w.reference_size))
    return rows


def main():
    w, p, b = config.load("world", "prepare", "bench")
    bench, bench_keys = bench_rows(w, b)
    val, val_keys = bench_rows(w, b, "val", exclude=bench_keys)
    train = train_rows(w, p, bench_keys | val_keys)
    for rows, path in ((train, TRAIN_DIR), (bench, BENCH_DIR), (val, VAL_DIR)):
        manifest.write_shards(rows, path, manifest.TRIPLET_SCHEMA, p.shard_rows)
    stage.log.info("prepare: %d train triplets (%d subjects), %d bench rows (%d subjects), %d validation rows "
                   "(%d subjects)", len(train), p.train_subjects, len(bench), b.subjects, len(val), b.val_subjects)
    return [TRAIN_DIR, BENCH_DIR, VAL_DIR]


if __name__ == "__main__":
    stage.run("prepare", main)
