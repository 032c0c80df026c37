"""The standard errors of the final table (`pipeline/stages/metrics.py`), on differences worked out by hand."""
import math

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.stages import metrics

# Six images: three bench rows, two seeds each; each test says which subject each row belongs to
KEY = [("r0", 1), ("r0", 2), ("r1", 1), ("r1", 2), ("r2", 1), ("r2", 2)]
A = {"key": KEY, "dino": np.zeros(6)}
B = {"key": KEY, "dino": np.array([1.0, 3.0, 4.0, 6.0, 8.0, 8.0])}


def test_paired_sem_treats_every_image_as_independent():
    d = B["dino"]
    assert metrics.paired_sem(A, B, "dino") == pytest.approx(np.std(d, ddof=1) / math.sqrt(6))


def test_subject_sem_is_the_standard_error_of_the_subject_means():
    # one subject per row: means 2, 5, 8 -> sd 3 -> SE 3 / sqrt(3)
    assert metrics.subject_sem(A, B, "dino", {"r0": 0, "r1": 1, "r2": 2}) == pytest.approx(3 / math.sqrt(3))
    # rows r0 and r1 one subject: means 3.5 and 8 -> sd 4.5 / sqrt(2) -> SE 2.25
    assert metrics.subject_sem(A, B, "dino", {"r0": 7, "r1": 7, "r2": 9}) == pytest.approx(2.25)
    # a single subject has no spread to measure
    assert math.isnan(metrics.subject_sem(A, B, "dino", {"r0": 0, "r1": 0, "r2": 0}))


def test_differences_need_the_same_images_in_the_same_order():
    shuffled = {"key": KEY[::-1], "dino": B["dino"]}
    with pytest.raises(ConfigError, match="same images"):
        metrics.subject_sem(A, shuffled, "dino", {"r0": 0, "r1": 1, "r2": 2})
    with pytest.raises(ConfigError, match="same images"):
        metrics.paired_sem(A, shuffled, "dino")


@pytest.mark.parametrize("stage_module, absent", [
    ("pipeline.stages.report", ("diffusers", "peft", "transformers")),
    ("pipeline.stages.metrics", ("diffusers", "peft")),
])
def test_light_stages_do_not_import_the_model_libraries(stage_module, absent):
    """`report` and `metrics` run in every ablation experiment: importing diffusers and peft (which they do not use)
    cost each about 3 s. A fresh interpreter, as DVC starts it, after what `stage.run` does before `main`."""
    import subprocess
    import sys
    code = (f"import sys, {stage_module}, pipeline.stage as s; s.quiet_libraries(load=False); "
            f"print(' '.join(m for m in {absent!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
