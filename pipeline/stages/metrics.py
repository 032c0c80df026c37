"""Stage `metrics`: the final table, `reports/metrics.json`.

Reads `reports/eval/{sft,sfo}/metrics.json`, and scores the ground-truth bench renders with the same judges
(`oracle`: the ceiling of every measure). Writes `sft`, `sfo` and `oracle`, each with the six measures, the
differences `sfo_minus_sft`, and the protocol. No params.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import manifest, stage
from ..judges import PROTOCOL, Judges
from .evaluate import BENCH, JUDGES, MEASURES, bench_arrays, summarize

REPORT = "reports/metrics.json"


def main():
    evals = {}
    for name in ("sft", "sfo"):
        path = Path("reports/eval") / name / "metrics.json"
        if not path.exists():
            raise manifest.ConfigError(f"{path}: missing; run `dvc repro evaluate@{name}`")
        evals[name] = {m: json.loads(path.read_text())[m] for m in MEASURES}
    b = bench_arrays(manifest.read(BENCH))
    oracle = summarize(Judges.load(JUDGES).score(b["truth"], b["refs"], b["prompts"], b["labels"], b["truth"],
                                                 b["masks"]))
    report = {**evals, "oracle": {m: oracle[m] for m in MEASURES},
              "sfo_minus_sft": {m: evals["sfo"][m] - evals["sft"][m] for m in MEASURES}, "protocol": PROTOCOL}
    stage.write_json(REPORT, report)
    for name in ("sft", "sfo", "oracle"):
        stage.log.info("metrics %-6s %s", name, "  ".join(f"{m}={report[name][m]:.4f}" for m in MEASURES))
    return [REPORT]


if __name__ == "__main__":
    stage.run("metrics", main)
