"""Stage `prepare`: render the training triplets and the bench as Parquet manifests.

Reads params `world`, `prepare`, `bench`. Writes `data/train/` and `data/bench/` (shards of
manifest.TRIPLET_SCHEMA). Bench subjects come from `bench.seed` and are drawn first; training subjects are
drawn from `world.seed` excluding every bench identity, so the two sets are disjoint.
"""
from __future__ import annotations

import numpy as np

from .. import config, manifest, stage, world

TRAIN_DIR, BENCH_DIR = "data/train", "data/bench"


def triplet_row(row_id: str, subject_id: int, subject: world.Subject, ctx: world.Context, size: int,
                jitter: tuple[float, float]) -> dict:
    ref, _ = world.render(subject, ctx, size, reference=True)
    target, mask = world.render(subject, ctx, size, jitter)
    return {"id": row_id, "subject_id": subject_id, **world.attribute_labels(subject, ctx),
            "pattern_scale": subject.pattern_scale, "pattern_angle": subject.pattern_angle,
            "prompt": world.prompt(subject, ctx), "generic_prompt": world.generic_prompt(subject),
            "ref_png": manifest.encode_png(ref), "target_png": manifest.encode_png(target),
            "mask_png": manifest.encode_png(mask.astype(np.uint8) * 255)}


def bench_rows(w: config.World, b: config.Bench) -> tuple[list[dict], set]:
    rng = np.random.default_rng(b.seed)
    subjects = world.sample_subjects(rng, b.subjects)
    contexts = world.all_contexts()
    if b.prompts_per_subject > len(contexts):
        raise config.ConfigError(f"params.yaml: bench.prompts_per_subject must be <= {len(contexts)}")
    rows = []
    for i, s in enumerate(subjects):
        for k in rng.choice(len(contexts), b.prompts_per_subject, replace=False):
            rows.append(triplet_row(f"bench-{i:05d}-{k:03d}", i, s, contexts[k], w.image_size, (0.0, 0.0)))
    return rows, {s.key for s in subjects}


def train_rows(w: config.World, p: config.Prepare, exclude: set) -> list[dict]:
    rng = np.random.default_rng(w.seed)
    subjects = world.sample_subjects(rng, p.train_subjects, exclude=exclude)
    rows = []
    for i, s in enumerate(stage.progress(subjects, desc="prepare: train")):
        for k in range(p.targets_per_subject):
            ctx = world.sample_context(rng)
            jitter = tuple(rng.uniform(-w.jitter, w.jitter, 2))
            rows.append(triplet_row(f"train-{i:06d}-{k:02d}", i, s, ctx, w.image_size, jitter))
    return rows


def main():
    w, p, b = config.load("world", "prepare", "bench")
    bench, bench_keys = bench_rows(w, b)
    train = train_rows(w, p, bench_keys)
    written = manifest.write_shards(train, TRAIN_DIR, manifest.TRIPLET_SCHEMA, p.shard_rows)
    written += manifest.write_shards(bench, BENCH_DIR, manifest.TRIPLET_SCHEMA, p.shard_rows)
    stage.log.info("prepare: %d train triplets (%d subjects), %d bench rows (%d subjects)", len(train),
                   p.train_subjects, len(bench), b.subjects)
    return [TRAIN_DIR, BENCH_DIR]


if __name__ == "__main__":
    stage.run("prepare", main)
