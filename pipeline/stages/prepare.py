"""Stage `prepare`: render the training triplets and the bench as Parquet manifests.

Reads params `world`, `prepare`, `bench`. Writes `data/train/`, `data/bench/`, `data/val/` and
`data/bench_refs/` (shards of manifest.TRIPLET_SCHEMA). Bench subjects come from `bench.seed` and are drawn first,
validation subjects (used only to choose the guidance scale) from `bench.val_seed`, excluding the bench's; training
subjects are drawn from `world.seed` excluding both, so the three sets are disjoint.

Real scale: `prepare.source: subjects200k` takes train and val from Subjects200K (pipeline/subjects200k.py, streamed
to the shards), `bench.source: dreambench` takes the bench from DreamBench (pipeline/dreambench.py). data/bench_refs
holds every reference image of every bench subject, one row each (the embedded world has one per subject, DreamBench
4-6), for the measures that compare a sample with all references of its subject.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .. import config, dreambench, manifest, stage, subjects200k, world

TRAIN_DIR, BENCH_DIR, VAL_DIR, BENCH_REFS_DIR = "data/train", "data/bench", "data/val", "data/bench_refs"


def triplet_row(row_id: str, subject_id: int, subject: world.Subject, ctx: world.Context, size: int,
                jitter: tuple[float, float], reference_size: str = "target", shown: world.Subject | None = None
                ) -> dict:
    """One manifest row: `subject`'s reference, and the target showing `shown` (default: `subject` itself; another
    subject makes an imperfect pair). The attribute columns are the target's."""
    shown = subject if shown is None else shown
    ref, _ = world.render(subject, ctx, size, reference=True, reference_size=reference_size)
    target, mask = world.render(shown, ctx, size, jitter)
    return {"id": row_id, "subject_id": subject_id, **world.attribute_labels(shown, ctx),
            "pattern_scale": shown.pattern_scale, "pattern_angle": shown.pattern_angle,
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


MISMATCH_STREAM = 1   # the random stream of imperfect pairs, apart from the world's


def train_rows(w: config.World, p: config.Prepare, exclude: set) -> list[dict]:
    """`targets_per_subject` rows per subject; with `prepare.target_mismatch` > 0 some targets show a near miss of
    their subject (`mismatched_subject`), drawn from a stream of their own, so that the subjects, contexts and
    every exact target are those of `target_mismatch: 0`."""
    rng = np.random.default_rng(w.seed)
    miss_rng = np.random.default_rng([w.seed, MISMATCH_STREAM])
    subjects = world.sample_subjects(rng, p.train_subjects, exclude=exclude)
    rows, mismatched = [], 0
    for i, s in enumerate(stage.progress(subjects, desc="prepare: train")):
        for k in range(p.targets_per_subject):
            ctx = world.sample_context(rng)
            jitter = tuple(rng.uniform(-w.jitter, w.jitter, 2))
            shown = mismatched_subject(s, p, miss_rng, exclude)
            mismatched += shown != s
            rows.append(triplet_row(f"train-{i:06d}-{k:02d}", i, s, ctx, w.image_size, jitter, w.reference_size,
                                    shown))
    if p.target_mismatch:
        stage.log.info("prepare: %d of %d training targets (%.1f %%) differ from their reference in one of %s",
                       mismatched, len(rows), 100 * mismatched / len(rows), ", ".join(p.mismatch_fields))
    return rows


def mismatched_subject(subject: world.Subject, p: config.Prepare, rng: np.random.Generator,
                       exclude: set | frozenset = frozenset()) -> world.Subject:
    """What an imperfect pair's target shows: with probability `p.target_mismatch`, `subject` with one of
    `p.mismatch_fields` (uniform) set to another value (uniform); otherwise `subject`. Draws nothing when it is 0.
    A near miss whose identity is in `exclude` (the bench's and validation's) takes the field's next value
    instead, without another draw, so that the other targets stay the same; `subject` if every value is excluded."""
    if not p.target_mismatch or rng.random() >= p.target_mismatch:
        return subject
    field = p.mismatch_fields[int(rng.integers(len(p.mismatch_fields)))]
    return next((s for s in world.other_values(subject, field, rng) if s.key not in exclude), subject)


def embedded_refs(bench: list[dict]) -> list[dict]:
    """data/bench_refs of the embedded bench: each subject's one reference, from its first bench row (the
    attribute columns are that row's; target = the reference, mask = the whole image)."""
    refs = {}
    for r in bench:
        if r["subject_id"] not in refs:
            key = r["id"].rsplit("-", 1)[0]   # bench-{subject:05d}
            size = manifest.decode_png(r["ref_png"], r["id"]).shape[0]
            refs[r["subject_id"]] = {**r, "id": f"{key}/ref0", "prompt": r["generic_prompt"],
                                     "target_png": r["ref_png"], "mask_png": manifest.full_mask(size)}
    return list(refs.values())


def square_png(path: Path, size: int) -> bytes:
    """A photo centre-cropped to a square and resized to `size` (bicubic), as PNG bytes."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:   # PIL raises several types for bad files
        raise config.ConfigError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e})") from None
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return manifest.encode_png(np.asarray(im))


def dreambench_rows(p: config.Prepare, b: config.Bench) -> tuple[list[dict], list[dict]]:
    """data/bench and data/bench_refs from DreamBench. Bench: one row per (subject, prompt), ref = the subject's
    first photo; DreamBench has no ground truth, so target_png is the same photo and the mask the whole image."""
    bench = dreambench.load(b.dreambench_root or None, b.seeds)
    mask = manifest.full_mask(p.image_size)
    rows, refs = [], []
    for i, s in enumerate(stage.progress(bench.subjects, desc="prepare: dreambench")):
        photos = [square_png(f, p.image_size) for f in s.images]
        base = {"subject_id": i, **{k: subjects200k.UNKNOWN for k in subjects200k.ATTR_COLUMNS},
                "generic_prompt": f"a photo of {s.name}", "mask_png": mask}
        refs += [{**base, "id": f"dreambench/{s.dir}/ref{k}", "prompt": base["generic_prompt"], "ref_png": photo,
                  "target_png": photo} for k, photo in enumerate(photos)]
        rows += [{**base, "id": f"dreambench/{s.dir}/{j:02d}", "prompt": prompt, "ref_png": photos[0],
                  "target_png": photos[0]} for j, prompt in enumerate(bench.prompts(s))]
    return rows, refs


def write_splits(items: Iterable[tuple[str, dict]], dirs: dict[str, str], shard_rows: int) -> dict[str, int]:
    """A stream of (split, row) into one `manifest.ShardWriter` per split; returns the rows per split."""
    writers = {s: manifest.ShardWriter(d, manifest.TRIPLET_SCHEMA, shard_rows) for s, d in dirs.items()}
    for s, row in items:
        writers[s].add(row)
    for w in writers.values():
        w.close()
    return {s: w.rows for s, w in writers.items()}


def main():
    w, p, b = config.load("world", "prepare", "bench")
    if b.source == "dreambench":
        bench, bench_refs = dreambench_rows(p, b)
        bench_keys = set()
    else:
        bench, bench_keys = bench_rows(w, b)
        bench_refs = embedded_refs(bench)
    if p.source == "subjects200k":
        n = write_splits(subjects200k.triplets(p), {"train": TRAIN_DIR, "val": VAL_DIR}, p.shard_rows)
        n_train, n_val = n["train"], n["val"]
        train_subjects, val_subjects = n_train, n_val   # one row per pair
    else:
        val, val_keys = bench_rows(w, b, "val", exclude=bench_keys)
        train = train_rows(w, p, bench_keys | val_keys)
        for rows, path in ((train, TRAIN_DIR), (val, VAL_DIR)):
            manifest.write_shards(rows, path, manifest.TRIPLET_SCHEMA, p.shard_rows)
        n_train, n_val, train_subjects, val_subjects = len(train), len(val), p.train_subjects, b.val_subjects
    for rows, path in ((bench, BENCH_DIR), (bench_refs, BENCH_REFS_DIR)):
        manifest.write_shards(rows, path, manifest.TRIPLET_SCHEMA, p.shard_rows)
    stage.log.info("prepare: %d train triplets (%d subjects, %s), %d bench rows (%d subjects, %s, %d references), "
                   "%d validation rows (%d subjects)", n_train, train_subjects, p.source, len(bench),
                   len({r["subject_id"] for r in bench}), b.source, len(bench_refs), n_val, val_subjects)
    return [TRAIN_DIR, BENCH_DIR, VAL_DIR, BENCH_REFS_DIR]


if __name__ == "__main__":
    stage.run("prepare", main)
