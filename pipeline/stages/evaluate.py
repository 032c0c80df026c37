"""Stage `evaluate` (a DVC `foreach` over `sft`, `sfo` and `control`): generate the bench and score it.

Reads params `sampler`, `bench.seeds` and `evaluate`, `data/bench`, `models/judges`, `models/sft` (and
`models/sfo` or `models/control` for `--model sfo` or `control`), and the guidance scale in `reports/guidance.json`. Every bench row is generated
with `bench.seeds` seeds: the same seeds, sampler settings and guidance for every model. Writes
`reports/eval/<model>/metrics.json` (the six measures, per-attribute accuracies and the protocol),
`scores.csv` (one row per image) and `grid.png` (reference | ground truth | samples, one row per subject), and
the samples themselves to `data/eval/<model>/` (manifest.SAMPLE_SCHEMA, read by the `report` stage).
With the pretrained judges (real scale) the measures are dino, clip_i and clip_t, each image scored against its
subject's photos in `data/bench_refs` (evaluation.subject_references), and the protocol says which photos.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from .. import checkpoint, config, distributed, evaluation, manifest, stage
from ..judges import Judges
from ..model import SubjectFlux, load_trained

BENCH, JUDGES, BASE = "data/bench", "models/judges", "models/sft"
MODELS = {"sft": None, "sfo": "models/sfo", "control": "models/control"}   # name -> its directory beside the base


def load_model(name: str) -> SubjectFlux:
    """The SFT base; for `sfo` and `control`, their adapter on top (or the whole model `sfo.direct` wrote)."""
    return load_trained(MODELS[name] or BASE, BASE)


def save_grid(path: Path, refs, truth, samples, rows: list[int], seeds: int, scale: int = 3):
    """One line per row index: reference | ground truth | its samples (seeds 0..seeds-1)."""
    lines = [np.concatenate([refs[r], truth[r], *[samples[r * seeds + k] for k in range(seeds)]], 1) for r in rows]
    grid = np.concatenate(lines, 0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    name = parser.parse_args().model
    sampler, bench_cfg, cfg, tcfg = config.load("sampler", "bench", "evaluate", "train")
    distributed.relaunch_if_needed(tcfg.processes, "pipeline.stages.evaluate")   # one GPU a process, batches shared
    par = distributed.Parallel()
    guidance = evaluation.chosen_guidance()
    stage.set_threads()
    table = manifest.read(BENCH)
    b = evaluation.bench_arrays(table, BENCH)
    judges = Judges.load(JUDGES)
    model = load_model(name).to(par.device)
    inputs = [BENCH, BASE] + ([MODELS[name]] if MODELS[name] else [])
    fp = checkpoint.fingerprint({"sampler": sampler, "bench": {"seeds": bench_cfg.seeds}, "evaluate": cfg,
                                 "guidance": {"chosen": guidance}}, inputs, ignore=("evaluate.grid_subjects",))
    work = par.work_dir(f"checkpoints/evaluate-{name}", fp)

    k = bench_cfg.seeds
    subject_refs, references = evaluation.subject_references(judges, BENCH, b["subjects"])
    result = evaluation.generate_and_score(model, judges, b, k, cfg.seed, sampler, guidance, f"evaluate {name}",
                                           work=work, subject_refs=subject_refs, par=par)
    if result is None:
        return []
    rows, samples, scores = result
    protocol = judges.protocol if references is None else {**judges.protocol, "references": references}
    ms = evaluation.measures(scores)
    out = Path("reports/eval") / name
    subject_ids = table.column("subject_id").to_pylist()
    metrics = {**evaluation.summarize(scores), "n_images": len(samples), "n_subjects": len(set(subject_ids)),
               "seeds_per_prompt": k, "guidance": guidance, "sampler": sampler.__dict__, "protocol": protocol}
    stage.write_json(out / "metrics.json", metrics)
    ids = table.column("id").to_pylist()
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "seed", *ms])
        for i, r in enumerate(rows):
            w.writerow([ids[r], scores["seed"][i], *(f"{scores[m][i]:.6g}" for m in ms)])
    manifest.write_shards([{"id": f"{ids[r]}/{j % k}", "row_id": ids[r], "k": j % k, "seed": int(scores["seed"][j]),
                            "png": manifest.encode_png(samples[j])} for j, r in enumerate(rows)],
                          Path("data/eval") / name, manifest.SAMPLE_SCHEMA, shard_rows=len(rows))
    first_row_of_subject = sorted({s: i for i, s in reversed(list(enumerate(subject_ids)))}.values())
    save_grid(out / "grid.png", b["refs"], b["truth"], samples, first_row_of_subject[:cfg.grid_subjects], k)
    work.finish({"stage": f"evaluate {name}", "images": len(samples)})
    stage.log.info("evaluate %s (guidance %g): %s", name, guidance,
                   {m: round(metrics[m], 4) for m in ms})
    return [out, Path("data/eval") / name]


if __name__ == "__main__":
    stage.run("evaluate", main)
