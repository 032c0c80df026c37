"""The GPU benchmark script stays runnable: its tiny configuration on CPU, seconds."""
import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("sft_lora", ["routed", "all"])
def test_gpu_flux_bench_runs_tiny_on_cpu(tmp_path, sft_lora):
    out = tmp_path / "bench_gpu.json"
    subprocess.run([sys.executable, "bench/gpu_flux.py", "--tiny", "--device", "cpu", "--size", "64",
                    "--pairs", "1", "2", "--warmup", "0", "--repeats", "1", "--sft-lora", sft_lora, "--out", str(out)],
                   cwd=REPO, check=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    result = json.loads(out.read_text())
    assert result["sft_lora"] == sft_lora
    assert [r["P"] for r in result["rows"]] == [1, 2]
    assert result["image_tokens"] == result["condition_tokens"] == 16
    for r in result["rows"]:
        assert r["sfo_step_s"] > 0 and r["sft_step_s"] > 0 and r["fwd_s"] > 0
