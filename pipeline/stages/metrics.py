"""Stage `metrics`: the final table, `reports/metrics.json`.

Reads `reports/eval/{sft,sfo}/metrics.json`, and scores the ground-truth bench renders with the same judges
(`oracle`: the ceiling of every measure). Writes `sft`, `sfo` and `oracle`, each with the six measures, the
differences `sfo_minus_sft`, the guidance scale both models were sampled with, and the protocol. No params.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import evaluation, manifest, stage
from ..config import ConfigError
from ..judges import PROTOCOL, Judges

BENCH, JUDGES, REPORT = "data/bench", "models/judges", "reports/metrics.json"


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
              "guidance": evals["sft"]["guidance"], "n_images": evals["sft"]["n_images"], "protocol": PROTOCOL}
    stage.write_json(REPORT, report)
    for name in ("sft", "sfo", "oracle"):
        stage.log.info("metrics %-6s %s", name, "  ".join(f"{m}={report[name][m]:.4f}" for m in ms))
    return [REPORT]


if __name__ == "__main__":
    stage.run("metrics", main)
