"""Stage `guidance`: choose the sampler's guidance scale on the validation split, for the SFT base.

Reads params `guidance` and `sampler`, `data/val` (subjects disjoint from train and bench), `models/sft`,
`models/judges`. Samples the validation split at every scale in `guidance.scales` with the SFT base and keeps
the one with the highest `dino`. `cdns` and the three `evaluate` stages (sft, sfo, control) then sample with it,
so SFO is compared with a well-tuned base, never with a strawman, and the bench is never used to tune anything.
Each validation image is scored against its own row's reference: a validation subject has that one photo
(the bench's, with the pretrained judges, are scored against all of their subject's photos in data/bench_refs).
Writes `reports/guidance.json`: the chosen scale and every scale's measures (six with the embedded judges,
dino, clip_i and clip_t with the pretrained ones).
"""
from __future__ import annotations

import torch

from .. import config, evaluation, manifest, stage
from ..judges import Judges
from ..model import SubjectFlux

VAL, JUDGES, BASE = "data/val", "models/judges", "models/sft"


def main():
    cfg, sampler = config.load("guidance", "sampler")
    stage.set_threads()
    b = evaluation.bench_arrays(manifest.read(VAL), VAL)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    judges, model = Judges.load(JUDGES), SubjectFlux.from_pretrained(BASE).eval().to(device)
    results = {}
    for scale in cfg.scales:
        _, _, scores = evaluation.generate_and_score(model, judges, b, cfg.seeds, cfg.seed, sampler, scale,
                                                     f"guidance {scale:g}", tag=evaluation.GUIDANCE_SEED_TAG)
        results[f"{scale:g}"] = {m: float(scores[m].mean()) for m in evaluation.measures(scores)}
        stage.log.info("guidance %g: %s", scale, {m: round(v, 4) for m, v in results[f"{scale:g}"].items()})
    chosen = max(cfg.scales, key=lambda s: results[f"{s:g}"]["dino"])
    stage.write_json(evaluation.GUIDANCE_FILE, {"chosen": chosen, "criterion": "max dino of the SFT base on data/val",
                                                "scales": results})
    stage.log.info("guidance: chose %g", chosen)
    return [evaluation.GUIDANCE_FILE]


if __name__ == "__main__":
    stage.run("guidance", main)
