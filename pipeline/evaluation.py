"""What the generating stages share: bench arrays, seeded generation of manifest rows, summaries, and the
guidance scale chosen by the `guidance` stage (METHOD.md section 6; issue: compare at a well-tuned guidance)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from typing import TYPE_CHECKING

from . import checkpoint, config, manifest, stage, world

if TYPE_CHECKING:       # the model (diffusers, peft) is imported where it is used: `metrics` and `report` need
    from .model import SubjectFlux      # neither, and importing them costs each of those stages seconds

MEASURES = ("dino", "clip_i", "clip_t", "id_acc", "ctx_acc", "subject_mse")   # the pretrained judges: first three
GUIDANCE_FILE = "reports/guidance.json"
SEED_TAG, GUIDANCE_SEED_TAG = 2, 3   # noise streams apart from each other and from CDNS's (tag 1)


def sample_seed(base: int, row: int, k: int, tag: int = SEED_TAG) -> int:
    return stage.derive_seed(tag, base, row, k)


def bench_arrays(table, path: str) -> dict:
    """Decoded images, prompts and labels of a triplet manifest (bench or validation split)."""
    return {"refs": manifest.decode_column(table, "ref_png", path),
            "truth": manifest.decode_column(table, "target_png", path),
            "masks": manifest.decode_column(table, "mask_png", path),
            "prompts": table.column("prompt").to_pylist(),
            "labels": {k: table.column(k).to_numpy() for k in world.ATTRS},
            "subjects": table.column("subject_id").to_numpy()}


def subject_references(judges, path: str, subjects: np.ndarray) -> tuple[dict | None, str | None]:
    """For judges that compare an image with its subject's reference photos (the pretrained ones): each
    subject's photos, in manifest order, from `<path>_refs` (data/bench_refs: TRIPLET_SCHEMA rows, one per photo
    in `ref_png`, `subject_id` as in `path`), and what they are, for the protocol. (None, None) for the embedded
    judges; (None, why) without that manifest: each image is then compared with its own row's reference."""
    if not judges.uses_subject_refs:
        return None, None
    refs_path = Path(f"{path}_refs")
    if not refs_path.exists():
        stage.log.warning("%s: missing; each generated image is compared with its own row's reference only",
                          refs_path)
        return None, f"each image's own {path} row reference ({refs_path} missing)"
    table = manifest.read(refs_path)
    photos, ids = manifest.decode_column(table, "ref_png", str(refs_path)), table.column("subject_id").to_numpy()
    refs = {int(s): photos[ids == s] for s in np.unique(subjects)}
    if missing := [s for s, p in refs.items() if not len(p)]:
        raise config.ConfigError(f"{refs_path}: no reference photo of subject_id {missing[:5]} of {path}")
    return refs, f"{refs_path}: {sum(map(len, refs.values()))} photos of {len(refs)} subjects"


def generate(model: SubjectFlux, refs: np.ndarray, prompts: list[str], seeds: list[int], sampler: config.Sampler,
             guidance: float, desc: str, work=None, par=None) -> np.ndarray | None:
    """uint8 samples (N, H, W, 3), one per (reference, prompt, seed); each sample's noise comes from its seed.
    With a `checkpoint.WorkDir`, each batch is saved there (atomically) and reused by a rerun after a kill.
    With `par` (a `distributed.Parallel` of several processes, one GPU each) process r generates the batches
    k = r mod N into the work directory; once all are written the main process returns all of them, the others
    None."""
    from .model import seeded_noise
    size, rank = (par.size, par.rank) if par is not None else (1, 0)
    if size > 1 and work is None:
        raise ValueError("sharded generation needs a work directory to exchange batches")
    device = next(model.transformer.parameters()).device
    starts = list(range(0, len(seeds), sampler.batch_size))
    out = {}
    for k in stage.progress([k for k in range(len(starts)) if k % size == rank], desc=desc):
        sl = slice(starts[k], starts[k] + sampler.batch_size)
        path = work.dir / f"batch-{k:05d}.npy" if work is not None else None
        if path is not None and path.exists():
            batch = np.load(path, allow_pickle=False)
            if batch.shape == (len(seeds[sl]), *refs.shape[1:]) and batch.dtype == np.uint8:
                out[k] = batch
                continue
            stage.log.warning("%s: %s does not match its batch; regenerating it", desc, path)
        noise = seeded_noise(seeds[sl], model.noise_shape).to(device)
        x = model.sample(torch.from_numpy(manifest.to_float(refs[sl])).to(device), prompts[sl], noise, sampler.steps,
                         guidance, sampler.shift)
        out[k] = manifest.to_uint8(x.cpu())
        if path is not None:
            tmp = path.with_name(f"tmp-{path.name}")
            with open(tmp, "wb") as f:
                np.save(f, out[k], allow_pickle=False)
            checkpoint.fault_point("evaluate:batch")
            os.replace(tmp, path)
    if size > 1:
        par.barrier()                                    # every batch written
        if not par.main:
            return None
        out = {k: np.load(work.dir / f"batch-{k:05d}.npy", allow_pickle=False) for k in range(len(starts))}
    return np.concatenate([out[k] for k in range(len(starts))])


def generate_and_score(model, judges, b: dict, seeds_per_row: int, base_seed: int, sampler: config.Sampler,
                       guidance: float, desc: str, tag: int = SEED_TAG, work=None, subject_refs: dict | None = None,
                       par=None) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """Generate every row `seeds_per_row` times and score each image (against `subject_refs`, see
    `subject_references`, where given); returns (row index per image, images, per-image scores), or None in the
    other processes of a sharded generation (`par`)."""
    rows = np.repeat(np.arange(len(b["prompts"])), seeds_per_row)
    seeds = [sample_seed(base_seed, r, k, tag) for r in range(len(b["prompts"])) for k in range(seeds_per_row)]
    prompts = [b["prompts"][r] for r in rows]
    samples = generate(model, b["refs"][rows], prompts, seeds, sampler, guidance, desc, work, par)
    if samples is None:
        return None                                      # the main process scores and writes
    scores = judges.score(samples, b["refs"][rows], prompts, {a: v[rows] for a, v in b["labels"].items()},
                          b["truth"][rows], b["masks"][rows], subject_refs=subject_refs, subjects=b["subjects"][rows])
    return rows, samples, {**scores, "seed": np.array(seeds)}


def measures(scores: dict) -> list[str]:
    """The MEASURES these scores have: all six from the embedded judges, dino/clip_i/clip_t at real scale."""
    return [m for m in MEASURES if m in scores]


def summarize(scores: dict[str, np.ndarray]) -> dict:
    out = {k: float(np.mean(scores[k])) for k in measures(scores)}
    out.update({k: float(np.mean(v)) for k, v in scores.items() if k.startswith("acc_")})
    return out


def chosen_guidance(path: str | Path = GUIDANCE_FILE) -> float:
    """The guidance scale the `guidance` stage chose on the validation split."""
    path = Path(path)
    if not path.exists():
        raise config.ConfigError(f"{path}: missing; run `dvc repro guidance`")
    return float(json.loads(path.read_text())["chosen"])
