"""Stage `metrics`: the final table, `reports/metrics.json`.

Reads `reports/eval/{sft,sfo,control}/{metrics.json,scores.csv}`, and scores the ground-truth bench renders with
the same judges (`oracle`: with the embedded judges the ground-truth renders, the ceiling of every measure; at
real scale DreamBench has no ground truth and `truth` is each subject's first photo, itself one of the
references, so its dino and clip_i include a self-similarity and it is no ceiling). Writes `sft`, `sfo`,
`control` (the SFT-additional control) and `oracle`, each with the six measures; the differences `sfo_minus_sft`,
`control_minus_sft` and `sfo_minus_control`, each with two standard errors: `..._sem`, paired per image (all
models sample the same rows with the same seeds, so the per-image differences are paired; the images are treated
as independent, though those of one subject are not, so it understates the spread over subjects), and
`..._subject_sem`, clustered by subject (the per-image differences averaged per bench subject, then the standard
error of those subject means: the spread a new draw of subjects would show). Neither is the spread over training
seeds: the project's bars use the standard deviation over seeds of CDNS, SFO and sampling,
`reports/ablations.md`. Then the guidance scale,
image count and protocol, as `evaluate` wrote them, after checking that the three models were sampled alike
(guidance, sampler, seeds per prompt, image count). No params. With the pretrained judges (real scale) the
measures are dino, clip_i and clip_t, the oracle's scored against `data/bench_refs` like the samples.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .. import evaluation, manifest, stage
from ..config import ConfigError
from ..judges import Judges

BENCH, JUDGES, REPORT = "data/bench", "models/judges", "reports/metrics.json"


def per_image(name: str) -> dict[str, np.ndarray]:
    with open(Path("reports/eval") / name / "scores.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return {"key": [(r["id"], r["seed"]) for r in rows],
            **{m: np.array([float(r[m]) for r in rows]) for m in evaluation.measures(reader.fieldnames)}}


MODELS = ("sft", "sfo", "control")
DIFFERENCES = (("sfo", "sft"), ("control", "sft"), ("sfo", "control"))   # (b, a): b minus a


def paired_difference(a: dict, b: dict, m: str) -> np.ndarray:
    """Per-image differences b - a of measure m; both models must have scored the same images in the same order."""
    if a["key"] != b["key"]:
        raise ConfigError("reports/eval/*/scores.csv: two models were not scored on the same images")
    return b[m] - a[m]


def sem(x: np.ndarray) -> float:
    """Standard error of the mean of x (NaN for one value)."""
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def paired_sem(a: dict, b: dict, m: str) -> float:
    """Standard error of the mean per-image difference b - a (same images in the same order), images taken as
    independent."""
    return sem(paired_difference(a, b, m))


def subject_sem(a: dict, b: dict, m: str, subject_of: dict[str, int]) -> float:
    """Standard error of the difference b - a over subjects: each subject's per-image differences averaged, then
    the standard error of those means (clustered by subject). `subject_of` maps a bench row id to its subject."""
    d = paired_difference(a, b, m)
    subjects = np.array([subject_of[row] for row, _ in a["key"]])
    return sem(np.array([d[subjects == s].mean() for s in np.unique(subjects)]))


def how_sampled(ev: dict) -> dict:
    """What must be the same for every model's samples (the sampler's batch size changes no sample)."""
    sampler = {k: v for k, v in (ev.get("sampler") or {}).items() if k != "batch_size"}
    return {"guidance": ev.get("guidance"), "sampler": sampler, "seeds_per_prompt": ev.get("seeds_per_prompt"),
            "n_images": ev.get("n_images")}


def main():
    stage.set_threads()             # the judges score the ground truth: $SFO_THREADS under `make ablations`
    evals = {}
    for name in MODELS:
        path = Path("reports/eval") / name / "metrics.json"
        if not path.exists():
            raise ConfigError(f"{path}: missing; run `dvc repro evaluate@{name}`")
        evals[name] = json.loads(path.read_text())
    for name in MODELS[1:]:         # a fair comparison: every model sampled alike (DVC ensures it; a hand run may not)
        mine, base = how_sampled(evals[name]), how_sampled(evals["sft"])
        if diff := {k: (mine[k], base[k]) for k in base if mine[k] != base[k]}:
            raise ConfigError(f"reports/eval/{name}/metrics.json: sampled unlike reports/eval/sft ({name}, sft): "
                              f"{diff}; rerun `dvc repro` so that all three models are evaluated alike")
    bench = manifest.read(BENCH)
    b = evaluation.bench_arrays(bench, BENCH)
    subject_of = dict(zip(bench.column("id").to_pylist(), bench.column("subject_id").to_pylist()))
    judges = Judges.load(JUDGES)
    subject_refs, _ = evaluation.subject_references(judges, BENCH, b["subjects"])
    oracle = evaluation.summarize(judges.score(b["truth"], b["refs"], b["prompts"], b["labels"], b["truth"],
                                               b["masks"], subject_refs=subject_refs, subjects=b["subjects"]))
    ms = evaluation.measures(evals["sft"])
    scores = {n: per_image(n) for n in MODELS}
    report = {**{n: {m: e[m] for m in ms} for n, e in evals.items()}, "oracle": {m: oracle[m] for m in ms}}
    for b_, a_ in DIFFERENCES:
        report[f"{b_}_minus_{a_}"] = {m: evals[b_][m] - evals[a_][m] for m in ms}
        report[f"{b_}_minus_{a_}_sem"] = {m: paired_sem(scores[a_], scores[b_], m) for m in ms}
        report[f"{b_}_minus_{a_}_subject_sem"] = {m: subject_sem(scores[a_], scores[b_], m, subject_of) for m in ms}
    report.update({"guidance": evals["sft"]["guidance"], "n_images": evals["sft"]["n_images"],
                   "protocol": evals["sft"]["protocol"]})
    stage.write_json(REPORT, report)
    for name in (*MODELS, "oracle"):
        stage.log.info("metrics %-7s %s", name, "  ".join(f"{m}={report[name][m]:.4f}" for m in ms))
    for b_, a_ in DIFFERENCES:
        d = f"{b_}_minus_{a_}"
        stage.log.info("metrics %s-%s %s (± paired per image / per subject)", b_, a_, "  ".join(
            f"{m}={report[d][m]:+.4f}±{report[d + '_sem'][m]:.4f}/{report[d + '_subject_sem'][m]:.4f}" for m in ms))
    return [REPORT]


if __name__ == "__main__":
    stage.run("metrics", main)
