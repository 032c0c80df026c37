"""Stage `metrics`: the final table, `reports/metrics.json`.

Reads `reports/eval/{sft,sfo}/{metrics.json,scores.csv}`, and scores the ground-truth bench renders with the
same judges (`oracle`: the ceiling of every measure). Writes `sft`, `sfo` and `oracle`, each with the six
measures, the differences `sfo_minus_sft` with their paired standard errors `sfo_minus_sft_sem` (both models
sample the same rows with the same seeds, so the per-image differences are paired), the guidance scale both
models were sampled with, and the protocol. No params.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .. import evaluation, manifest, stage
from ..config import ConfigError
from ..judges import PROTOCOL, Judges

BENCH, JUDGES, REPORT = "data/bench", "models/judges", "reports/metrics.json"


def per_image(name: str) -> dict[str, np.ndarray]:
    with open(Path("reports/eval") / name / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    return {"key": [(r["id"], r["seed"]) for r in rows],
            **{m: np.array([float(r[m]) for r in rows]) for m in evaluation.MEASURES}}


def paired_sem(a: dict, b: dict, m: str) -> float:
    """Standard error of the mean per-image difference b - a (same images in the same order)."""
    if a["key"] != b["key"]:
        raise ConfigError("reports/eval/{sft,sfo}/scores.csv: the two models were not scored on the same images")
    d = b[m] - a[m]
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def main():
    evals = {}
    for name in ("sft", "sfo"):
        path = Path("reports/eval") / name / "metrics.json"
        if not path.exists():
            raise ConfigError(f"{path}: missing; run `dvc repro evaluate@{name}`")
        evals[name] = json.loads(path.read_text())
    b = evaluation.bench_arrays(manifest.read(BENCH), BENCH)
    oracle = evaluation.summarize(Judges.load(JUDGES).score(b["truth"], b["refs"], b["prompts"], b["labels"],
                                                            b["truth"], b["masks"]))
    ms = evaluation.MEASURES
    report = {**{n: {m: e[m] for m in ms} for n, e in evals.items()}, "oracle": {m: oracle[m] for m in ms},
              "sfo_minus_sft": {m: evals["sfo"][m] - evals["sft"][m] for m in ms},
              "sfo_minus_sft_sem": {m: paired_sem(per_image("sft"), per_image("sfo"), m) for m in ms},
              "guidance": evals["sft"]["guidance"], "n_images": evals["sft"]["n_images"], "protocol": PROTOCOL}
    stage.write_json(REPORT, report)
    for name in ("sft", "sfo", "oracle"):
        stage.log.info("metrics %-6s %s", name, "  ".join(f"{m}={report[name][m]:.4f}" for m in ms))
    stage.log.info("metrics sfo-sft %s", "  ".join(f"{m}={report['sfo_minus_sft'][m]:+.4f}"
                                                     f"±{report['sfo_minus_sft_sem'][m]:.4f}" for m in ms))
    return [REPORT]


if __name__ == "__main__":
    stage.run("metrics", main)
