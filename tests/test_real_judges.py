"""The real-scale judges (pipeline/pretrained_judges.py) on tiny random DINO and CLIP models built here with
real `transformers` classes and saved like hub checkpoints (nothing can be downloaded): the `judges` stage saves
them with their preprocessing, the embeddings are the published ones, the pairing rules hold, and a hub id with
no network stops the stage within seconds."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import REPO, smoke_params, stage_env
from real_fixtures import IMAGENET_MEAN, IMAGENET_STD, build_tiny_judges

from pipeline.config import ConfigError
from pipeline.judges import Judges
from pipeline.pretrained_judges import PretrainedJudges

CPU = torch.device("cpu")   # the hand computations run on the CPU; so do the judges here, for exact comparisons


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folders laid out like facebook/dino-vits16 and openai/clip-vit-base-patch32, with tiny random weights."""
    return build_tiny_judges(tmp_path_factory.mktemp("hub"))


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 48, 3), dtype=np.uint8)


def run_judges_stage(tmp_path, **judges) -> subprocess.CompletedProcess:
    params = smoke_params()
    params["judges"].update(source="pretrained", **judges)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(stage_env(), PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    return subprocess.run([sys.executable, "-m", "pipeline.stages.judges"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_judges_stage_saves_the_models_and_their_preprocessing(checkpoints, tmp_path):
    p = run_judges_stage(tmp_path, dino=str(checkpoints["dino"]), clip=str(checkpoints["clip"]),
                         reference_pairing="first")
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "models/judges"
    for f in ("dino/model.safetensors", "dino/preprocessor_config.json", "clip/model.safetensors",
              "clip/preprocessor_config.json", "clip/tokenizer.json"):
        assert (out / f).exists(), f
    assert not (out / "reader").exists()
    meta = json.loads((out / "judges.json").read_text())
    assert meta == json.loads((tmp_path / "reports/judges.json").read_text())
    assert meta["models"] == {"dino": str(checkpoints["dino"]), "clip": str(checkpoints["clip"])}
    assert meta["reference_pairing"] == "first" and "last_hidden_state[:, 0]" in meta["embeddings"]["dino"]
    dino, clip = meta["preprocessing"]["dino"], meta["preprocessing"]["clip"]
    assert dino["resize"] == {"height": 32, "width": 32} and dino["resample"] == "BILINEAR"
    assert dino["center_crop"] is None and dino["mean"] == IMAGENET_MEAN and dino["std"] == IMAGENET_STD
    assert clip["resize"] == {"shortest_edge": 32} and clip["center_crop"] == {"height": 32, "width": 32}
    assert clip["resample"] == "BICUBIC" and clip["rescale"] == pytest.approx(1 / 255)
    assert clip["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # later stages load exactly these weights, from models/judges alone
    judges = Judges.load(out)
    assert isinstance(judges, PretrainedJudges) and judges.pairing == "first"
    for saved, original in ((judges.dino, checkpoints["dino_model"]), (judges.clip, checkpoints["clip_model"])):
        a, b = saved.state_dict(), original.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k]) for k in a)


@torch.no_grad()
def test_embeddings_are_the_published_ones(checkpoints):
    judges = PretrainedJudges.fetch(str(checkpoints["dino"]), str(checkpoints["clip"]), "first", CPU)
    x = images(3, 1)
    # DINO's preprocessing: PIL bilinear resize to 32 x 32, [0, 1], ImageNet normalisation
    by_hand = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in x]) / 255.0
    by_hand = torch.from_numpy((by_hand - IMAGENET_MEAN) / IMAGENET_STD).permute(0, 3, 1, 2).float()
    pix = judges.dino_processor(images=list(x), return_tensors="pt")["pixel_values"]
    assert torch.allclose(pix, by_hand, atol=1e-5)
    # DINO embedding: the CLS token after the final layer norm
    vit = checkpoints["dino_model"]
    cls = vit.layernorm(vit(pixel_values=by_hand, output_hidden_states=True).hidden_states[-1])[:, 0]
    from pipeline.pretrained_judges import dino_embed
    assert torch.allclose(dino_embed(judges.dino, judges.dino_processor, x), cls, atol=1e-5)
    # the scores against an independent path: CLIPModel's forward (image_embeds, text_embeds)
    g, r, prompts = images(3, 2), images(3, 3), ["a photo of dog on the beach", "a red toy", "a cat in snow"]
    s = judges.score(g, r, prompts)
    clip, tok = checkpoints["clip_model"], checkpoints["tokenizer"]
    cpix = lambda im: judges.clip_processor(images=list(im), return_tensors="pt")["pixel_values"]
    ids = tok(prompts, padding=True, return_tensors="pt")
    fg = clip(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=cpix(g))
    fr = clip(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=cpix(r))
    assert np.allclose(s["clip_i"], F.cosine_similarity(fg.image_embeds, fr.image_embeds).numpy(), atol=1e-5)
    assert np.allclose(s["clip_t"], F.cosine_similarity(fg.image_embeds, fg.text_embeds).numpy(), atol=1e-5)
    dg, dr = (vit(pixel_values=judges.dino_processor(images=list(im), return_tensors="pt")["pixel_values"])
              .last_hidden_state[:, 0] for im in (g, r))
    assert np.allclose(s["dino"], F.cosine_similarity(dg, dr).numpy(), atol=1e-5)
    assert set(s) == {"dino", "clip_i", "clip_t"}    # no embedded-world measures at real scale


def test_scores_bounds_identity_and_reference_pairing(checkpoints):
    judges = {p: PretrainedJudges.fetch(str(checkpoints["dino"]), str(checkpoints["clip"]), p, CPU)
              for p in ("all", "first")}
    refs = {7: images(3, 10), 9: images(4, 11)}
    subjects = np.array([7, 9, 9, 7, 9])
    g = images(5, 12)
    g[1] = refs[9][0]                                  # a generated image identical to its subject's first photo
    prompts = ["a photo of dog", "a cat", "a toy in snow", "a dog on the beach", "a blue cat"]
    s = {p: j.score(g, None, prompts, subject_refs=refs, subjects=subjects, batch_size=2) for p, j in judges.items()}
    for p in s:
        for m in ("dino", "clip_i", "clip_t"):
            assert s[p][m].shape == (5,) and np.all(np.abs(s[p][m]) <= 1 + 1e-6), (p, m)
    assert s["first"]["dino"][1] == pytest.approx(1, abs=1e-5)
    assert s["first"]["clip_i"][1] == pytest.approx(1, abs=1e-5)
    same = judges["all"].score(g, g, prompts)          # each image against itself as its own row's reference
    assert np.allclose(same["dino"], 1, atol=1e-5) and np.allclose(same["clip_i"], 1, atol=1e-5)
    # `all`: the mean of the cosines against every photo of the subject, by hand; `first`: the first photo
    j = judges["all"]
    emb = {"dino": lambda x: j.dino(pixel_values=j.dino_processor(images=list(x), return_tensors="pt")
                                  ["pixel_values"]).last_hidden_state[:, 0],
           "clip_i": lambda x: j.clip.get_image_features(pixel_values=j.clip_processor(
               images=list(x), return_tensors="pt")["pixel_values"]).pooler_output}
    with torch.no_grad():
        for m, e in emb.items():
            eg = e(g)
            for i, subj in enumerate(subjects):
                cos = F.cosine_similarity(eg[i:i + 1], e(refs[subj])).numpy()
                assert s["all"][m][i] == pytest.approx(cos.mean(), abs=1e-5), (m, i)
                assert s["first"][m][i] == pytest.approx(cos[0], abs=1e-5), (m, i)
    assert not np.allclose(s["all"]["dino"], s["first"]["dino"], atol=1e-4)
    assert np.array_equal(s["all"]["clip_t"], s["first"]["clip_t"])   # the pairing does not touch CLIP-T


def test_hub_id_without_network_stops_within_seconds(checkpoints, tmp_path, monkeypatch):
    """No network (here: a hub endpoint that refuses connections; an empty cache): ConfigError naming the key,
    within seconds, and the stage writes no models/judges."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.time()
    with pytest.raises(ConfigError, match="judges.dino"):
        PretrainedJudges.fetch("facebook/dino-vits16", str(checkpoints["clip"]), "all", CPU)
    assert time.time() - t0 < 10
    p = run_judges_stage(tmp_path, dino=str(checkpoints["dino"]), clip="openai/clip-vit-base-patch32")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "judges.clip" in p.stderr and "cannot be reached" in p.stderr
    assert not (tmp_path / "models/judges").exists() and not (tmp_path / "reports/judges.json").exists()


def test_subject_references_come_from_the_refs_manifest(checkpoints, tmp_path):
    """evaluation.subject_references: every photo of each bench subject from `<bench>_refs`, in manifest order;
    the row's own reference where that manifest is missing; nothing for the embedded judges."""
    from pipeline import config, evaluation, manifest
    from pipeline.stages import prepare
    bench, _ = prepare.bench_rows(config.World(), config.Bench(subjects=2, prompts_per_subject=2))
    subjects = sorted({r["subject_id"] for r in bench})
    photos = images(5, 20)
    refs = [{**bench[0], "id": f"ref{k}", "subject_id": subjects[k % 2], "ref_png": manifest.encode_png(photos[k])}
            for k in range(5)]
    judges = PretrainedJudges.fetch(str(checkpoints["dino"]), str(checkpoints["clip"]), "all", CPU)
    path = str(tmp_path / "bench")
    assert evaluation.subject_references(judges, path, np.array(subjects))[0] is None   # no bench_refs: fallback
    manifest.write_shards(refs, tmp_path / "bench_refs", manifest.TRIPLET_SCHEMA, shard_rows=2)
    got, what = evaluation.subject_references(judges, path, np.array(subjects))
    assert np.array_equal(got[subjects[0]], photos[[0, 2, 4]]) and np.array_equal(got[subjects[1]], photos[[1, 3]])
    assert "5 photos of 2 subjects" in what
    with pytest.raises(ConfigError, match="no reference photo"):
        evaluation.subject_references(judges, path, np.array([*subjects, 12345]))
    assert evaluation.subject_references(Judges, path, np.array(subjects)) == (None, None)   # embedded: own row


def test_metrics_and_report_keep_only_the_measures_that_exist(checkpoints, tmp_path, monkeypatch):
    """At real scale, scores.csv and metrics.json hold dino, clip_i, clip_t only: the `metrics` stage (its oracle
    scored against data/bench_refs) and the report's table carry exactly those."""
    from pipeline import config, manifest
    from pipeline.stages import metrics, prepare, report
    monkeypatch.chdir(tmp_path)
    bench, _ = prepare.bench_rows(config.World(), config.Bench(subjects=2, prompts_per_subject=2))
    manifest.write_shards(bench, "data/bench", manifest.TRIPLET_SCHEMA, shard_rows=8)
    refs = [{**r, "id": f"ref/{r['id']}"} for r in bench]             # two photos per subject
    manifest.write_shards(refs, "data/bench_refs", manifest.TRIPLET_SCHEMA, shard_rows=8)
    judges = PretrainedJudges.fetch(str(checkpoints["dino"]), str(checkpoints["clip"]), "all", CPU)
    judges.save("models/judges")
    rng = np.random.default_rng(0)
    for name in metrics.MODELS:
        d = tmp_path / "reports/eval" / name
        d.mkdir(parents=True)
        scores = {m: rng.uniform(0, 1, 8) for m in ("dino", "clip_i", "clip_t")}
        (d / "scores.csv").write_text("id,seed,dino,clip_i,clip_t\n" + "".join(
            f"{bench[i // 2]['id']},{i},{scores['dino'][i]},{scores['clip_i'][i]},{scores['clip_t'][i]}\n"
            for i in range(8)))
        (d / "metrics.json").write_text(json.dumps({**{m: float(v.mean()) for m, v in scores.items()},
                                                    "guidance": 2.0, "n_images": 8, "protocol": judges.protocol}))
    metrics.main()
    m = json.loads((tmp_path / "reports/metrics.json").read_text())
    for key in ("sft", "sfo", "control", "oracle", "sfo_minus_sft", "sfo_minus_sft_sem"):
        assert list(m[key]) == ["dino", "clip_i", "clip_t"], key
    assert all(-1 <= v <= 1 for v in m["oracle"].values()) and m["protocol"] == judges.protocol
    table = report.metrics_table(m)
    assert "<th>clip_t</th>" in table and "id_acc" not in table
