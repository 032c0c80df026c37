"""`make bench`: the hot paths of the embedded default pipeline on this machine -> reports/bench.json.

Every measure is the median of `--repeats` timed calls after `--warmup` untimed ones, on the default model
and batch of params.yaml (random weights: a step's cost does not depend on their values). What each key means
is in docs/performance.md. Run it on an otherwise idle machine; `--quick` is a seconds-long smoke run.

    python bench/cpu.py [--quick] [--out reports/bench.json]
    python bench/cpu.py --memory sft|sfo     # one training process; prints its peak resident memory (MB)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import config, evaluation, flow, manifest, stage, world  # noqa: E402
from pipeline.judges import AttributeReader, Judges, build_clip, build_dino, caption_tokenizer  # noqa: E402
from pipeline.model import SubjectFlux, adapters_disabled, add_lora  # noqa: E402
from pipeline.stages import cdns, prepare  # noqa: E402
from pipeline.stages.sfo import sfo_step  # noqa: E402

PARAMS = REPO / "params.yaml"


def median_time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load(*names):
    return config.load(*names, path=PARAMS)


def build_model(image_size: int | None = None) -> SubjectFlux:
    mcfg, w = load("model", "world")
    return SubjectFlux.build(mcfg, image_size or w.image_size, world.vocabulary(), seed=0)


def inputs(model: SubjectFlux, n: int, seed: int = 0):
    """n references, prompts, targets, negatives, eps and t, as the training loops build them."""
    g = torch.Generator().manual_seed(seed)
    side = model.image_size
    imgs = torch.rand(3, n, 3, side, side, generator=g) * 2 - 1
    prompts = bench_prompts(model, n, seed)
    model.text.encode(sorted(set(prompts)))                        # the stages fill this cache once
    c = model.condition(imgs[0], prompts)
    x, x_neg = model.tokens(imgs[1]), model.tokens(imgs[2])
    eps = torch.randn(x.shape, generator=g)
    t = flow.logit_normal(n, generator=g)
    return c, x, x_neg, eps, t


# ---------------------------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------------------------
def step_times(P: int, image_size: int | None, warmup: int, repeats: int, autocast: bool = False,
               compile: bool = False) -> dict:
    """fwd_s, sft_step_s and sfo_step_s on one model with one trainable LoRA (the SFO configuration);
    optionally under bf16 autocast, or with the forward compiled by torch.compile (`compile_s`: the first
    SFO step, compilation included)."""
    sfo_cfg, loss_cfg = load("sfo", "loss")
    model = build_model(image_size)
    params = add_lora(model, "sfo", sfo_cfg.lora_rank, sfo_cfg.lora_alpha)
    opt = torch.optim.AdamW(params, lr=sfo_cfg.lr)
    c, x, x_neg, eps, t = inputs(model, P)
    x_t = flow.interpolate(x, eps, t)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    first = {}
    if compile:
        model.forward = torch.compile(model.forward)
        t0 = time.perf_counter()
        loss = sfo_step(model, c, x, x_neg, t, eps, load("loss"))[0]
        loss.backward()
        first["compile_s"] = time.perf_counter() - t0

    def train(loss_fn):
        with amp:
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def fwd():
        with torch.no_grad(), amp:
            model(x_t, t, c)

    def sfo_unbatched():       # before pair batching: x+ and x- in separate calls, for policy and reference
        pairs = [(x, flow.interpolate(x, eps, t)), (x_neg, flow.interpolate(x_neg, eps, t))]
        with torch.no_grad(), adapters_disabled(model):
            ref = [flow.per_sample_error(model(xt, t, c), x0, eps) for x0, xt in pairs]
        pol = [flow.per_sample_error(model(xt, t, c), x0, eps) for x0, xt in pairs]
        return flow.sfo_loss(pol[0], pol[1], ref[0], ref[1], load("loss").beta)[0]

    out = {"fwd_s": median_time(fwd, warmup, repeats),
           "sft_step_s": median_time(lambda: train(lambda: flow.flow_loss(model(x_t, t, c), x, eps)), warmup, repeats),
           "sfo_step_s": median_time(lambda: train(lambda: sfo_step(model, c, x, x_neg, t, eps, loss_cfg)[0]),
                                     warmup, repeats)}
    out["sfo_step_over_floor"] = out["sfo_step_s"] / (2 * out["sft_step_s"] + 2 * out["fwd_s"])
    if not (autocast or compile):
        out["sfo_unbatched_step_s"] = median_time(lambda: train(sfo_unbatched), warmup, repeats)
        prompts = bench_prompts(model, P)

        def encode_uncached():
            model.text._cache.clear()
            model.condition(torch.zeros(P, 3, model.image_size, model.image_size), prompts)
        out["condition_uncached_s"] = median_time(encode_uncached, warmup, repeats)
        model.text.encode(prompts)
        out["condition_cached_s"] = median_time(
            lambda: model.condition(torch.zeros(P, 3, model.image_size, model.image_size), prompts), warmup, repeats)
    return {**out, **first}


def bench_prompts(model, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [world.prompt(s, world.sample_context(rng)) for s in world.sample_subjects(rng, n)]


def memory_process(kind: str, steps: int = 40):
    """A training process doing `steps` steps of a stage at its default batch (40: glibc's heap keeps growing for
    the first ~10-30 steps, then plateaus); prints its peak RSS in MB.
    sft: all transformer weights trainable (the sft stage), `sft.batch_size` samples; sfo: the LoRA of
    `sfo.lora_rank`, `sfo.pairs_per_step` pairs, the reference by switching the adapter off."""
    sft_cfg, sfo_cfg, loss_cfg = load("sft", "sfo", "loss")
    stage.set_threads()
    model = build_model()
    if kind == "sft":
        params = list(model.transformer.parameters())
        n = sft_cfg.batch_size
    else:
        params = add_lora(model, "sfo", sfo_cfg.lora_rank, sfo_cfg.lora_alpha)
        n = sfo_cfg.pairs_per_step
    opt = torch.optim.AdamW(params, lr=1e-4)
    c, x, x_neg, eps, t = inputs(model, n)
    for _ in range(steps):
        if kind == "sft":
            loss = flow.flow_loss(model(flow.interpolate(x, eps, t), t, c), x, eps)
        else:
            loss = sfo_step(model, c, x, x_neg, t, eps, loss_cfg)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(json.dumps({"kind": kind, "batch": n, "peak_rss_mb": stage.peak_rss_mb()}))


def peak_mb(kind: str, runs: int) -> dict:
    """Median over `runs` fresh processes: peak RSS moves by tens of MB from run to run (malloc arenas)."""
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--memory", kind], capture_output=True, text=True,
                             check=True, env=dict(os.environ, SFO_THREADS="2"))
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"batch": results[0]["batch"], "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
            "runs_mb": [r["peak_rss_mb"] for r in results]}


# ---------------------------------------------------------------------------------------------------------
# CDNS: Ray workers against an in-process loop
# ---------------------------------------------------------------------------------------------------------
def triplets(n: int, size: int) -> pa.Table:
    rng = np.random.default_rng(0)
    subjects = world.sample_subjects(rng, n)
    rows = [prepare.triplet_row(f"b-{i:05d}", i, s, world.sample_context(rng), size, (0.0, 0.0), "fixed")
            for i, s in enumerate(subjects)]
    return pa.Table.from_pylist(rows, schema=manifest.TRIPLET_SCHEMA)


def cdns_times(model_dir: str, table: pa.Table, workdir: Path, guidance: float, modes: list[tuple]) -> dict:
    """Seconds to turn every triplet into a negative, per mode: ("loop", threads) runs NegativeWorker in this
    process; ("ray", workers) runs the stage's actor pool with one thread per worker (actor start-up and model
    loading excluded: it is paid once per stage, see `ray_startup_s`)."""
    cfg, sampler = load("cdns", "sampler")
    shards = cdns.make_shards(table, cfg)
    out = {}
    for kind, k in modes:
        paths = [str(workdir / f"{kind}{k}-{i}.parquet") for i in range(len(shards))]
        if kind == "loop":
            worker = cdns.NegativeWorker(model_dir, sampler, guidance, threads=k)
            t0 = time.perf_counter()
            for shard, path in zip(shards, paths):
                worker.generate(shard, cfg, path)
            out[f"loop{k}"] = time.perf_counter() - t0
            torch.set_num_threads(2)
        else:
            wcfg = config.Cdns(**{**cfg.__dict__, "workers": k, "threads_per_worker": 1})
            t0 = time.perf_counter()
            ray = cdns.start_ray(wcfg)
            try:
                actors = cdns.start_workers(ray, wcfg, model_dir, sampler, guidance)
                t1 = time.perf_counter()
                cdns.run_shards(ray, actors, wcfg, shards, paths)
                out[f"ray{k}"] = time.perf_counter() - t1
                out[f"ray{k}_startup_s"] = t1 - t0
            finally:
                ray.shutdown()
        rows = sum(manifest.read(p, manifest.NEGATIVE_SCHEMA).num_rows for p in paths)
        assert rows == table.num_rows, (kind, k, rows)
    return out


# ---------------------------------------------------------------------------------------------------------
# Sampling, judging, no-op repro
# ---------------------------------------------------------------------------------------------------------
def sampling_and_judging(n: int, guidance: float, warmup: int, repeats: int) -> dict:
    sampler, w = load("sampler", "world")
    model = build_model().eval()
    t = triplets(n, w.image_size)
    refs = manifest.decode_column(t, "ref_png", "bench")
    prompts = t.column("prompt").to_pylist()
    model.text.encode(sorted(set(prompts)))
    seeds = list(range(n))
    gen_s = median_time(lambda: evaluation.generate(model, refs, prompts, seeds, sampler, guidance, "bench"),
                        min(warmup, 1), max(1, repeats // 3))
    tok = caption_tokenizer()
    judges = Judges(build_dino(w.image_size), build_clip(w.image_size, tok), tok, AttributeReader(w.image_size))
    imgs = evaluation.generate(model, refs, prompts, seeds, sampler, guidance, "bench")
    labels = {k: t.column(k).to_numpy() for k in world.ATTRS}
    truth = manifest.decode_column(t, "target_png", "bench")
    masks = manifest.decode_column(t, "mask_png", "bench")
    judge_s = median_time(lambda: judges.score(imgs, refs, prompts, labels, truth, masks), warmup, repeats)
    return {"sample_images_per_s": n / gen_s, "eval_images_per_s": n / judge_s, "sample_batch": sampler.batch_size,
            "sample_steps": sampler.steps, "sample_guidance": guidance, "sample_images": n}


def noop_repro(repeats: int) -> dict:
    """`dvc repro` with everything up to date: in this checkout when it is (after `make repro`), else in a
    copy running the tests' smoke params (a full DAG of the same stages, seconds to build)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    dvc = [sys.executable, "-m", "dvc"]
    status = subprocess.run(dvc + ["status", "--json"], cwd=REPO, capture_output=True, text=True, env=env)
    where, tmp = REPO, None
    if status.returncode != 0 or json.loads(status.stdout or "{}"):
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import make_smoke_repo                         # the tests' recipe for a small DAG
        tmp = Path(tempfile.mkdtemp(prefix="sfo-bench-"))
        where = make_smoke_repo(tmp / "repo")
        subprocess.run(dvc + ["repro", "-q"], cwd=where, check=True, env=dict(env, CI="1", SFO_THREADS="1"))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run(dvc + ["repro"], cwd=where, capture_output=True, text=True, check=True, env=env)
        times.append(time.perf_counter() - t0)
        assert "up to date" in out.stdout, out.stdout
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"noop_repro_s": statistics.median(times), "noop_repro_where": "checkout" if tmp is None else "smoke copy"}


# ---------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "reports" / "bench.json"))
    ap.add_argument("--quick", action="store_true", help="few repeats and small sizes: checks that it runs")
    ap.add_argument("--memory", choices=("sft", "sfo"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    stage.quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.memory:
        return memory_process(args.memory)
    os.environ.setdefault("CI", "1")                                  # no progress bars inside the timings
    torch.set_num_threads(2)
    warmup, repeats = (1, 2) if args.quick else (3, 10)
    sfo_cfg, w, cdns_cfg = load("sfo", "world", "cdns")
    P = sfo_cfg.pairs_per_step
    guidance_file = REPO / evaluation.GUIDANCE_FILE
    guidance = json.loads(guidance_file.read_text())["chosen"] if guidance_file.exists() else 1.5
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch": torch.__version__, "threads": torch.get_num_threads()},
           "pairs": P, "image_size": w.image_size}
    log = stage.log.info

    log("bench: training steps at P=%d", P)
    res.update(step_times(P, None, warmup, repeats))
    res["bf16_autocast"] = step_times(P, None, warmup, repeats, autocast=True)
    if not args.quick:
        res["torch_compile"] = step_times(P, None, warmup, repeats, compile=True)

    log("bench: peak memory of the training processes")
    runs = 1 if args.quick else 3
    sft_mem, sfo_mem = peak_mb("sft", runs), peak_mb("sfo", runs)
    res.update({"sft_peak_mb": sft_mem["peak_rss_mb"], "sfo_peak_mb": sfo_mem["peak_rss_mb"],
                "sft_peak_runs_mb": sft_mem["runs_mb"], "sfo_peak_runs_mb": sfo_mem["runs_mb"],
                "sft_mem_batch": sft_mem["batch"], "sfo_mem_pairs": sfo_mem["batch"]})
    res["sfo_over_sft_mem"] = res["sfo_peak_mb"] / res["sft_peak_mb"]

    log("bench: CDNS")
    sizes = (16, 32) if args.quick else (cdns_cfg.shard_rows * 2, cdns_cfg.shard_rows * 4)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model().save_pretrained(tmp / "model")
        small = cdns_times(str(tmp / "model"), triplets(sizes[0], w.image_size), tmp, guidance,
                           [("loop", 2), ("ray", 1), ("ray", 2)])
        large = cdns_times(str(tmp / "model"), triplets(sizes[1], w.image_size), tmp, guidance, [("ray", 2)])
    res["cdns_images_per_s"] = {"loop_2_threads": sizes[0] / small["loop2"], "ray_1_worker": sizes[0] / small["ray1"],
                                "ray_2_workers": sizes[0] / small["ray2"]}
    res["ray_over_loop"] = small["loop2"] / small["ray2"]
    res["ray_2_over_1_workers"] = small["ray1"] / small["ray2"]
    res["ray_startup_s"] = small["ray2_startup_s"]
    res["cdns_scaling"] = [{"triplets": sizes[0], "ray2_s": small["ray2"]}, {"triplets": sizes[1], "ray2_s": large["ray2"]}]

    log("bench: sampling and judging")
    res.update(sampling_and_judging(64 if args.quick else 256, guidance, warmup, repeats))

    log("bench: how the SFO step grows with P and image size")
    res["sfo_scaling"] = [{"P": p, "image_size": s, **step_times(p, s, warmup, repeats)}
                          for s in (w.image_size, 2 * w.image_size) for p in (1, 2, 4, 8)]

    log("bench: no-op dvc repro")
    res.update(noop_repro(2 if args.quick else 3))

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                      if not isinstance(v, (list, dict))}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
