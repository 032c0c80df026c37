"""Stage `judges`: train the embedded evaluators on renders independent of the train and bench sets.

Reads params `world` (image size, jitter) and `judges`. Writes `models/judges/{dino,clip,reader}` and
`reports/judges.json` (their own quality on held-out renders: identity retrieval, text-to-image retrieval,
per-attribute accuracy, and what one identity error costs in the DINO measure, `near_miss_costs`). With
`judges.dino_near_miss_negatives` the DINO stand-in also learns to tell each subject from its near miss.

With `judges.source: pretrained` (real scale) nothing is trained: the DINO and CLIP of `judges.dino` and
`judges.clip` (hub ids or local folders, checked first) are saved with their processors and tokenizer to
`models/judges/{dino,clip}`, so later stages load exactly these weights locally and DVC pins them, with
`models/judges/judges.json` (pipeline/pretrained_judges.py's protocol: sources, preprocessing read back from the
processors, reference pairing, embeddings). `reports/judges.json` holds the same protocol.
"""
from __future__ import annotations

import shutil

import numpy as np
import torch
import torch.nn.functional as F

from .. import config, stage, world
from ..judges import (AttributeReader, Judges, build_clip, build_dino, caption_tokenizer, clip_image_embed,
                      clip_text_embed, dino_embed, to_pixels)
from ..pretrained_judges import PretrainedJudges
from ..text import tokenize

OUT_DIR, REPORT = "models/judges", "reports/judges.json"


def render_set(n: int, w: config.World, rng: np.random.Generator) -> dict:
    """n subjects, each as reference (context A's size) and as targets in contexts A and B."""
    subjects = world.sample_subjects(rng, n)
    out = {"subjects": subjects, "ref": [], "a": [], "b": [], "cap_a": [], "cap_ref": [], "labels_a": [],
           "labels_b": []}
    for s in stage.progress(subjects, desc="judges: render"):
        ca, cb = world.sample_context(rng), world.sample_context(rng)
        ja, jb = rng.uniform(-w.jitter, w.jitter, 2), rng.uniform(-w.jitter, w.jitter, 2)
        out["ref"].append(world.render(s, ca, w.image_size, reference=True, reference_size=w.reference_size)[0])
        out["a"].append(world.render(s, ca, w.image_size, tuple(ja))[0])
        out["b"].append(world.render(s, cb, w.image_size, tuple(jb))[0])
        out["cap_a"].append(world.caption(s, ca))
        out["cap_ref"].append(world.caption(s))
        out["labels_a"].append(world.attribute_labels(s, ca))
        out["labels_b"].append(world.attribute_labels(s, cb))
    for k in ("ref", "a", "b"):
        out[k] = np.stack(out[k])
    for k in ("labels_a", "labels_b"):
        out[k] = {a: np.array([d[a] for d in out[k]]) for a in world.ATTRS}
    return out


def near_misses(subjects: list, rng: np.random.Generator) -> list:
    """Each subject with one identity attribute (of those the reader scores) changed."""
    fields = list(world.IDENTITY_ATTRS)
    return [world.with_other_value(s, fields[rng.integers(len(fields))], rng) for s in subjects]


def near_miss_set(subjects: list, w: config.World, rng: np.random.Generator) -> np.ndarray:
    """The subjects' near misses, each in a fresh context: the DINO stand-in's hard negatives
    (`judges.dino_near_miss_negatives`)."""
    out = []
    for miss in stage.progress(near_misses(subjects, rng), desc="judges: near misses"):
        jitter = rng.uniform(-w.jitter, w.jitter, 2)
        out.append(world.render(miss, world.sample_context(rng), w.image_size, tuple(jitter))[0])
    return np.stack(out)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Pixel noise of a random strength: generated images are noisier than renders."""
    sigma = 0.12 * torch.rand(x.shape[0], 1, 1, 1, generator=g)
    return x + sigma * torch.randn(x.shape, generator=g)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1,
             negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` and row i of `b` are the positive pair. `negatives` (optional): more
    candidates every row of `a` must tell from its positive (the a -> b direction only)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a))
    a_to_b = logits if negatives is None else torch.cat([logits, a @ F.normalize(negatives, dim=-1).T / temperature], 1)
    return (F.cross_entropy(a_to_b, target) + F.cross_entropy(logits.T, target)) / 2


def fit(name: str, model: torch.nn.Module, loss_fn, steps: int, lr: float):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = stage.progress(range(steps), desc=f"judges: {name}")
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    stage.log.info("judges: %s trained %d steps, final loss %.4f", name, steps, loss.item())
    return model.eval()


def pretrained(j: config.Judges) -> list:
    """Real scale: check, load and save the pretrained judges; no training, no quality report."""
    judges = PretrainedJudges.fetch(j.dino, j.clip, j.reference_pairing)
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    judges.save(OUT_DIR)
    stage.write_json(REPORT, judges.protocol)
    stage.log.info("judges: pretrained DINO %s and CLIP %s saved to %s (pairing %s)", j.dino, j.clip, OUT_DIR,
                   j.reference_pairing)
    return [OUT_DIR, REPORT]


def main():
    w, j = config.load("world", "judges")
    stage.set_threads()
    if j.source == "pretrained":
        return pretrained(j)
    stage.seed_everything(j.seed)
    rng = np.random.default_rng(j.seed)
    train, val = render_set(j.train_renders, w, rng), render_set(j.val_renders, w, rng)
    g = torch.Generator().manual_seed(j.seed)
    n, bs = j.train_renders, j.batch_size
    ref, a, b = to_pixels(train["ref"]), to_pixels(train["a"]), to_pixels(train["b"])

    def batch_idx():
        return torch.randint(0, n, (bs,), generator=g)

    # attribute reader: targets in both contexts, every attribute
    reader = AttributeReader(w.image_size)
    imgs = torch.cat([a, b])
    labels = {k: torch.from_numpy(np.concatenate([train["labels_a"][k], train["labels_b"][k]])) for k in world.ATTRS}

    def reader_loss(step):
        i = torch.randint(0, 2 * n, (bs,), generator=g)
        out = reader(augment(imgs[i], g))
        return sum(F.cross_entropy(out[k], labels[k][i]) for k in world.ATTRS)
    fit("reader", reader, reader_loss, j.attr_steps, j.lr)

    # DINO stand-in: identity embedding, invariant to context (reference <-> target and target <-> target)
    dino = build_dino(w.image_size)

    # with `dino_near_miss_negatives`, each subject's near miss (one identity attribute changed) is a hard negative;
    # its own generator: without it the renders and the generator's draws stay what they were
    misses = (to_pixels(near_miss_set(train["subjects"], w, np.random.default_rng(j.seed + 2)))
              if j.dino_near_miss_negatives else None)

    def dino_loss(step):
        i = batch_idx()
        view1 = torch.where((torch.rand(bs, generator=g) < 0.5)[:, None, None, None], ref[i], a[i])
        e1, e2 = dino_embed(dino, augment(view1, g)), dino_embed(dino, augment(b[i], g))
        return info_nce(e1, e2, negatives=None if misses is None else dino_embed(dino, augment(misses[i], g)))
    fit("dino", dino, dino_loss, j.dino_steps, j.lr / 2)

    # CLIP stand-in: images with full captions (targets) or identity captions (references)
    tokenizer = caption_tokenizer()
    clip = build_clip(w.image_size, tokenizer)
    ids_a, ids_ref = tokenize(tokenizer, train["cap_a"]), tokenize(tokenizer, train["cap_ref"])

    def clip_loss(step):
        i = batch_idx()
        use_ref = torch.rand(bs, generator=g) < 0.3
        pix = torch.where(use_ref[:, None, None, None], ref[i], a[i])
        ids = torch.where(use_ref[:, None], ids_ref["input_ids"][i], ids_a["input_ids"][i])
        mask = torch.where(use_ref[:, None], ids_ref["attention_mask"][i], ids_a["attention_mask"][i])
        return clip(input_ids=ids, attention_mask=mask, pixel_values=augment(pix, g), return_loss=True).loss
    fit("clip", clip, clip_loss, j.clip_steps, j.lr / 2)

    judges = Judges(dino, clip, tokenizer, reader)
    shutil.rmtree(OUT_DIR, ignore_errors=True)   # no judges.json of an earlier pretrained run may stay
    judges.save(OUT_DIR)
    report = evaluate_judges(judges, val)
    # its own generator: the renders, the training and the saved judges stay what they were without it
    report.update(near_miss_costs(lambda x: dino_embed(judges.dino, x), w, j.val_renders,
                                  np.random.default_rng(j.seed + 1)))
    stage.log.info("judges: held-out quality %s", {k: round(v, 3) for k, v in report.items() if k != "n"})
    stage.write_json(REPORT, report)
    return [OUT_DIR, REPORT]


@torch.no_grad()
def near_miss_costs(embed, w: config.World, n: int, rng: np.random.Generator) -> dict:
    """What one identity error costs in the DINO measure: for `n` fresh subjects, cos(reference, target) minus
    cos(reference, the target of the same subject with one field changed, in the same context), per field, and
    how often the true target is the closer one. `embed`: float pixels (N, 3, H, W) -> embeddings."""
    subjects = world.sample_subjects(rng, n)
    ctxs = [world.sample_context(rng) for _ in subjects]
    ref = embed(to_pixels(np.stack([world.render(s, c, w.image_size, reference=True,
                                                 reference_size=w.reference_size)[0] for s, c in zip(subjects, ctxs)])))

    def cos_to_ref(subs):
        targets = np.stack([world.render(s, c, w.image_size)[0] for s, c in zip(subs, ctxs)])
        return F.cosine_similarity(ref, embed(to_pixels(targets)))
    true = cos_to_ref(subjects)
    out = {"dino_ref_target_cos": float(true.mean())}
    for field in world.SUBJECT_FIELDS:
        miss = cos_to_ref([world.with_other_value(s, field, rng) for s in subjects])
        out[f"dino_near_miss_cost_{field}"] = float((true - miss).mean())
        out[f"dino_near_miss_true_closer_{field}"] = float((true > miss).float().mean())
    return out


@torch.no_grad()
def evaluate_judges(judges: Judges, val: dict) -> dict:
    """Quality on held-out renders: top-1 identity retrieval (a target in context B finds its subject's
    reference among all references), top-1 text-to-image retrieval, per-attribute accuracy."""
    ref, b, a = to_pixels(val["ref"]), to_pixels(val["b"]), to_pixels(val["a"])
    n = len(ref)

    def top1(q, k):
        return float((F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T).argmax(1).eq(torch.arange(n)).float().mean())
    report = {"n": n,
              "dino_identity_top1": top1(dino_embed(judges.dino, b), dino_embed(judges.dino, ref)),
              "clip_identity_top1": top1(clip_image_embed(judges.clip, b), clip_image_embed(judges.clip, ref)),
              "clip_text_to_image_top1": top1(clip_text_embed(judges.clip, judges.tokenizer, val["cap_a"]),
                                              clip_image_embed(judges.clip, a))}
    read = judges.read_attributes(val["a"])
    for k in world.ATTRS:
        report[f"reader_acc_{k}"] = float((read[k] == val["labels_a"][k]).mean())
    report["reader_id_acc"] = float(np.mean([report[f"reader_acc_{k}"] for k in world.IDENTITY_ATTRS]))
    report["reader_ctx_acc"] = float(np.mean([report[f"reader_acc_{k}"] for k in world.CONTEXT_ATTRS]))
    return report


if __name__ == "__main__":
    stage.run("judges", main)
