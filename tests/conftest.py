import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Tiny sizes for running the whole DAG in a test: every stage, every code path, seconds each.
SMOKE_PARAMS = {
    "prepare": {"train_subjects": 24, "targets_per_subject": 2, "shard_rows": 16},
    "bench": {"subjects": 3, "prompts_per_subject": 2, "seeds": 2, "val_subjects": 2},
    "judges": {"train_renders": 64, "val_renders": 16, "batch_size": 16, "attr_steps": 3, "dino_steps": 3,
               "clip_steps": 3, "dino_near_miss_negatives": True},
    "model": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
              "axes_dims_rope": [4, 6, 6], "text_dim": 16, "pooled_dim": 16},
    "sft": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 2, "ref_blur_prob": 0.5},
    "train": {"checkpoint_every": 2},
    "sampler": {"steps": 2, "batch_size": 4},
    "guidance": {"scales": [1.0, 2.0]},
    "cdns": {"num_triplets": 10, "shard_rows": 4, "workers": 2},
    "sfo": {"steps": 3, "pairs_per_step": 2, "log_every": 1, "lr": 0.01},
    "evaluate": {"grid_subjects": 2},
}


def smoke_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in SMOKE_PARAMS.items():
        params[section].update(values)
    return params


def stage_env() -> dict:
    """The environment a stage runs in: this interpreter's venv first on PATH (dvc.yaml calls `python`)."""
    env = dict(os.environ, CI="1", SFO_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-6000:]}")
    return p


def copy_repo(dst: Path) -> Path:
    """A copy of the working tree without outputs, venv or history, as a fresh git + DVC repo."""
    ignore = shutil.ignore_patterns(".venv", ".git", "data", "models", "reports", "dvc.lock", "__pycache__",
                                    ".pytest_cache", "cache", "tmp", "*.egg-info")
    shutil.copytree(REPO, dst, ignore=ignore, dirs_exist_ok=True)
    return dst


def git_commit(repo: Path, message: str):
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], repo)


def make_smoke_repo(dst: Path) -> Path:
    """A copy of the project with smoke params, committed in a new git repo (its DAG not yet run)."""
    repo = copy_repo(dst)
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    run(["git", "init", "-q"], repo)
    git_commit(repo, "smoke")
    return repo


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory) -> Path:
    """A copy of the project with smoke params, its DAG reproduced once (shared by the end-to-end tests)."""
    repo = make_smoke_repo(tmp_path_factory.mktemp("smoke") / "repo")
    p = run([sys.executable, "-m", "dvc", "repro"], repo)
    (repo / "repro.log").write_text(p.stdout + p.stderr)
    git_commit(repo, "smoke run")
    return repo


@pytest.fixture
def work_repo(smoke_repo, tmp_path):
    """A copy of the smoke repo with all its outputs (an uninterrupted run), to kill stages or plant bad
    input in; stages are run in it directly, without DVC."""
    dst = tmp_path / "repo"
    shutil.copytree(smoke_repo, dst, symlinks=True, ignore=shutil.ignore_patterns(".dvc", ".git"))
    return dst
