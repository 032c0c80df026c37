"""The whole DAG, run by DVC on a copy of the repo with smoke params (tests/conftest.py)."""
import json
import math
import re
import sys

import pyarrow.parquet as pq
import pytest

from conftest import run

MEASURES = ("dino", "clip_i", "clip_t", "id_acc", "ctx_acc", "subject_mse")


def ran_stages(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def test_repro_runs_every_stage_and_writes_every_output(smoke_repo):
    log = (smoke_repo / "repro.log").read_text()
    assert ran_stages(log) == {"prepare", "judges", "sft", "guidance", "cdns", "sfo", "control", "evaluate@sft",
                               "evaluate@sfo", "evaluate@control", "metrics", "report"}
    for path in ("data/train/shard-00000.parquet", "data/bench/shard-00000.parquet", "data/val/shard-00000.parquet",
                 "models/judges/dino",
                 "models/judges/clip", "models/judges/reader/model.safetensors", "models/sft/transformer",
                 "models/sft/text_encoder", "models/sft/text_encoder_2", "models/sft/tokenizer",
                 "models/sft/subject_flux.json", "models/sfo/pytorch_lora_weights.safetensors",
                 "models/control/pytorch_lora_weights.safetensors", "reports/control/train.csv",
                 "reports/judges.json", "reports/guidance.json", "reports/index.html", "data/eval/sft/shard-00000.parquet", "reports/cdns.json", "reports/sft/train.csv", "reports/sfo/train.csv",
                 "dvc.lock"):
        assert (smoke_repo / path).exists(), path
    for model in ("sft", "sfo", "control"):
        for f in ("metrics.json", "scores.csv", "grid.png"):
            assert (smoke_repo / "reports/eval" / model / f).exists()
    # negatives: exactly one row per input triplet, in order, with the degradation recorded
    neg = pq.read_table(smoke_repo / "data/negatives/manifest.parquet")
    train_ids = pq.read_table(smoke_repo / "data/train").column("id").to_pylist()
    assert neg.column("id").to_pylist() == sorted(train_ids)[:10]
    assert set(neg.column("image_degradation").to_pylist()) == {"blur"}
    # the final table: sft, sfo, the control and the oracle, each with six finite measures, and the differences
    metrics = json.loads((smoke_repo / "reports/metrics.json").read_text())
    for model in ("sft", "sfo", "control", "oracle"):
        for m in MEASURES:
            assert math.isfinite(metrics[model][m]), (model, m)
    for b, a in (("sfo", "sft"), ("control", "sft"), ("sfo", "control")):
        for m in MEASURES:
            assert metrics[f"{b}_minus_{a}"][m] == pytest.approx(metrics[b][m] - metrics[a][m])
            assert metrics[f"{b}_minus_{a}_sem"][m] >= 0 and metrics[f"{b}_minus_{a}_subject_sem"][m] >= 0
    assert metrics["oracle"]["subject_mse"] == 0.0
    guidance = json.loads((smoke_repo / "reports/guidance.json").read_text())
    assert set(guidance["scales"]) == {"1", "2"} and guidance["chosen"] in (1.0, 2.0)
    assert metrics["guidance"] == guidance["chosen"]
    assert json.loads((smoke_repo / "reports/cdns.json").read_text())["guidance"] == guidance["chosen"]
    sfo_curve = (smoke_repo / "reports/sfo/train.csv").read_text().splitlines()
    assert sfo_curve[0].startswith("step,loss,implicit_acc,reward_margin") and len(sfo_curve) == 4
    control_curve = (smoke_repo / "reports/control/train.csv").read_text().splitlines()
    assert control_curve[0].startswith("step,loss,err_pos,ref_err_pos") and len(control_curve) == 4
    page = (smoke_repo / "reports/index.html").read_text()
    assert "SFT-additional (control)" in page and page.count('class="group control"') == 3   # one per bench subject
    assert "on the embedded bench:" in page and "The oracle row scores the ground-truth renders." in page


def test_second_repro_is_a_noop(smoke_repo):
    p = run([sys.executable, "-m", "dvc", "repro"], smoke_repo)
    assert ran_stages(p.stdout + p.stderr) == set()


def test_two_clean_runs_give_identical_outputs(smoke_repo, tmp_path):
    """Determinism on CPU: a second clean clone's `dvc repro` records the same hash for every output and
    writes the same metrics (compared with the first run as committed, before any experiment)."""
    import yaml
    from conftest import make_smoke_repo
    other = make_smoke_repo(tmp_path / "repo")
    run([sys.executable, "-m", "dvc", "repro"], other)

    def outs(lock_text):
        lock = yaml.safe_load(lock_text)
        return {(stage, o["path"]): o["md5"] for stage, body in lock["stages"].items() for o in body.get("outs", [])}

    first = outs(run(["git", "show", "HEAD:dvc.lock"], smoke_repo).stdout)
    second = outs((other / "dvc.lock").read_text())
    assert len(first) >= 15 and first == second
    assert run(["git", "show", "HEAD:reports/metrics.json"], smoke_repo).stdout == \
        (other / "reports/metrics.json").read_text()


def test_changing_beta_reruns_only_sfo_and_what_depends_on_it(smoke_repo):
    p = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "loss.beta=500"], smoke_repo)
    assert ran_stages(p.stdout + p.stderr) == {"sfo", "evaluate@sfo", "metrics", "report"}   # not the control
    diff = run([sys.executable, "-m", "dvc", "metrics", "diff", "--json"], smoke_repo)
    assert "reports/metrics.json" in json.loads(diff.stdout)
