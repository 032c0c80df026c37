"""Stage `evaluate` (a DVC `foreach` over `sft` and `sfo`): generate the bench and score it.

Reads params `sampler`, `bench.seeds` and `evaluate`, `data/bench`, `models/judges`, `models/sft` (and
`models/sfo` for `--model sfo`). Every bench row is generated with `bench.seeds` seeds, the same seeds and
sampler settings for both models. Writes `reports/eval/<model>/metrics.json` (the six measures, per-attribute
accuracies and the protocol), `scores.csv` (one row per image) and `grid.png` (reference | ground truth |
samples, one row per subject).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import config, manifest, stage, world
from ..judges import PROTOCOL, Judges
from ..model import SubjectFlux, load_lora, seeded_noise

BENCH, JUDGES, BASE = "data/bench", "models/judges", "models/sft"
MODELS = {"sft": None, "sfo": "models/sfo"}   # model name -> its LoRA adapter on top of the base
MEASURES = ("dino", "clip_i", "clip_t", "id_acc", "ctx_acc", "subject_mse")


def sample_seed(base: int, row: int, k: int) -> int:
    return (base * 1_000_003 + row) * 101 + k


def load_model(name: str) -> SubjectFlux:
    model = SubjectFlux.from_pretrained(BASE)
    if MODELS[name]:
        load_lora(model, MODELS[name], name)
    return model.eval()


def bench_arrays(table, path: str = BENCH) -> dict:
    return {"refs": manifest.decode_column(table, "ref_png", path),
            "truth": manifest.decode_column(table, "target_png", path),
            "masks": manifest.decode_column(table, "mask_png", path),
            "prompts": table.column("prompt").to_pylist(),
            "labels": {k: table.column(k).to_numpy() for k in world.ATTRS}}


def generate(model: SubjectFlux, refs: np.ndarray, prompts: list[str], seeds: list[int],
             sampler: config.Sampler, desc: str) -> np.ndarray:
    out = []
    for i in stage.progress(range(0, len(seeds), sampler.batch_size), desc=desc):
        sl = slice(i, i + sampler.batch_size)
        noise = seeded_noise(seeds[sl], (3, *refs.shape[1:3]))
        x = model.sample(torch.from_numpy(manifest.to_float(refs[sl])), prompts[sl], noise, sampler.steps,
                         sampler.guidance, sampler.shift)
        out.append(manifest.to_uint8(x))
    return np.concatenate(out)


def summarize(scores: dict[str, np.ndarray]) -> dict:
    out = {k: float(np.mean(scores[k])) for k in MEASURES}
    out.update({k: float(np.mean(v)) for k, v in scores.items() if k.startswith("acc_")})
    return out


def save_grid(path: Path, refs, truth, samples, rows: list[int], seeds: int, scale: int = 3):
    """One line per row index: reference | ground truth | its samples (seeds 0..seeds-1)."""
    lines = [np.concatenate([refs[r], truth[r], *[samples[r * seeds + k] for k in range(seeds)]], 1) for r in rows]
    grid = np.concatenate(lines, 0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    name = parser.parse_args().model
    sampler, bench_cfg, cfg = config.load("sampler", "bench", "evaluate")
    stage.set_threads()
    table = manifest.read(BENCH)
    b = bench_arrays(table)
    judges = Judges.load(JUDGES)
    model = load_model(name)

    k = bench_cfg.seeds
    rep = np.repeat(np.arange(table.num_rows), k)                       # row of each generated image
    seeds = [sample_seed(cfg.seed, r, j) for r in range(table.num_rows) for j in range(k)]
    samples = generate(model, b["refs"][rep], [b["prompts"][r] for r in rep], seeds, sampler, f"evaluate {name}")
    scores = judges.score(samples, b["refs"][rep], [b["prompts"][r] for r in rep],
                          {a: v[rep] for a, v in b["labels"].items()}, b["truth"][rep], b["masks"][rep])

    out = Path("reports/eval") / name
    metrics = {**summarize(scores), "n_images": len(samples), "n_subjects": int(len(set(
        table.column("subject_id").to_pylist()))), "seeds_per_prompt": k, "sampler": sampler.__dict__,
        "protocol": PROTOCOL}
    stage.write_json(out / "metrics.json", metrics)
    ids = table.column("id").to_pylist()
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "seed", *MEASURES])
        for i, (r, s) in enumerate(zip(rep, seeds)):
            w.writerow([ids[r], s, *(f"{scores[m][i]:.6g}" for m in MEASURES)])
    first_rows = sorted({int(v): i for i, v in reversed(list(enumerate(table.column("subject_id").to_pylist())))}
                        .values())[:cfg.grid_subjects]
    if first_rows:
        save_grid(out / "grid.png", b["refs"], b["truth"], samples, first_rows, k)
    stage.log.info("evaluate %s: %s", name, {m: round(metrics[m], 4) for m in MEASURES})
    return [out]


if __name__ == "__main__":
    stage.run("evaluate", main)
