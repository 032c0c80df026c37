"""The paper's ablation switches each run their own code path: `sfo.pairs` (self-play, SFT-additional,
judge DPO) through `cdns` and `sfo`, and `sfo.direct`. Run as DVC would, in a copy of the smoke DAG."""
import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import ablations, manifest
from pipeline.judges import dino_embed, to_pixels
from test_resume import run_stage


def set_params(repo, **values):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in values.items():
        section, name = key.split("__")
        params[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def run_ok(repo, name, *args):
    p = run_stage(repo, name, args=list(args))
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def negatives(repo):
    return pq.read_table(repo / "data/negatives/manifest.parquet")


def curve(repo):
    with open(repo / "reports/sfo/train.csv") as f:
        return list(csv.DictReader(f))


def test_self_play_samples_the_negative_from_the_undegraded_conditions(work_repo):
    set_params(work_repo, sfo__pairs="self_play")
    run_ok(work_repo, "cdns")
    t = negatives(work_repo)
    assert set(t.column("image_degradation").to_pylist()) == {"none"} == set(t.column("text_degradation").to_pylist())
    assert set(t.column("pairs").to_pylist()) == {"self_play"} and t.column("pos_png").null_count == t.num_rows
    train = pq.read_table(work_repo / "data/train")
    refs = dict(zip(train.column("id").to_pylist(), train.column("ref_png").to_pylist()))
    prompts = dict(zip(train.column("id").to_pylist(), train.column("prompt").to_pylist()))
    for i, cond, p in zip(t.column("id").to_pylist(), t.column("cond_png").to_pylist(), t.column("neg_prompt").to_pylist()):
        assert np.array_equal(manifest.decode_png(cond, i), manifest.decode_png(refs[i], i)) and p == prompts[i]
    run_ok(work_repo, "sfo")
    assert len(curve(work_repo)) == 3


def test_judge_dpo_positive_is_the_sample_the_dino_judge_prefers(work_repo, monkeypatch):
    from transformers import ViTModel
    set_params(work_repo, sfo__pairs="judge_dpo")
    run_ok(work_repo, "cdns")
    t = negatives(work_repo)
    assert t.column("pos_png").null_count == 0 and set(t.column("pairs").to_pylist()) == {"judge_dpo"}
    pos, neg = (manifest.decode_column(t, c, "neg") for c in ("pos_png", "neg_png"))
    cond = manifest.decode_column(t, "cond_png", "neg")                       # the undegraded reference
    dino = ViTModel.from_pretrained(work_repo / "models/judges/dino").eval()
    with torch.no_grad():
        sim = [torch.nn.functional.cosine_similarity(dino_embed(dino, to_pixels(x)), dino_embed(dino, to_pixels(cond)))
               for x in (pos, neg)]
    assert bool((sim[0] >= sim[1]).all()) and not np.array_equal(pos, neg)
    monkeypatch.chdir(work_repo)                                              # sfo trains on those positives
    from pipeline.stages.sfo import load_pairs
    x_pos, x_neg, _, _ = load_pairs()
    assert torch.equal(x_pos, torch.from_numpy(manifest.to_float(pos)))
    run_ok(work_repo, "sfo")


def test_sft_additional_trains_a_lora_on_the_positives_alone(work_repo):
    before = load_file(work_repo / "models/sfo/pytorch_lora_weights.safetensors")
    set_params(work_repo, sfo__pairs="sft_additional")
    run_ok(work_repo, "cdns")
    assert set(negatives(work_repo).column("image_degradation").to_pylist()) == {"blur"}
    p = run_ok(work_repo, "sfo")
    assert "SFT loss on the positives" in p.stderr
    rows = curve(work_repo)
    assert len(rows) == 3 and all(r["loss"] == r["err_pos"] for r in rows)       # the loss is the positives' error
    after = load_file(work_repo / "models/sfo/pytorch_lora_weights.safetensors")
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in after)
    # the `control` stage of every run is this same training: same adapter, bit for bit, and the same curve
    run_ok(work_repo, "sfo", "--control")
    assert (work_repo / "models/control/pytorch_lora_weights.safetensors").read_bytes() == \
        (work_repo / "models/sfo/pytorch_lora_weights.safetensors").read_bytes()
    assert (work_repo / "reports/control/train.csv").read_text() == (work_repo / "reports/sfo/train.csv").read_text()


def test_direct_sfo_trains_the_sft_weights_and_evaluates(work_repo):
    set_params(work_repo, sfo__direct=True)
    run_ok(work_repo, "sfo")
    out = work_repo / "models/sfo"
    assert (out / "subject_flux.json").exists() and not (out / "pytorch_lora_weights.safetensors").exists()
    sft = load_file(work_repo / "models/sft/transformer/diffusion_pytorch_model.safetensors")
    sfo = load_file(out / "transformer/diffusion_pytorch_model.safetensors")
    assert sft.keys() == sfo.keys() and any(not torch.equal(sft[k], sfo[k]) for k in sft)
    run_ok(work_repo, "evaluate", "--model", "sfo")
    assert (work_repo / "reports/eval/sfo/metrics.json").exists()


def test_direct_sfo_under_bf16_runs_the_reference_as_the_policy(work_repo):
    """The frozen reference copy of `sfo.direct` gets the policy's bf16 autocast: at the first step policy and
    reference are the same weights computed the same way, so the loss is exactly log 2 (an fp32 reference beside
    a bf16 policy gives a margin of beta times bf16 rounding)."""
    import math
    set_params(work_repo, sfo__direct=True, train__bf16="on")
    run_ok(work_repo, "sfo")
    first = curve(work_repo)[0]
    assert first["step"] == "1" and float(first["loss"]) == pytest.approx(math.log(2), abs=1e-6)


def test_a_diverging_run_stops_at_the_first_non_finite_loss(work_repo):
    """An absurd learning rate sends the weights to inf/NaN: the stage stops with the step and a hint, exit 2,
    instead of writing a NaN model that the evaluation would score."""
    shutil.rmtree(work_repo / "models/sfo", ignore_errors=True)
    set_params(work_repo, sfo__lr=1e12)
    p = run_stage(work_repo, "sfo")
    assert p.returncode == 2 and "training diverged" in p.stderr and "lower sfo.lr" in p.stderr, p.stderr[-2000:]
    assert not (work_repo / "models/sfo").exists()


@pytest.mark.parametrize("key,value,message", [
    ("sfo__pairs", "mirror", "sfo.pairs must be one of"),
    ("model__backbone", "sdxl", "model.backbone must be one of"),
])
def test_unknown_ablation_choices_stop_the_stage(work_repo, key, value, message):
    set_params(work_repo, **{key: value})
    p = run_stage(work_repo, "sfo" if key.startswith("sfo") else "sft")
    assert p.returncode == 2 and message in p.stderr


@pytest.mark.parametrize("option", ["bf16", "compile"])
def test_speed_options_run_the_training_stages(work_repo, option):
    """train.bf16 / train.compile: on CPU off by default (auto), switched on here; sfo trains and logs it."""
    import shutil as sh
    if option == "compile" and not (sh.which("cc") or sh.which("gcc")):
        pytest.skip("torch.compile on CPU needs a C compiler (cc/gcc), none on PATH")
    set_params(work_repo, **{f"train__{option}": "on"})
    p = run_ok(work_repo, "sfo")
    assert f"{option} True" in p.stderr
    rows = curve(work_repo)
    assert len(rows) == 3 and all(float(r["loss"]) == float(r["loss"]) for r in rows)     # finite, not NaN


# ---------------------------------------------------------------------------------------------------------
# `make ablations` (pipeline/ablations.py)
# ---------------------------------------------------------------------------------------------------------
def test_the_ablation_plan_covers_the_papers_tables_with_their_seeds(monkeypatch):
    from conftest import REPO
    monkeypatch.chdir(REPO)
    plan = ablations.planned()
    assert {t.key for t in ablations.TABLES} == {"t3", "t4", "tb", "tc", "td"}
    assert {"default-s0", "default-s1", "default-s2"} <= set(plan) and plan["default-s0"] == {}
    for name in ("tc-uniform-s1", "t3-selfplay-s2", "t3-dpo-s0"):
        assert name in plan
    assert plan["tc-uniform-s2"] == {"sfo.timesteps": "uniform", "sfo.seed": 2, "cdns.seed": 2, "evaluate.seed": 2}
    # rows equal to the defaults share the default run; every override is a real params key with a new value
    assert len(set(map(str, plan.values()))) == len(plan)
    defaults = ablations.defaults()
    assert all(k in defaults and defaults[k] != v for ov in plan.values() for k, v in ov.items())
    radii = sorted(plan[n]["cdns.blur_radius"] for n in plan if n.startswith("tb-"))
    assert radii == [defaults["cdns.blur_radius"] * k for k in (0.5, 2.0, 4.0)]


def test_the_ablations_report_puts_ours_beside_the_paper_and_checks_the_orderings(tmp_path, monkeypatch):
    from conftest import REPO
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    dino = {"default": 0.80, "t3-dpo": 0.70, "t3-selfplay": 0.75, "tc-uniform": 0.78, "tc-nm2": 0.79,
            "tc-np2": 0.60, "tc-n0s05": 0.795}

    def metrics(name, seed):
        base = dino.get(name.rsplit("-s", 1)[0], 0.7) + 0.001 * seed
        model = {m: base for m in ablations.MEASURES}
        sft, control = {m: 0.6 for m in ablations.MEASURES}, {m: 0.61 + 0.01 * seed for m in ablations.MEASURES}
        every = (*ablations.MEASURES, "subject_mse")
        return {"sfo": model, "sft": sft, "control": control, "oracle": {m: 0.7 for m in every},
                "sfo_minus_sft": {m: 0.04 + 0.001 * seed for m in every},
                "control_minus_sft": {m: 0.001 * seed for m in every}}
    done = {n: {"params": {}, "metrics": metrics(n, int(n.rsplit("-s", 1)[1]))} for n in ablations.planned()
            if not n.startswith("td-")}                                           # Table D not run yet
    text = ablations.write_report(done).read_text()
    assert "| sfo − sft | dino | +0.0400 | +0.0410 | +0.0420 | +0.0410 ± 0.0010 | >= +0.03 and > 2 SD | yes |" in text
    assert "| sfo − sft | id_acc | +0.0400 | +0.0410 | +0.0420 | +0.0410 ± 0.0010 | >= +0.05 and > 2 SD | **no** |" in text
    assert "| sfo − sft | subject_mse | +0.0400 | +0.0410 | +0.0420 | +0.0410 ± 0.0010 | < 0 | **no** |" in text
    assert "ground truth 0.7000, the SFT base 0.1000 below it, SFO closes 41 % of that gap" in text
    assert "| SFT base (no further training) | `default-s{0,1,2}` (sft) | 0.652 | 0.795 | 0.329 | 0.6000 ± 0.0000" in text
    assert "| SFT-additional (extra LoRA, SFT loss on positives) | `default-s{0,1,2}` (control) | 0.650 | 0.794 | 0.330 | " \
           "0.6200 ± 0.0100" in text
    assert "**Paper's ordering reproduced: yes.** CDNS beats self-play and SFT-additional on dino and id_acc: yes (" \
        in text
    assert "**Paper's ordering reproduced: yes.** N(0, 1) beats U[0, 1] on dino: yes (paired over seeds: +0.0200 ± 0.0000). Dino order here: N(0, 1) > " \
           "N(0, 0.5) > N(-2, 1) > U[0, 1] > N(2, 1); the paper's: N(0, 1) > N(0, 0.5) > N(-2, 1) > U[0, 1] > N(2, 1)." \
        in text
    # Table 4 (all rows at 0.7 but the default): the paper's best row is not best here, and that is said
    assert "the paper's best row (blur + generic prompt) is" in text
    table_d = text.split("## Table D")[1]
    assert "not run" in table_d and "**Incomplete:**" in table_d


def test_queue_status_rows_are_cut_at_the_header_columns():
    """`dvc queue status` as dvc 3.67 prints it, with an unnamed task and dates of one to three words."""
    text = ("Task     Name         Created       Status\n"
            "d4ce7d8  td-b500-s0   12:54 AM      Running\n"
            "dd69d03               Nov 27, 2026  Failed\n"
            "939e167  td-b2000-s0  Yesterday     Success\n"
            "\nWorker status: 0 active, 0 idle\n")
    assert ablations.parse_queue_status(text) == [("d4ce7d8", "td-b500-s0", "Running"), ("dd69d03", "", "Failed"),
                                                  ("939e167", "td-b2000-s0", "Success")]
    assert ablations.parse_queue_status("No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle") == []


def test_queue_workers_split_the_cores_between_them():
    """Two workers on two cores: each experiment's stages get one torch thread; one worker keeps all cores; a
    caller's SFO_THREADS is kept; dvc.yaml's `python` is this interpreter's."""
    base = {"PATH": "/usr/bin"}
    assert "SFO_THREADS" not in ablations.worker_env(1, base, 2)
    assert ablations.worker_env(2, base, 2)["SFO_THREADS"] == "1"
    assert ablations.worker_env(2, base, 8)["SFO_THREADS"] == "4"
    assert ablations.worker_env(3, base, 2)["SFO_THREADS"] == "1"
    assert ablations.worker_env(2, {**base, "SFO_THREADS": "2"}, 2)["SFO_THREADS"] == "2"
    assert ablations.worker_env(2, base, 2)["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_make_ablations_queues_dvc_experiments_and_reports_them(smoke_repo, tmp_path):
    """One table through the real DVC queue on a copy of the smoke repo: the default run is shared, the others
    run as experiments, and a second run finds them all done. A task left Running with nothing running it, by an
    earlier run or during this one, is killed and queued again; one already queued is not queued twice. The
    queue's worker is stopped while the first experiment runs (`dvc queue stop` lets it finish that one and
    exit): ablations must start a new one."""
    import subprocess
    import sys
    import time
    from conftest import run, stage_env
    repo = tmp_path / "repo"
    shutil.copytree(smoke_repo, repo, symlinks=True)
    run(["git", "checkout", "-q", "--", "."], repo)
    run([sys.executable, "-m", "dvc", "checkout", "-f"], repo, check=False)
    # A task a worker took but never ran (what `dvc queue stop` can leave, seen on dvc 3.67): its message moved
    # from the broker's inbox to `processed` with no result. The queue shows it Running, and `dvc exp show` fails.
    run([sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", "td-b2000-s0", "-S", "loss.beta=2000"], repo)
    broker = repo / ".dvc/tmp/exps/celery/broker"
    (msg,) = (broker / "in").glob("*.celery.msg")
    msg.rename(broker / "processed" / msg.name)
    status = run([sys.executable, "-m", "dvc", "queue", "status"], repo).stdout
    (line,) = [line for line in status.splitlines() if line.split()[1:2] == ["td-b2000-s0"]]
    assert line.endswith("Running"), status
    orphan = line.split()[0]
    # and one queued by hand on this commit, as the plan would queue it: ablations must not queue it twice
    run([sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", "td-b500-s0", "-S", "loss.beta=500.0"], repo)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.ablations", "run", "--tables", "td"], cwd=repo,
                            env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, status = time.time() + 300, ""
    while time.time() < deadline and proc.poll() is None:
        status = run([sys.executable, "-m", "dvc", "queue", "status"], repo, check=False).stdout
        if any(line.endswith("Running") and not line.startswith(orphan) for line in status.splitlines()):
            break
        time.sleep(1)
    assert "Queued" in status, status                  # experiments still wait when the worker goes
    # While the worker is busy, one waiting task is taken from the inbox as a worker would take it: after the
    # worker stops, ablations must find it orphaned mid-run (no worker, no process), kill it and queue it again.
    taken = None
    for msg in sorted((broker / "in").glob("*.celery.msg")):
        try:
            msg.rename(broker / "processed" / msg.name)
            taken = msg
            break
        except FileNotFoundError:                      # the worker took it first
            continue
    assert taken is not None
    run([sys.executable, "-m", "dvc", "queue", "stop"], repo)
    try:
        out, err = proc.communicate(timeout=900)       # without a new worker it would wait for ever
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "3 experiments planned, 0 already on this commit, 3 to run" in err, err[-3000:]
    assert "no DVC queue worker is left" in err, err[-3000:]
    assert f"td-b2000-s0 (task {orphan})" in err, err[-3000:]
    assert "already in the DVC queue on this commit, not queued again: ['td-b500-s0']" in err, err[-3000:]
    assert err.count("nothing runs it; killing it") >= 2, err[-3000:]   # the earlier run's orphan and the new one
    assert "failed:" not in err, err[-3000:]
    names = run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], repo).stdout.split()
    assert {"default-s0", "td-b500-s0", "td-b2000-s0"} <= set(names) and names.count("td-b500-s0") == 1, names
    text = (repo / "reports/ablations.md").read_text()
    table_d = text.split("## Table D")[1]
    assert "not run" not in table_d and "**Paper's ordering reproduced:" in table_d
    again = run([sys.executable, "-m", "pipeline.ablations", "run", "--tables", "td"], repo)
    assert "3 experiments planned, 3 already on this commit, 0 to run" in again.stderr
    assert subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=repo, capture_output=True,
                          text=True).stdout == ""                            # the workspace is left as it was


def test_make_ablations_runs_two_queue_workers_at_one_thread_each(smoke_repo, tmp_path):
    """`--jobs 2` (the Makefile's default): two DVC queue workers run the experiments, each experiment's stages at
    cores/2 torch threads (their closing log line says it), and every experiment lands on the commit."""
    import subprocess
    import sys
    from conftest import run, stage_env
    repo = tmp_path / "repo"
    shutil.copytree(smoke_repo, repo, symlinks=True)
    run(["git", "checkout", "-q", "--", "."], repo)
    run([sys.executable, "-m", "dvc", "checkout", "-f"], repo, check=False)
    env = {k: v for k, v in stage_env().items() if k != "SFO_THREADS"}
    p = subprocess.run([sys.executable, "-m", "pipeline.ablations", "run", "--tables", "td", "--jobs", "2"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "3 experiments planned, 0 already on this commit, 3 to run" in p.stderr, p.stderr[-3000:]
    assert "failed" not in p.stderr, p.stderr[-3000:]
    names = run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], repo).stdout.split()
    assert {"default-s0", "td-b500-s0", "td-b2000-s0"} <= set(names), names
    threads = max(1, (os.cpu_count() or 1) // 2)
    for name in ("td-b500-s0", "td-b2000-s0"):
        logs = run([sys.executable, "-m", "dvc", "queue", "logs", name], repo).stdout
        assert "sfo: done in" in logs and f"at {threads} torch threads" in logs, logs[-3000:]
    assert "not run" not in (repo / "reports/ablations.md").read_text().split("## Table D")[1]
