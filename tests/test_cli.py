"""`sfo generate` driven as a user would: a subprocess, on the smoke DAG's trained models."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import stage_env


def sfo(repo, *args):
    exe = Path(sys.executable).parent / "sfo"                      # the console script pyproject installs
    return subprocess.run([str(exe), "generate", *args], cwd=repo, env=stage_env(), capture_output=True, text=True)


@pytest.fixture(scope="module")
def drawn_png(tmp_path_factory):
    """A reference drawn here, not by the world: a red disc with a yellow stripe on grey, 50 x 50 px."""
    yy, xx = np.mgrid[:50, :50]
    img = np.full((50, 50, 3), 190, np.uint8)
    disc = (yy - 25) ** 2 + (xx - 25) ** 2 < 15 ** 2
    img[disc] = (200, 30, 30)
    img[disc & (abs(yy - 25) < 3)] = (240, 220, 40)
    path = tmp_path_factory.mktemp("ref") / "drawn.png"
    Image.fromarray(img).save(path)
    return path


@pytest.mark.parametrize("model", ["models/sfo", "models/sft"])
def test_generate_sizes_and_seeds(smoke_repo, drawn_png, tmp_path, model):
    args = ["--model", model, "--ref", str(drawn_png), "--prompt", "a photo of a circle on a beach", "--size", "64"]
    a = sfo(smoke_repo, *args, "--out", str(tmp_path / "a.png"), "--seed", "1", "--num-images", "2", "--steps", "3")
    assert a.returncode == 0, a.stderr
    b = sfo(smoke_repo, *args, "--out", str(tmp_path / "b.png"), "--seed", "1", "--steps", "3")
    assert b.returncode == 0, b.stderr
    first, second, again = (np.asarray(Image.open(tmp_path / f)) for f in ("a-0.png", "a-1.png", "b.png"))
    assert first.shape == (64, 64, 3)
    assert not np.array_equal(first, second)          # seeds 1 and 2 differ
    assert np.array_equal(first, again)               # seed 1 twice: the same image
    assert "resized to 64 px" in a.stdout


def test_generate_from_a_bench_reference_through_python_m(smoke_repo, tmp_path):
    import pyarrow.parquet as pq
    ref = pq.read_table(smoke_repo / "data/bench").column("ref_png")[0].as_py()
    (tmp_path / "ref.png").write_bytes(ref)
    p = subprocess.run([sys.executable, "-m", "pipeline", "generate", "--model", "models/sfo", "--ref",
                        str(tmp_path / "ref.png"), "--prompt", "a photo of a square", "--out", str(tmp_path / "o.png"),
                        "--steps", "2", "--guidance", "1.5"], cwd=smoke_repo, env=stage_env(), capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "o.png").size == (32, 32) and "guidance 1.5 (from --guidance)" in p.stdout


@pytest.mark.parametrize("change,message", [
    ({"--model": "models/nowhere"}, "models/nowhere: no such model directory"),
    ({"--model": "data/train"}, "data/train: not a model directory written by the sft or sfo stage"),
    ({"--ref": "README.md"}, "README.md: not a readable image"),
    ({"--ref": "missing.png"}, "missing.png: no such image file"),
    ({"--prompt": "  "}, "--prompt is empty"),
])
def test_generate_refuses_bad_input(smoke_repo, drawn_png, tmp_path, change, message):
    args = {"--model": "models/sfo", "--ref": str(drawn_png), "--prompt": "a circle", "--out": str(tmp_path / "x.png")}
    args.update(change)
    p = sfo(smoke_repo, *[v for kv in args.items() for v in kv])
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_non_square_reference_is_centre_cropped_not_squashed(tmp_path):
    """A 60 x 20 strip: blue 20 px at each end, a red 20 x 20 square in the middle. Cropped, only red is left;
    squashed to a square, a third of it would be blue."""
    from pipeline.cli import load_reference
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :20] = img[:, 40:] = (0, 0, 255)
    img[:, 20:40] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "strip.png")
    ref = load_reference(str(tmp_path / "strip.png"), 32)
    assert ref.shape == (32, 32, 3)
    assert ref[..., 0].min() > 200 and ref[..., 2].max() < 50
