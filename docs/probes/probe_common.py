"""What the probes in docs/probes share (not part of the project): a scratch worktree of this commit whose
inputs are links to the repository's, and the paired differences the `metrics` stage reports."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline import evaluation
from pipeline.stages import metrics


def make_worktree(repo: Path, work: Path, linked: tuple[str, ...]):
    """`git worktree add` of HEAD at `work`, with `linked` paths symlinked to `repo`'s and `repo`'s params.yaml
    and chosen guidance copied in."""
    if work.exists():
        sys.exit(f"{work} exists: remove it with `git worktree remove --force {work}` (or `git worktree prune` "
                 f"if it is gone but still registered)")
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(work), "HEAD"], check=True)
    for p in linked:
        (work / p).parent.mkdir(parents=True, exist_ok=True)
        (work / p).symlink_to(repo / p)
    shutil.copy(repo / "params.yaml", work / "params.yaml")
    (work / "reports").mkdir(exist_ok=True)
    shutil.copy(repo / evaluation.GUIDANCE_FILE, work / evaluation.GUIDANCE_FILE)


def run_stages(work: Path, *stages: str):
    """Run the project's stages in `work`, in order, as `dvc repro` would: each of `stages` is a stage module
    and its arguments, e.g. "evaluate --model sfo"."""
    for stage in stages:
        name, *args = stage.split()
        subprocess.run([sys.executable, "-m", f"pipeline.stages.{name}", *args], cwd=work, check=True)


def paired(base_dir: Path, other_dir: Path) -> str:
    """Mean per-image difference other - base and its paired standard error, as the `metrics` stage computes them."""
    a, b = metrics.per_image(str(base_dir)), metrics.per_image(str(other_dir))
    return ", ".join(f"{m} {np.mean(b[m] - a[m]):+.4f} ± {metrics.paired_sem(a, b, m):.4f}"
                     for m in evaluation.measures(a))
