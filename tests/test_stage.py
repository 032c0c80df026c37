"""pipeline.stage helpers that every stage's log relies on."""
import subprocess
import sys

import numpy as np

from pipeline import stage

from conftest import REPO


def test_peak_rss_is_the_process_own_not_its_parents():
    """A stage is a child of `dvc`: its logged peak must not be its parent's size (ru_maxrss on Linux is)."""
    big = np.ones(400 * 2**20, np.uint8)   # 400 MB resident in this (parent) process
    assert stage.peak_rss_mb() > 400
    child = subprocess.run([sys.executable, "-c", "from pipeline import stage; print(stage.peak_rss_mb())"],
                           cwd=REPO, capture_output=True, text=True, check=True)
    assert float(child.stdout) < 300, child.stdout
    del big
