"""CDNS negatives from a tiny real model, without Ray: every degradation, and independence from sharding."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import config, degrade, manifest, world
from pipeline.model import SubjectFlux
from pipeline.stages import prepare
from pipeline.stages.cdns import NegativeWorker, negative_seed

TINY = config.Model(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                    axes_dims_rope=[4, 6, 6], text_dim=16, pooled_dim=16)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft")
    SubjectFlux.build(TINY, 32, world.vocabulary(), seed=0).save_pretrained(path)
    return NegativeWorker(str(path), config.Sampler(steps=2, batch_size=3), guidance=1.0, threads=1)


@pytest.fixture(scope="module")
def shard():
    rows, _ = prepare.bench_rows(config.World(), config.Bench(subjects=2, prompts_per_subject=2))
    keys = ("id", "ref_png", "target_png", "prompt", "generic_prompt", "cls", "background", "position", "size")
    out = {k: [r[k] for r in rows] for k in keys}
    out["seed"] = [negative_seed(0, i) for i in range(len(rows))]
    return out


def run(worker, shard, tmp_path, name="s.parquet", **cfg):
    path = worker.generate(shard, config.Cdns(**cfg), str(tmp_path / name))
    return pq.read_table(path)


@pytest.mark.parametrize("image", config.Cdns.IMAGE_CHOICES)
@pytest.mark.parametrize("text", config.Cdns.TEXT_CHOICES)
def test_every_degradation_runs_and_is_recorded(worker, shard, tmp_path, image, text):
    t = run(worker, shard, tmp_path, image=image, text=text)
    assert t.num_rows == 4 and t.column("id").to_pylist() == shard["id"]
    assert set(t.column("image_degradation").to_pylist()) == {image}
    cond = manifest.decode_column(t, "cond_png", "t")
    refs = np.stack([manifest.decode_png(b, "r") for b in shard["ref_png"]])
    targets = np.stack([manifest.decode_png(b, "r") for b in shard["target_png"]])
    expected = {"none": refs, "semantic": targets, "blur": np.stack([degrade.blur(r, 2.0) for r in refs])}
    if image in expected:
        assert np.array_equal(cond, expected[image])
    else:
        assert not np.array_equal(cond, refs)
    prompts = t.column("neg_prompt").to_pylist()
    if text == "generic":
        assert prompts == shard["generic_prompt"]
    elif text == "none":
        assert prompts == shard["prompt"]
    else:
        assert all(p != q and p.split()[2] == q.split()[2] for p, q in zip(prompts, shard["prompt"]))
    assert manifest.decode_column(t, "neg_png", "t").shape == (4, 32, 32, 3)


def test_negatives_do_not_depend_on_sharding(worker, shard, tmp_path):
    whole = run(worker, shard, tmp_path, "whole.parquet", image="noise", text="perturbed")
    halves = [run(worker, {k: v[sl] for k, v in shard.items()}, tmp_path, f"h{i}.parquet", image="noise",
                  text="perturbed") for i, sl in enumerate((slice(0, 1), slice(1, 4)))]
    for col in ("neg_png", "cond_png", "neg_prompt"):
        assert whole.column(col).to_pylist() == sum((h.column(col).to_pylist() for h in halves), [])


def test_fewer_gpus_than_workers_are_shared_instead_of_waited_for():
    from pipeline.stages.cdns import gpus_per_worker
    assert gpus_per_worker(2, 0) == 0.0            # CPU: no GPU asked for
    assert gpus_per_worker(4, 4) == 1.0 and gpus_per_worker(2, 8) == 1.0
    assert gpus_per_worker(2, 1) == 0.5 and gpus_per_worker(4, 1) == 0.25
