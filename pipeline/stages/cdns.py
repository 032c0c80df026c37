"""Stage `cdns`: Condition-Degradation Negative Sampling on Ray (METHOD.md section 3).

Reads params `cdns`, `sampler` and `sfo.pairs`, `data/train`, `models/sft`, `models/judges` and
`reports/guidance.json`. For the first `cdns.num_triplets` training triplets, the SFT base samples one negative from
degraded conditions (`cdns.image`, `cdns.text`, pipeline/degrade.py; by default a blurred reference and the full
prompt: docs/calibration.md says why the generic prompt is not the default here) with the evaluation's sampler
settings and guidance scale. The paper's other pair constructions are made here too: `sfo.pairs: self_play` samples
the negative from the undegraded conditions; `judge_dpo` samples twice from them and the DINO judge's preferred
sample becomes the positive (`pos_png`); `sft_additional` keeps CDNS negatives, which the `sfo` stage then does not
use. Ray actors each load the model once and take shards of rows (one GPU per actor where CUDA exists, one CPU slot
each here); each shard is a Parquet file in `checkpoints/cdns/` (gitignored, not a DVC output), written under a
temporary name and renamed. A rerun after a kill skips the shards that are complete and valid. An actor whose
process dies is restarted by Ray and its shard retried (`MAX_RETRIES`); a shard that fails with an error stops the
stage with the shard, its rows and the error. The driver then joins the shards into
`data/negatives/manifest.parquet` (manifest.NEGATIVE_SCHEMA), exactly one row per input triplet, writes
`reports/cdns.json` and empties the work directory. `reports/cdns/attributes.csv` (a DVC plot) says, per attribute,
how often the attribute reader reads x- differently from x+ (the pretrained judges of real scale have no reader: the
file then holds its header only). `judge_dpo` uses whichever DINO judge `models/judges` holds (judges.load_dino:
embedded, or pretrained with its own preprocessing).

A negative's noise and degradation randomness come from its own seed (`cdns.seed` and the row's index), so
the output does not depend on the number of workers or on which worker took which shard.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .. import checkpoint, config, degrade, evaluation, manifest, pretrained_judges, stage, world
from ..judges import AttributeReader, load_dino, read_attributes
from ..model import SubjectFlux, seeded_noise

DATA, MODEL, JUDGES = "data/train", "models/sft", "models/judges"
OUT_DIR, REPORT, ATTRIBUTES = "data/negatives", "reports/cdns.json", "reports/cdns/attributes.csv"
WORK = "checkpoints/cdns"
MAX_RETRIES = 3   # restarts of a dead actor, and retries of the shard it held


SEED_TAG = 1   # keeps the negatives' noise streams apart from evaluation's (evaluation.SEED_TAG)


def negative_seed(base: int, index: int) -> int:
    return stage.derive_seed(SEED_TAG, base, index)


class NegativeWorker:
    """One per GPU (or CPU slot): loads the SFT base once (and the DINO judge for `judge_dpo`), then turns
    shards of rows into negatives."""

    def __init__(self, model_dir: str, sampler: config.Sampler, guidance: float, threads: int, pairs: str = "cdns",
                 judges_dir: str | None = None):
        torch.set_num_threads(threads)
        self.sampler, self.guidance, self.pairs = sampler, guidance, pairs
        self.model = SubjectFlux.from_pretrained(model_dir).eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.dino = None
        if pairs == "judge_dpo":
            if judges_dir is None or not (Path(judges_dir) / "dino").is_dir():
                raise config.ConfigError(f"{judges_dir}/dino: sfo.pairs=judge_dpo needs the DINO judge; "
                                         f"run `dvc repro judges`")
            self.dino = load_dino(judges_dir, self.device)   # uint8 images -> CLS embeddings

    def ready(self) -> bool:
        return True

    def _sample(self, cond: np.ndarray, prompts: list[str], seeds: list[int]) -> np.ndarray:
        out, s = [], self.sampler
        for i in range(0, len(cond), s.batch_size):
            sl = slice(i, i + s.batch_size)
            noise = seeded_noise(seeds[sl], self.model.noise_shape).to(self.device)
            x = self.model.sample(torch.from_numpy(manifest.to_float(cond[sl])).to(self.device), prompts[sl],
                                  noise, s.steps, self.guidance, s.shift)
            out.extend(manifest.to_uint8(x))
        return np.stack(out)

    @torch.no_grad()
    def _dino_similarity(self, images: np.ndarray, refs: np.ndarray) -> np.ndarray:
        a, b = (self.dino(x) for x in (images, refs))
        return torch.nn.functional.cosine_similarity(a, b).cpu().numpy()

    def generate(self, shard: dict, cfg: config.Cdns, out_path: str) -> str:
        image_kind, text_kind = degradations(self.pairs, cfg)
        cond, prompts, refs = [], [], []
        for i, row_id in enumerate(shard["id"]):
            where = f"{DATA}: row id={row_id!r}"
            rng = np.random.default_rng(shard["seed"][i])     # the row's own stream: same result on any worker
            ref, target = (manifest.decode_png(shard[c][i], f"{where} column {c!r}") for c in ("ref_png", "target_png"))
            ctx = world.Context(shard["background"][i], shard["position"][i], shard["size"][i])
            refs.append(ref)
            cond.append(degrade.degrade_image(ref, target, image_kind, cfg.blur_radius, cfg.noise_std, rng))
            prompts.append(degrade.degrade_text(shard["prompt"][i], shard["generic_prompt"][i], text_kind,
                                                shard["cls"][i], ctx, rng))
        cond, refs = np.stack(cond), np.stack(refs)
        negs = self._sample(cond, prompts, shard["seed"])
        positives = [None] * len(negs)
        if self.pairs == "judge_dpo":     # a second sample per row; the judge's preferred one is the positive
            second = self._sample(cond, prompts, [stage.derive_seed(SEED_TAG, s, 1) for s in shard["seed"]])
            first_wins = self._dino_similarity(negs, refs) >= self._dino_similarity(second, refs)
            positives = [manifest.encode_png(a if w else b) for a, b, w in zip(negs, second, first_wins)]
            negs = np.where(first_wins[:, None, None, None], second, negs)
        rows = [{"id": i, "neg_png": manifest.encode_png(n), "cond_png": manifest.encode_png(c), "neg_prompt": p,
                 "image_degradation": image_kind, "text_degradation": text_kind, "blur_radius": cfg.blur_radius,
                 "noise_std": cfg.noise_std, "seed": sd, "pairs": self.pairs, "pos_png": pos}
                for i, n, c, p, sd, pos in zip(shard["id"], negs, cond, prompts, shard["seed"], positives)]
        checkpoint.fault_point("cdns:worker-shard")
        manifest.write_table_atomic(pa.Table.from_pylist(rows, schema=manifest.NEGATIVE_SCHEMA), out_path)
        return out_path


def degradations(pairs: str, cfg: config.Cdns) -> tuple[str, str]:
    """(image, text) degradation: CDNS degrades the conditions; self-play and judge DPO sample from them as they are."""
    return (cfg.image, cfg.text) if pairs in ("cdns", "sft_additional") else ("none", "none")


def start_ray(cfg: config.Cdns, attempts: int = 3):
    """Join `cdns.ray_address`, or start a private local instance on loopback. Ray gives its raylet a fixed 30 s
    to register (not configurable); on an overloaded machine that can time out, so the start is retried."""
    import ray
    for attempt in range(1, attempts + 1):
        try:
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=cfg.workers * cfg.threads_per_worker, include_dashboard=False,
                         log_to_driver=False, _node_ip_address="127.0.0.1", configure_logging=False)
            return ray
        except Exception as e:        # Ray raises a bare Exception for "timed out during startup"
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            stage.log.warning("cdns: Ray did not start (%s); retrying (%d of %d)", e, attempt + 1, attempts)
            ray.shutdown()
    return ray


def make_shards(table, cfg: config.Cdns) -> list[dict]:
    """The triplets' columns a worker needs, each row with its own negative seed, in `cdns.shard_rows` shards."""
    data = {k: table.column(k).to_pylist() for k in ("id", "ref_png", "target_png", "prompt", "generic_prompt",
                                                       "cls", "background", "position", "size")}
    data["seed"] = [negative_seed(cfg.seed, i) for i in range(table.num_rows)]
    return [{k: v[i:i + cfg.shard_rows] for k, v in data.items()} for i in range(0, table.num_rows, cfg.shard_rows)]


def gpus_per_worker(workers: int, gpus: float) -> float:
    """One GPU per actor where there are enough; fewer GPUs than `cdns.workers` are shared evenly (a Ray actor
    asking for a whole GPU that does not exist would wait for it forever)."""
    return 0.0 if gpus <= 0 else min(1.0, gpus / workers)


def start_workers(ray, cfg: config.Cdns, model_dir: str, sampler: config.Sampler, guidance: float,
                  pairs: str = "cdns", judges_dir: str | None = None) -> list:
    """`cdns.workers` actors (one GPU each where CUDA exists), each with the model loaded. A worker process that
    dies is restarted by Ray (`max_restarts`) and the task it held retried (`max_task_retries`)."""
    have = ray.cluster_resources().get("GPU", 0) if torch.cuda.is_available() else 0
    gpus = gpus_per_worker(cfg.workers, have)
    if 0 < gpus < 1:
        stage.log.warning("cdns: %d workers share %g GPU(s), %.2f each; each loads its own copy of the model",
                          cfg.workers, have, gpus)
    actor_cls = ray.remote(num_cpus=cfg.threads_per_worker, num_gpus=gpus, max_restarts=MAX_RETRIES,
                           max_task_retries=MAX_RETRIES)(NegativeWorker)
    judges_dir = str(Path(judges_dir).resolve()) if judges_dir else None
    actors = [actor_cls.remote(str(Path(model_dir).resolve()), sampler, guidance, cfg.threads_per_worker, pairs,
                               judges_dir) for _ in range(cfg.workers)]
    ray.get([a.ready.remote() for a in actors])
    return actors


def run_shards(ray, actors: list, cfg: config.Cdns, shards: list[dict], paths: list[str]):
    """Each shard to the next free actor; returns when every shard file is written. A shard that raises (a bad
    row), or whose worker died more than MAX_RETRIES times, stops the stage with the shard, its rows and the
    error."""
    todo, running = list(range(len(shards)))[::-1], {}

    def submit(actor):
        k = todo.pop()
        running[actor.generate.remote(shards[k], cfg, paths[k])] = (k, actor)
    for actor in actors[:len(todo)]:
        submit(actor)
    bar = stage.progress(total=len(shards), desc="cdns: shards")
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        k, actor = running.pop(ref)
        try:
            ray.get(ref)
        except Exception as e:        # RayTaskError (its .cause is the worker's exception) or RayActorError
            cause = getattr(e, "cause", None) or e
            ids = shards[k]["id"]
            raise config.ConfigError(f"cdns: shard {k} (rows {ids[0]!r}..{ids[-1]!r}) failed: "
                                     f"{type(cause).__name__}: {str(cause)[-800:]}") from None
        bar.update(1)
        checkpoint.fault_point("cdns:shard-done")
        if todo:
            submit(actor)
    bar.close()


def valid_shard(path: Path, shard: dict) -> bool:
    """A shard file from an earlier, interrupted run is reused only if it reads and holds exactly its rows."""
    if not path.exists():
        return False
    try:
        return manifest.read(path, manifest.NEGATIVE_SCHEMA).column("id").to_pylist() == shard["id"]
    except config.ConfigError as e:
        stage.log.warning("cdns: %s is not a valid shard (%s); regenerating it", path, e)
        return False


def attribute_report(negatives: pa.Table, train: pa.Table) -> tuple[list[dict], dict]:
    """How the negatives differ from their positives, attribute by attribute, as the attribute reader sees
    them: per attribute, how often the reader's label of x- differs from its label of x+, and how often each
    matches the subject's true label. CDNS should change identity details (pattern, mark) and keep context."""
    reader = AttributeReader.from_pretrained(Path(JUDGES) / "reader")
    train = manifest.triplets_of(negatives, train, OUT_DIR, DATA)
    read_pos = read_attributes(reader, manifest.positives(negatives, train, OUT_DIR, DATA))
    read_neg = read_attributes(reader, manifest.decode_column(negatives, "neg_png", OUT_DIR))
    table = []
    for k in world.ATTRS:
        truth = train.column(k).to_numpy()
        table.append({"attribute": k, "kind": "identity" if k in world.IDENTITY_ATTRS else "context",
                      "neg_differs_from_pos": float(np.mean(read_neg[k] != read_pos[k])),
                      "pos_acc": float(np.mean(read_pos[k] == truth)), "neg_acc": float(np.mean(read_neg[k] == truth))})
    summary = {f"{stat}_{kind}": float(np.mean([r[stat] for r in table if r["kind"] == kind]))
               for stat in ("neg_differs_from_pos", "pos_acc", "neg_acc") for kind in ("identity", "context")}
    return table, summary


def main():
    cfg, sampler, sfo_cfg = config.load("cdns", "sampler", "sfo")
    pairs = sfo_cfg.pairs
    guidance = evaluation.chosen_guidance()
    table = manifest.read(DATA)
    if not (Path(MODEL) / "subject_flux.json").exists():
        raise config.ConfigError(f"{MODEL}: no trained SFT base; run `dvc repro sft`")
    n = table.num_rows if cfg.num_triplets == 0 else min(cfg.num_triplets, table.num_rows)
    if degradations(pairs, cfg)[1] == "perturbed" and \
            manifest.UNKNOWN in table.column("cls").slice(0, n).to_pylist():
        raise config.ConfigError(f"{DATA}: cdns.text=perturbed swaps one of the embedded world's context attributes, "
                                 "and these rows carry none (prepare.source: subjects200k); use generic or none")
    shards = make_shards(table.slice(0, n), cfg)
    ids = [i for shard in shards for i in shard["id"]]
    work = checkpoint.WorkDir(WORK, checkpoint.fingerprint(
        {"cdns": cfg, "sampler": sampler, "guidance": {"chosen": guidance}, "sfo": {"pairs": pairs}},
        [DATA, MODEL] + ([JUDGES] if pairs == "judge_dpo" else []),
        ignore=("cdns.workers", "cdns.threads_per_worker", "cdns.ray_address")))
    paths = [(work.dir / f"shard-{k:05d}.parquet").resolve() for k in range(len(shards))]
    todo = [k for k, (shard, path) in enumerate(zip(shards, paths)) if not valid_shard(path, shard)]
    stage.log.info("cdns: %d triplets in %d shards (%d already complete), pairs %s", n, len(shards),
                   len(shards) - len(todo), pairs)
    if todo:
        ray = start_ray(cfg)
        try:
            actors = start_workers(ray, cfg, MODEL, sampler, guidance, pairs, JUDGES)
            run_shards(ray, actors, cfg, [shards[k] for k in todo], [str(paths[k]) for k in todo])
        finally:
            ray.shutdown()

    negatives = pa.concat_tables([manifest.read(p, manifest.NEGATIVE_SCHEMA) for p in paths])
    if negatives.column("id").to_pylist() != ids:
        raise RuntimeError("cdns: the shards do not hold exactly one negative per input triplet, in order")
    checkpoint.fault_point("cdns:manifest")
    manifest.write_table_atomic(negatives, Path(OUT_DIR) / "manifest.parquet")
    if not (Path(JUDGES) / pretrained_judges.META).exists():
        attributes, summary = attribute_report(negatives, table)
        stage.write_csv(ATTRIBUTES, attributes)
    else:   # the pretrained judges: no attribute reader
        stage.log.info("cdns: the pretrained judges have no attribute reader; %s holds its header only", ATTRIBUTES)
        summary = None
        Path(ATTRIBUTES).parent.mkdir(parents=True, exist_ok=True)
        Path(ATTRIBUTES).write_text("attribute,kind,neg_differs_from_pos,pos_acc,neg_acc\n")
    report = {"negatives": n, "shards": len(shards), "workers": cfg.workers, "pairs": pairs,
              "image": negatives.column("image_degradation")[0].as_py(), "text": negatives.column("text_degradation")[0].as_py(), "blur_radius": cfg.blur_radius, "noise_std": cfg.noise_std, "guidance": guidance,
              "sampler": sampler.__dict__, "attributes": summary}
    stage.write_json(REPORT, report)
    work.finish({"stage": "cdns", "negatives": n})
    stage.log.info("cdns: %d negatives in %d shards by %d Ray workers", n, len(shards), cfg.workers)
    return [OUT_DIR, REPORT, ATTRIBUTES]


if __name__ == "__main__":
    stage.run("cdns", main)
