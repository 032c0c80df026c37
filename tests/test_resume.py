"""Kills cost no data and no correctness: a stage SIGKILLed at a fault point, then rerun, writes exactly what
an uninterrupted run writes (the smoke DAG of conftest.py is the uninterrupted run)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import stage_env
from pipeline import checkpoint, config

OUTPUTS = {
    "sft": ["models/sft", "reports/sft/train.csv", "checkpoints/sft"],
    "sfo": ["models/sfo", "reports/sfo/train.csv", "checkpoints/sfo"],
    "cdns": ["data/negatives", "reports/cdns.json", "checkpoints/cdns"],
}


def tree_bytes(root, paths) -> dict:
    out = {}
    for rel in paths:
        p = root / rel
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f.relative_to(root))] = f.read_bytes()
    return out


def run_stage(repo, name, fault=None, once=None, args=()):
    env = stage_env()
    env.pop("SFO_FAULT", None)
    if fault:
        env["SFO_FAULT"] = fault
    if once:
        env["SFO_FAULT_ONCE"] = str(once)
    return subprocess.run([sys.executable, "-m", f"pipeline.stages.{name}", *args], cwd=repo, env=env,
                          capture_output=True, text=True)


KILLS = [
    ("sft", "sft:step:1"),                 # mid-step, before any checkpoint
    ("sft", "sft:checkpoint-write:1"),     # mid-checkpoint: weights written, not yet renamed
    ("sft", "sft:step:3"),                 # mid-step after the checkpoint of step 2: resumes from it
    ("sft", "sft:save:1"),                 # training done, outputs not yet written
    ("sfo", "sfo:step:1"),
    ("sfo", "sfo:checkpoint-write:1"),
    ("sfo", "sfo:step:3"),
    ("cdns", "cdns:shard-done:1"),         # one shard written, the other worker mid-shard
    ("cdns", "cdns:shard-done:2"),
    ("cdns", "cdns:manifest:1"),           # all shards written, manifest not yet
]


@pytest.mark.parametrize("name,fault", KILLS, ids=[f for _, f in KILLS])
def test_killed_stage_resumes_to_identical_outputs(smoke_repo, work_repo, name, fault):
    expected = tree_bytes(smoke_repo, OUTPUTS[name])
    killed = run_stage(work_repo, name, fault)
    assert killed.returncode == -9, killed.stderr[-2000:]                 # really SIGKILLed at the fault point
    resumed = run_stage(work_repo, name)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if fault in ("sft:step:3", "sfo:step:3"):
        assert "resumed from step 2" in resumed.stderr
    got = tree_bytes(work_repo, OUTPUTS[name])
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k] == expected[k], k


def test_a_lost_ray_worker_costs_no_row(smoke_repo, work_repo, tmp_path):
    """One Ray worker SIGKILLs itself mid-shard (once across processes); Ray restarts it and retries the task."""
    expected = tree_bytes(smoke_repo, OUTPUTS["cdns"])
    p = run_stage(work_repo, "cdns", "cdns:worker-shard:1", once=tmp_path / "killed-once")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "killed-once").exists()                          # a worker did die
    got = tree_bytes(work_repo, OUTPUTS["cdns"])
    assert got == expected
    import pyarrow.parquet as pq
    ids = pq.read_table(work_repo / "data/negatives/manifest.parquet").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 10


def test_unfinished_work_under_other_params_is_refused(work_repo):
    killed = run_stage(work_repo, "sfo", "sfo:step:3")
    assert killed.returncode == -9
    params = yaml.safe_load((work_repo / "params.yaml").read_text())
    old = params["loss"]["beta"]
    params["loss"]["beta"] = old * 2
    (work_repo / "params.yaml").write_text(yaml.safe_dump(params))
    p = run_stage(work_repo, "sfo")
    assert p.returncode == 2
    assert "checkpoints/sfo" in p.stderr and f"loss.beta: {float(old)!r} -> {float(old * 2)!r}" in p.stderr


def test_a_checkpoint_holding_a_pickle_payload_is_refused_without_running_it(tmp_path):
    """optimizer.pt is read with weights_only=True: a crafted pickle that would run code is refused."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    work = checkpoint.WorkDir(tmp_path / "ckpt", {"params": {}, "inputs": {}})
    work.save(1, model, opt, {}, {}, "test")
    torch.save(Payload(), tmp_path / "ckpt" / "step-000001" / "optimizer.pt")
    with pytest.raises(config.ConfigError, match="unreadable checkpoint"):
        work.resume(model, opt, {})
    assert not marker.exists()


def test_a_truncated_checkpoint_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    work = checkpoint.WorkDir(tmp_path / "ckpt", {"params": {}, "inputs": {}})
    work.save(1, model, opt, {}, {"rows": []}, "test")
    w = tmp_path / "ckpt" / "step-000001" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:20])
    with pytest.raises(config.ConfigError, match="step-000001"):
        work.resume(model, opt, {})


def test_checkpoint_roundtrip_restores_weights_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    work = checkpoint.WorkDir(tmp_path / "ckpt", {"params": {"a": 1}, "inputs": {}})
    work.save(7, model, opt, {"data": g}, {"rows": [{"loss": float("nan")}], "window": [0.1]}, "test")
    expected_next = torch.rand(3, generator=g)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model2 = torch.nn.Linear(3, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    g2 = torch.Generator().manual_seed(99)
    step, extra = checkpoint.WorkDir(tmp_path / "ckpt", {"params": {"a": 1}, "inputs": {}}).resume(model2, opt2, {"data": g2})
    assert step == 7 and extra["window"] == [0.1]
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(torch.rand(3, generator=g2), expected_next)
    assert json.dumps(opt2.state_dict()["param_groups"]) == json.dumps(opt.state_dict()["param_groups"])
