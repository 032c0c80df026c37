"""Stage `cdns`: Condition-Degradation Negative Sampling on Ray (METHOD.md section 3).

Reads params `cdns` and `sampler`, `data/train`, `models/sft` and `reports/guidance.json`. For the first
`cdns.num_triplets` training triplets, the SFT base samples one negative from degraded conditions
(`cdns.image`, `cdns.text`; by default a blurred reference and the generic prompt, see pipeline/degrade.py) with
the evaluation's sampler settings and guidance scale. Ray actors each load the model once and take shards of
rows (one GPU per actor where CUDA exists, one CPU slot each here); each shard is a Parquet file written under
a temporary name and renamed. The driver then joins the shards into `data/negatives/manifest.parquet`
(manifest.NEGATIVE_SCHEMA), exactly one row per input triplet, and writes `reports/cdns.json`.

A negative's noise and degradation randomness come from its own seed (`cdns.seed` and the row's index), so
the output does not depend on the number of workers or on which worker took which shard.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .. import config, degrade, evaluation, manifest, stage, world
from ..model import SubjectFlux, seeded_noise

DATA, MODEL, OUT_DIR, REPORT = "data/train", "models/sft", "data/negatives", "reports/cdns.json"


SEED_TAG = 1   # keeps the negatives' noise streams apart from evaluation's (evaluation.SEED_TAG)


def negative_seed(base: int, index: int) -> int:
    return stage.derive_seed(SEED_TAG, base, index)


class NegativeWorker:
    """One per GPU (or CPU slot): loads the SFT base once, then turns shards of rows into negatives."""

    def __init__(self, model_dir: str, sampler: config.Sampler, guidance: float, threads: int):
        torch.set_num_threads(threads)
        self.sampler, self.guidance = sampler, guidance
        self.model = SubjectFlux.from_pretrained(model_dir).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")

    def generate(self, shard: dict, cfg: config.Cdns, out_path: str) -> str:
        cond, prompts = [], []
        for i, row_id in enumerate(shard["id"]):
            where = f"{DATA}: row id={row_id!r}"
            rng = np.random.default_rng(shard["seed"][i])     # the row's own stream: same result on any worker
            ref, target = (manifest.decode_png(shard[c][i], where) for c in ("ref_png", "target_png"))
            ctx = world.Context(shard["background"][i], shard["position"][i], shard["size"][i])
            cond.append(degrade.degrade_image(ref, target, cfg.image, cfg.blur_radius, cfg.noise_std, rng))
            prompts.append(degrade.degrade_text(shard["prompt"][i], shard["generic_prompt"][i], cfg.text,
                                                shard["cls"][i], ctx, rng))
        cond = np.stack(cond)
        negs = []
        device = next(self.model.parameters()).device
        s = self.sampler
        for i in range(0, len(cond), s.batch_size):
            sl = slice(i, i + s.batch_size)
            noise = seeded_noise(shard["seed"][sl], (3, *cond.shape[1:3])).to(device)
            x = self.model.sample(torch.from_numpy(manifest.to_float(cond[sl])).to(device), prompts[sl], noise,
                                  s.steps, self.guidance, s.shift)
            negs.extend(manifest.to_uint8(x))
        rows = [{"id": i, "neg_png": manifest.encode_png(n), "cond_png": manifest.encode_png(c), "neg_prompt": p,
                 "image_degradation": cfg.image, "text_degradation": cfg.text, "blur_radius": cfg.blur_radius,
                 "noise_std": cfg.noise_std, "seed": sd} for i, n, c, p, sd in zip(shard["id"], negs, cond, prompts, shard["seed"])]
        manifest.write_table_atomic(pa.Table.from_pylist(rows, schema=manifest.NEGATIVE_SCHEMA), out_path)
        return out_path


def start_ray(cfg: config.Cdns):
    import ray
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False)
    else:   # a private local instance, listening on loopback only
        ray.init(num_cpus=cfg.workers * cfg.threads_per_worker, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", configure_logging=False)
    return ray


def main():
    cfg, sampler = config.load("cdns", "sampler")
    guidance = evaluation.chosen_guidance()
    table = manifest.read(DATA)
    if not (Path(MODEL) / "subject_flux.json").exists():
        raise config.ConfigError(f"{MODEL}: no trained SFT base; run `dvc repro sft`")
    n = table.num_rows if cfg.num_triplets == 0 else min(cfg.num_triplets, table.num_rows)
    table = table.slice(0, n)
    data = {k: table.column(k).to_pylist() for k in ("id", "ref_png", "target_png", "prompt", "generic_prompt",
                                                       "cls", "background", "position", "size")}
    data["seed"] = [negative_seed(cfg.seed, i) for i in range(n)]
    shards = [{k: v[i:i + cfg.shard_rows] for k, v in data.items()} for i in range(0, n, cfg.shard_rows)]
    shard_dir = Path(OUT_DIR) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    paths = [str((shard_dir / f"shard-{k:05d}.parquet").resolve()) for k in range(len(shards))]

    ray = start_ray(cfg)
    try:
        gpus = 1 if torch.cuda.is_available() else 0
        actor_cls = ray.remote(num_cpus=cfg.threads_per_worker, num_gpus=gpus)(NegativeWorker)
        actors = [actor_cls.remote(str(Path(MODEL).resolve()), sampler, guidance, cfg.threads_per_worker)
                  for _ in range(cfg.workers)]
        pool = ray.util.ActorPool(actors)
        jobs = pool.map_unordered(lambda a, job: a.generate.remote(job[0], cfg, job[1]), list(zip(shards, paths)))
        for _ in stage.progress(jobs, total=len(shards), desc="cdns: shards"):
            pass
    finally:
        ray.shutdown()

    negatives = pa.concat_tables([manifest.read(p, manifest.NEGATIVE_SCHEMA) for p in paths])
    if negatives.column("id").to_pylist() != data["id"]:
        raise RuntimeError("cdns: the shards do not hold exactly one negative per input triplet, in order")
    manifest.write_table_atomic(negatives, Path(OUT_DIR) / "manifest.parquet")
    report = {"negatives": n, "shards": len(shards), "workers": cfg.workers, "image": cfg.image,
              "text": cfg.text, "blur_radius": cfg.blur_radius, "noise_std": cfg.noise_std, "guidance": guidance,
              "sampler": sampler.__dict__}
    stage.write_json(REPORT, report)
    stage.log.info("cdns: %d negatives in %d shards by %d Ray workers", n, len(shards), cfg.workers)
    return [OUT_DIR, REPORT]


if __name__ == "__main__":
    stage.run("cdns", main)
