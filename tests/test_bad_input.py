"""Bad input stops a stage: exit status 2, a message naming the key, file or row, and nothing written.

Each case runs the stage as DVC does (a subprocess in a copy of the smoke repo, with every upstream output in
place), after planting one bad input; the stage's outputs must be byte-identical before and after."""
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from test_resume import OUTPUTS, run_stage, tree_bytes


def set_param(repo, section, key, value):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.setdefault(section, {})[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def corrupt_negative(repo):
    path = repo / "data/negatives/manifest.parquet"
    t = pq.read_table(path)
    col = t.column("neg_png").to_pylist()
    col[3] = b"\x89PNG\r\n\x1a\n truncated"
    pq.write_table(t.set_column(t.schema.get_field_index("neg_png"), "neg_png", pa.array(col, pa.binary())), path)


def control_sampled_at_another_guidance(repo):
    import json
    path = repo / "reports/eval/control/metrics.json"
    ev = json.loads(path.read_text())
    path.write_text(json.dumps({**ev, "guidance": ev["guidance"] + 1.0}))


def drop_prompt(repo):
    path = next((repo / "data/train").glob("shard-*.parquet"))
    t = pq.read_table(path)
    pq.write_table(t.drop_columns(["prompt"]), path)


def corrupt_train_target(repo):
    path = repo / "data/train/shard-00000.parquet"
    t = pq.read_table(path)
    col = t.column("target_png").to_pylist()
    col[3] = b"not a png"
    pq.write_table(t.set_column(t.schema.get_field_index("target_png"), "target_png", pa.array(col, pa.binary())),
                   path)


CASES = {
    "negative beta": ("sfo", lambda r: set_param(r, "loss", "beta", -1.0), "loss.beta must be a finite number > 0"),
    "corrupt negative image": ("sfo", corrupt_negative, r"row id='train-\d+-\d+' column 'neg_png'"),
    "unknown degradation": ("cdns", lambda r: set_param(r, "cdns", "image", "sharpen"), "cdns.image must be one of"),
    "indivisible image size": ("sft", lambda r: set_param(r, "model", "patch_size", 5),
                               "model.patch_size=5 does not divide the image size 32"),
    "params of a stage that does not exist": ("sft", lambda r: set_param(r, "distill", "steps", 3),
                                              r"unknown section\(s\) \['distill'\]"),
    "manifest without a column": ("sft", drop_prompt, "missing required column 'prompt'"),
    "corrupt image in a CDNS shard": ("cdns", corrupt_train_target,
                                      r"cdns: shard \d+ \(rows 'train-.*'\) failed: ConfigError: data/train: "
                                      r"row id='train-\d+-\d+' column 'target_png': image bytes cannot be decoded"),
    "models evaluated unalike": ("metrics", control_sampled_at_another_guidance,
                                 r"reports/eval/control/metrics.json: sampled unlike reports/eval/sft.*'guidance'"),
    "missing judges": ("evaluate", lambda r: shutil.rmtree(r / "models/judges/reader"), "judge missing"),
}
OUTPUTS = {**OUTPUTS, "evaluate": ["reports/eval/sft", "checkpoints/evaluate-sft"], "metrics": ["reports/metrics.json"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_stops_the_stage_before_it_writes(work_repo, case):
    stage, plant, message = CASES[case]
    outputs = [o for o in OUTPUTS[stage] if o != "checkpoints/cdns"]    # cdns may keep the valid shards
    before = tree_bytes(work_repo, outputs)
    plant(work_repo)
    p = run_stage(work_repo, stage, args=["--model", "sft"] if stage == "evaluate" else [])
    assert p.returncode == 2, p.stderr[-3000:]
    assert re.search(message, p.stderr), p.stderr[-2000:]
    assert tree_bytes(work_repo, outputs) == before
