"""Probe, not part of the project: what SFO with CDNS negatives teaches in the embedded world, measured
2026-11-27 (docs/calibration.md). Three measurements on this workspace's run, in a git worktree beside the
repository whose data, judges and SFT base are links to the repository's:

    python docs/probes/reference_following.py positives [--strength S]
        Each CDNS pair's positive (the dataset's target) is replaced by the SFT base's own sample from the
        true conditions (reference and prompt; with --strength S < 1, from the target noised to the grid's
        time nearest S, which is t = S at `sampler.shift` 1, as img2img), written as the pair's `pos_png`;
        then the project's `sfo` and `evaluate --model sfo` stages run on that manifest. The pairs then hold
        no dataset image at all.

    python docs/probes/reference_following.py guidance --weight W [--model sft|sfo] [--against nearmiss]
        The bench sampled with "detail guidance" on top of the evaluation's text CFG,
            v = v_u + g (v_c - v_u) + W (v_c - v_blur),
        v_blur being the velocity with CDNS's blurred reference (`cdns.blur_radius`) and the full prompt, then
        scored by the `evaluate` stage. W = 0 reproduces the stage's own samples bit for bit. With
        `--against nearmiss` the third branch's reference is a near miss instead of a blur: the subject
        re-rendered with one of `--fields` (default: the mark's corner and colour) changed, one near miss per
        bench subject. An oracle direction: it reads the bench subjects' true labels.

    python docs/probes/reference_following.py nearmiss [--fields F1,F2]
        Each CDNS pair's negative is replaced by the SFT base's sample from a near-miss reference (as above)
        and the full prompt, with the pair's own noise; then the project's `sfo` and `evaluate --model sfo`
        stages run on that manifest. Beyond the paper: it needs the world's labels to make the near miss.

Each prints the paired differences against this workspace's `reports/eval/sft` and the reader's
per-attribute accuracies. The worktree takes this workspace's params.yaml (for another seed,
`dvc exp apply default-s1` first) and is removed at the end. About 3-4.5 min (positives,
nearmiss) or 2 min (guidance) on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline import config, degrade, evaluation, flow, manifest, stage, world
from pipeline.judges import Judges
from pipeline.model import Conditioning, SubjectFlux, patchify, seeded_noise
from probe_common import make_worktree, paired, run_stages

LINKED = ("data/train", "data/bench", "data/bench_refs", "models/judges", "models/sft")
SEED_TAG = 77   # the positives' noise streams and the near misses' draws, apart from the stages' own


def blurred(radius: float):
    return lambda refs: np.stack([degrade.blur(r, radius) for r in refs])


def near_misses(table: pa.Table, source: str, fields: list[str], wcfg: config.World) -> tuple[np.ndarray, np.ndarray]:
    """Each row's reference and its near miss: the row's subject re-rendered as a reference with one of
    `fields` (drawn per row, seeded by the row's index) set to another value. Checks that re-rendering the
    true subject gives the row's `ref_png`, i.e. that the world's params match the data's."""
    refs, out = manifest.decode_column(table, "ref_png", source), []
    rows = table.select([*world.SUBJECT_FIELDS, *world.CONTEXT_ATTRS]).to_pylist()
    for i, row in enumerate(rows):
        subject = world.Subject(**{k: row[k] for k in world.SUBJECT_FIELDS})
        ctx = world.Context(**{k: row[k] for k in world.CONTEXT_ATTRS})

        def render(s):
            return world.render(s, ctx, wcfg.image_size, reference=True, reference_size=wcfg.reference_size)[0]
        if not np.array_equal(render(subject), refs[i]):
            sys.exit(f"row {i}: re-rendering its subject does not give its ref_png (world params changed?)")
        rng = np.random.default_rng([SEED_TAG, i])
        out.append(render(world.with_other_value(subject, fields[int(rng.integers(len(fields)))], rng)))
    return refs, np.stack(out)


@torch.no_grad()
def sample(model: SubjectFlux, refs, prompts, noise, steps, guidance, shift, weight=0.0, against=None,
           init=None, strength=1.0):
    """SubjectFlux.sample (embedded model, text CFG) plus detail guidance of `weight` away from the references
    `against` makes of the uint8 references (with `weight`: `blurred(radius)` or a near-miss lookup), and img2img
    from `init`."""
    grid = model.time_grid(steps, shift).to(noise.device)
    x = patchify(noise, model.cfg.patch_size)
    if init is not None and strength < 1.0:
        grid = grid[steps - max(1, round(strength * steps)):]
        x = flow.interpolate(model.tokens(init), x, grid[0].expand(len(x)))
    conds = [model.condition(refs, prompts)]
    if guidance != 1.0 or weight:
        conds.append(model.condition(refs, [""] * len(prompts)))
    if weight:
        other = against(manifest.to_uint8(refs.cpu()))
        conds.append(model.condition(torch.from_numpy(manifest.to_float(other)).to(refs.device), prompts))
    c = Conditioning.cat(conds)

    def velocity(x, t):
        v = model(torch.cat([x] * len(conds)), torch.cat([t] * len(conds)), c).chunk(len(conds))
        if len(v) == 1:
            return v[0]
        return flow.guided(v[0], v[1], guidance) + (weight * (v[0] - v[2]) if weight else 0)
    return model.images(flow.euler_sample(velocity, x, steps, shift, grid)).clamp(-1, 1)


def check(model: SubjectFlux, guidance: float, sampler: config.Sampler, own=SubjectFlux.sample):
    """The probe's sampler at weight 0 and strength 1 must be the model's own (`own`: SubjectFlux.sample as
    the project defines it, before `guided_eval` replaces it)."""
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(2, *model.noise_shape, generator=g) * 2 - 1
    prompts, noise = ["a photo of a circle"] * 2, seeded_noise([1, 2], model.noise_shape)
    a = own(model, refs, prompts, noise, sampler.steps, guidance, sampler.shift)
    b = sample(model, refs, prompts, noise, sampler.steps, guidance, sampler.shift)
    if not torch.equal(a, b):
        sys.exit(f"the probe's sampler differs from SubjectFlux.sample by {(a - b).abs().max().item():.1e}")


def accuracies(path: Path, judges: Judges, bench: dict) -> str:
    t = manifest.read(path, manifest.SAMPLE_SCHEMA)
    read = judges.read_attributes(manifest.decode_column(t, "png", str(path)))
    rows = np.repeat(np.arange(len(bench["prompts"])), len(read["cls"]) // len(bench["prompts"]))
    right = {k: read[k] == bench["labels"][k][rows] for k in world.IDENTITY_ATTRS}
    size = bench["labels"]["size"][rows]
    return ", ".join(f"{k} {np.mean(v):.3f}" for k, v in right.items()) + "; cls by size: " + ", ".join(
        f"{s} {np.mean(right['cls'][size == i]):.3f}" for i, s in enumerate(world.SIZES))


def negatives_and_triplets(repo: Path) -> tuple[pa.Table, pa.Table]:
    neg_path = repo / "data/negatives/manifest.parquet"
    neg = manifest.read(neg_path, manifest.NEGATIVE_SCHEMA)
    return neg, manifest.triplets_of(neg, manifest.read(repo / "data/train"), str(neg_path), "data/train")


def sample_all(model: SubjectFlux, refs: np.ndarray, prompts: list[str], seeds: list[int], sampler: config.Sampler,
               guidance: float, desc: str, init: np.ndarray | None = None, strength: float = 1.0) -> np.ndarray:
    """uint8 samples of `model` from uint8 `refs` (img2img from uint8 `init` below strength 1), batched as the
    stages batch."""
    out = []
    for i in stage.progress(range(0, len(refs), sampler.batch_size), desc=desc):
        sl = slice(i, i + sampler.batch_size)
        x = sample(model, torch.from_numpy(manifest.to_float(refs[sl])), prompts[sl],
                   seeded_noise(seeds[sl], model.noise_shape), sampler.steps, guidance, sampler.shift,
                   init=None if init is None else torch.from_numpy(manifest.to_float(init[sl])), strength=strength)
        out.extend(manifest.to_uint8(x))
    return np.stack(out)


def train_on(work: Path, neg: pa.Table, columns: dict[str, np.ndarray]):
    """Write `neg` with `columns` (name -> uint8 images) replaced into the worktree, then run the project's `sfo`
    and `evaluate --model sfo` stages there."""
    for name, images in columns.items():
        col = pa.array([manifest.encode_png(x) for x in images], type=pa.binary())
        neg = neg.set_column(neg.schema.get_field_index(name), name, col)
    (work / "data/negatives").mkdir(parents=True)
    manifest.write_table_atomic(neg, work / "data/negatives/manifest.parquet")
    run_stages(work, "sfo", "evaluate --model sfo")
    return "sfo"


def positives(repo: Path, work: Path, strength: float, sampler: config.Sampler, guidance: float, seed: int,
              judges: Judges):
    neg, tri = negatives_and_triplets(repo)
    refs, targets = (manifest.decode_column(tri, c, "data/train") for c in ("ref_png", "target_png"))
    model = SubjectFlux.from_pretrained(repo / "models/sft").eval()
    check(model, guidance, sampler)
    seeds = [stage.derive_seed(SEED_TAG, seed, i) for i in range(len(refs))]
    pos = sample_all(model, refs, tri.column("prompt").to_pylist(), seeds, sampler, guidance, "positives",
                     init=targets, strength=strength)
    read = judges.read_attributes(pos)
    print("positives, reader accuracy: " + ", ".join(f"{k} {np.mean(read[k] == tri.column(k).to_numpy()):.3f}"
                                                    for k in world.ATTRS))
    return train_on(work, neg, {"pos_png": pos})


def nearmiss(repo: Path, work: Path, fields: list[str], wcfg: config.World, sampler: config.Sampler,
             guidance: float, judges: Judges):
    """Negatives sampled by the base from near-miss references and the full prompt, each with its pair's seed (the
    rows keep their CDNS `image_degradation` and `blur_radius` columns, which the `sfo` stage does not read)."""
    neg, tri = negatives_and_triplets(repo)
    _, misses = near_misses(tri, "data/train", fields, wcfg)
    model = SubjectFlux.from_pretrained(repo / "models/sft").eval()
    check(model, guidance, sampler)
    negs = sample_all(model, misses, tri.column("prompt").to_pylist(), neg.column("seed").to_pylist(), sampler,
                      guidance, "near-miss negatives")
    read_pos = judges.read_attributes(manifest.positives(neg, tri, "negatives", "data/train"))
    read = judges.read_attributes(negs)
    print("near-miss negatives differ from their positives: " + ", ".join(
        f"{k} {np.mean(read_pos[k] != read[k]):.2f}" for k in world.ATTRS))
    return train_on(work, neg, {"neg_png": negs, "cond_png": misses})


def guided_eval(repo: Path, work: Path, weight: float, against, model_name: str, sampler: config.Sampler,
                guidance: float, processes: int):
    """The `evaluate` stage, in this process, with SubjectFlux.sample replaced by the probe's guided sampler."""
    if processes > 1:
        sys.exit("train.processes > 1 relaunches the stage in new processes, which would not see the probe's sampler")
    check(SubjectFlux.from_pretrained(repo / "models/sft").eval(), guidance, sampler)
    own = SubjectFlux.sample

    def patched(self, refs, prompts, noise, steps, guidance=1.0, shift=1.0):
        return sample(self, refs, prompts, noise, steps, guidance, shift, weight, against)
    from pipeline.stages import evaluate
    here, argv = Path.cwd(), sys.argv
    SubjectFlux.sample = patched
    os.chdir(work)
    try:
        sys.argv = ["evaluate", "--model", model_name]
        evaluate.main()
    finally:
        os.chdir(here)
        sys.argv = argv
        SubjectFlux.sample = own
    return model_name


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("positives", "guidance", "nearmiss"))
    parser.add_argument("--strength", type=float, default=1.0, help="positives: img2img strength (1: pure sample)")
    parser.add_argument("--weight", type=float, default=1.0, help="guidance: detail-guidance weight W")
    parser.add_argument("--model", default="sft", choices=("sft", "sfo"), help="guidance: which model samples")
    parser.add_argument("--against", default="blur", choices=("blur", "nearmiss"),
                        help="guidance: the third branch's reference")
    parser.add_argument("--fields", default="mark_corner,mark_color",
                        help="near misses: the subject fields one of which is changed, of "
                        + ", ".join(world.SUBJECT_FIELDS))
    parser.add_argument("--dir", type=Path, default=Path("..") / "sfo-reference-following")
    args = parser.parse_args()
    repo = Path.cwd().resolve()
    sampler, cdns, sfo, train, wcfg = config.load("sampler", "cdns", "sfo", "train", "world",
                                                  path=repo / "params.yaml")
    fields = args.fields.split(",")
    if unknown := set(fields) - set(world.SUBJECT_FIELDS):
        sys.exit(f"--fields: {sorted(unknown)} are not subject fields ({', '.join(world.SUBJECT_FIELDS)})")
    guidance = evaluation.chosen_guidance(repo / evaluation.GUIDANCE_FILE)
    work = args.dir.resolve()
    judges = Judges.load(repo / "models/judges")
    make_worktree(repo, work, LINKED)
    try:
        if args.what == "positives":
            name = positives(repo, work, args.strength, sampler, guidance, sfo.seed, judges)
            what = f"positives from the base (strength {args.strength})"
        elif args.what == "nearmiss":
            name = nearmiss(repo, work, fields, wcfg, sampler, guidance, judges)
            what = f"negatives from near misses in {args.fields}"
        else:
            if args.model == "sfo":
                shutil.copytree(repo / "models/sfo", work / "models/sfo")
            if args.against == "blur":
                against = blurred(cdns.blur_radius)
            else:
                refs, misses = near_misses(manifest.read(repo / "data/bench"), "data/bench", fields, wcfg)
                # keyed by the reference: with `world.reference_size: fixed` every row of a subject has the same one,
                # so each bench subject is guided away from one near miss (its last row's)
                lookup = {r.tobytes(): m for r, m in zip(refs, misses)}
                against = lambda batch: np.stack([lookup[r.tobytes()] for r in batch])  # noqa: E731
            name = guided_eval(repo, work, args.weight, against, args.model, sampler, guidance, train.processes)
            what = f"{args.model} with guidance {args.weight} against " + (
                f"a {cdns.blur_radius} px blur" if args.against == "blur" else f"near misses in {args.fields}")
        bench = evaluation.bench_arrays(manifest.read(repo / "data/bench"), "data/bench")
        print(f"{what} - sft: {paired(repo / 'reports/eval/sft', work / 'reports/eval' / name)}")
        print(f"  reader: sft {accuracies(repo / 'data/eval/sft', judges, bench)}")
        print(f"  reader: {what}: {accuracies(work / 'data/eval' / name, judges, bench)}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(work)], check=True)


if __name__ == "__main__":
    main()
