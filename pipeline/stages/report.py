"""Stage `report`: `reports/index.html`, one self-contained page (no server, no network: every image is an
inline PNG, every curve an inline SVG) with the metrics table (SFT base, the SFT-additional control, SFO) and the
evaluation protocol, the training curves, a row per bench subject (reference | SFT | SFT-additional | SFO
samples, same seeds) and a few CDNS quadruplets (reference | degraded condition | positive | negative).

Reads `reports/metrics.json`, `reports/eval/sft/metrics.json`, `reports/{sft,sfo,control}/train.csv`,
`reports/cdns.json`, `reports/cdns/attributes.csv`, `data/eval/{sft,sfo,control}`, `data/bench`, `data/train`,
`data/negatives`.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path

import numpy as np

from .. import evaluation, manifest, stage

OUT = "reports/index.html"
QUADRUPLETS = 8
CURVES = [  # (title, csv, columns)
    ("SFT training loss", "reports/sft/train.csv", ["loss"]),
    ("SFO loss", "reports/sfo/train.csv", ["loss"]),
    ("SFT-additional control: error on positives, policy and reference", "reports/control/train.csv",
     ["err_pos", "ref_err_pos"]),
    ("SFO loss per timestep quartile", "reports/sfo/train.csv", ["loss_t0", "loss_t1", "loss_t2", "loss_t3"]),
    ("SFO implicit accuracy", "reports/sfo/train.csv", ["implicit_acc"]),
    ("SFO reward margin", "reports/sfo/train.csv", ["reward_margin"]),
    ("Errors on positives and negatives: policy and reference", "reports/sfo/train.csv",
     ["err_pos", "err_neg", "ref_err_pos", "ref_err_neg"]),
]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}img.px{image-rendering:pixelated;width:96px;height:96px;margin:1px}
.row{display:flex;align-items:center;gap:12px;margin:4px 0}.cap{font-size:13px;color:#555;width:260px}
div.group{display:flex;gap:2px;padding:2px;border-radius:4px}.sft{background:#e8eef8}.sfo{background:#f8e8e8}
.control{background:#eef5e6}
.curves{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}figcaption{font-size:13px;text-align:center}
code{background:#f4f4f4;padding:1px 3px}"""


def png_uri(img: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(manifest.encode_png(img)).decode()


def img_tag(img: np.ndarray, title: str) -> str:
    return f'<img class="px" src="{png_uri(img)}" title="{html.escape(title)}" alt="{html.escape(title)}">'


def read_csv(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def svg_curve(title: str, rows: list[dict], columns: list[str], w: int = 340, h: int = 200) -> str:
    """A line chart as inline SVG: x = step, one polyline per column, min/max labels on the y axis."""
    x = [float(r["step"]) for r in rows]
    ys = {c: [float(r[c]) for r in rows] for c in columns}
    finite = [v for c in columns for v in ys[c] if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = min(x), max(x) if max(x) > min(x) else min(x) + 1
    pad = 36

    def pt(xv, yv):
        return f"{pad + (xv - x0) / (x1 - x0) * (w - pad - 8):.1f},{h - 20 - (yv - lo) / (hi - lo) * (h - 40):.1f}"
    lines = []
    for c, colour in zip(columns, COLOURS):
        pts = " ".join(pt(a, b) for a, b in zip(x, ys[c]) if math.isfinite(b))
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>')
    legend = "".join(f'<text x="{pad + 4 + 80 * i}" y="12" font-size="10" fill="{col}">{html.escape(c)}</text>'
                     for i, (c, col) in enumerate(zip(columns, COLOURS)))
    axes = (f'<line x1="{pad}" y1="{h - 20}" x2="{w - 8}" y2="{h - 20}" stroke="#999"/>'
            f'<line x1="{pad}" y1="20" x2="{pad}" y2="{h - 20}" stroke="#999"/>'
            f'<text x="2" y="24" font-size="9">{hi:.3g}</text><text x="2" y="{h - 20}" font-size="9">{lo:.3g}</text>'
            f'<text x="{pad}" y="{h - 6}" font-size="9">step {x0:g}</text>'
            f'<text x="{w - 60}" y="{h - 6}" font-size="9">step {x1:g}</text>')
    return (f'<figure><svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">{axes}{"".join(lines)}'
            f'{legend}</svg><figcaption>{html.escape(title)}</figcaption></figure>')


MODELS = (("sft", "SFT base"), ("control", "SFT-additional (control)"), ("sfo", "SFO"))
LABELS = dict(MODELS)


def metrics_table(m: dict) -> str:
    ms = evaluation.measures(m["sft"])    # dino, clip_i, clip_t only with the pretrained judges
    head = "".join(f"<th>{k}</th>" for k in ms)
    rows = []
    for name, label in (*MODELS, ("oracle", "ground truth (oracle)")):
        rows.append(f"<tr><td>{label}</td>" + "".join(f"<td>{m[name][k]:.4f}</td>" for k in ms) + "</tr>")
    for b, a in (("sfo", "sft"), ("control", "sft"), ("sfo", "control")):
        d, sem = m[f"{b}_minus_{a}"], m[f"{b}_minus_{a}_sem"]
        rows.append(f"<tr><td>{LABELS[b]} − {LABELS[a]} (± paired SEM)</td>" + "".join(
            f"<td>{d[k]:+.4f} ± {sem[k]:.4f}</td>" for k in ms) + "</tr>")
    return f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def samples_by_key(path: str) -> dict[tuple[str, int], np.ndarray]:
    """(bench row id, seed index k) -> the generated image."""
    t = manifest.read(path, manifest.SAMPLE_SCHEMA)
    imgs = manifest.decode_column(t, "png", path)
    return {(i, int(k)): img for i, k, img in zip(t.column("row_id").to_pylist(), t.column("k").to_pylist(), imgs)}


def subject_rows(bench, samples: dict[str, dict]) -> str:
    """One line per bench subject (its first prompt): reference | each model's samples, same seeds."""
    refs = manifest.decode_column(bench, "ref_png", "data/bench")
    ids, prompts = bench.column("id").to_pylist(), bench.column("prompt").to_pylist()
    seen, lines = set(), []
    for r, subject in enumerate(bench.column("subject_id").to_pylist()):
        if subject in seen:
            continue
        seen.add(subject)
        seeds = sorted(s for (i, s) in samples["sft"] if i == ids[r])
        groups = [f'<div class="group {m}">' + "".join(img_tag(samples[m][(ids[r], s)], f"{LABELS[m]} seed #{s}")
                                                       for s in seeds) + "</div>" for m, _ in MODELS]
        lines.append(f'<div class="row"><div class="cap">{html.escape(ids[r])}<br>{html.escape(prompts[r])}</div>'
                     f'{img_tag(refs[r], "reference")}{"".join(groups)}</div>')
    return "\n".join(lines)


def quadruplets(train, negatives) -> str:
    neg = negatives.slice(0, QUADRUPLETS)
    ids = neg.column("id").to_pylist()
    sub = manifest.triplets_of(neg, train, "data/negatives", "data/train")
    refs, positives = manifest.decode_column(sub, "ref_png", "data/train"), \
        manifest.positives(neg, sub, "data/negatives", "data/train")
    conds, negs = (manifest.decode_column(neg, c, "data/negatives") for c in ("cond_png", "neg_png"))
    lines = []
    for k, i in enumerate(ids):
        lines.append(f'<div class="row"><div class="cap">{html.escape(i)}<br>x−: '
                     f'{html.escape(neg.column("neg_prompt")[k].as_py())}</div>'
                     + "".join(img_tag(im, t) for im, t in ((refs[k], "reference"), (conds[k], "degraded condition"),
                                                            (positives[k], "positive x+"), (negs[k], "negative x−")))
                     + "</div>")
    return "\n".join(lines)


def attribute_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>No attribute reader: the pretrained judges (real scale) have none.</p>"
    head = "<tr><th>attribute</th><th>kind</th><th>x− read differently from x+</th><th>x+ read correctly</th>" \
           "<th>x− read correctly</th></tr>"
    body = "".join(f"<tr><td>{r['attribute']}</td><td>{r['kind']}</td><td>{float(r['neg_differs_from_pos']):.3f}</td>"
                   f"<td>{float(r['pos_acc']):.3f}</td><td>{float(r['neg_acc']):.3f}</td></tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def main():
    m = json.loads(Path("reports/metrics.json").read_text())
    ev = json.loads(Path("reports/eval/sft/metrics.json").read_text())
    cdns = json.loads(Path("reports/cdns.json").read_text())
    bench, train = manifest.read("data/bench"), manifest.read("data/train")
    negatives = manifest.read("data/negatives/manifest.parquet", manifest.NEGATIVE_SCHEMA)
    samples = {name: samples_by_key(f"data/eval/{name}") for name, _ in MODELS}
    protocol = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v if isinstance(v, str) else json.dumps(v))}</li>"
                       for k, v in ev["protocol"].items())
    # a curve whose columns a run did not log is left out (sfo.pairs=sft_additional logs no pair diagnostics)
    curves = "".join(svg_curve(t, rows, cols) for t, p, cols in CURVES
                     if (rows := read_csv(p)) and all(c in rows[0] for c in cols))
    real = ev["protocol"].get("source") == "pretrained"      # real scale: DreamBench photos, no ground truth
    bench_name = "the bench" if real else "the embedded bench"
    oracle = ("The oracle row scores each subject's first photo, itself one of the references (DreamBench has no "
              "ground truth): not a ceiling." if real else "The oracle row scores the ground-truth renders.")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>SFO Pipeline report</title>
<style>{STYLE}</style></head><body>
<h1>SFO Pipeline report</h1>
<p>SFT base, SFT-additional control (the SFO LoRA trained with the plain SFT loss on the same positives) and SFO
on {bench_name}: {ev['n_subjects']} held-out subjects, {ev['n_images']} images per model,
{ev['seeds_per_prompt']} seeds per prompt, the same seeds for every model, {ev['sampler']['steps']} Euler steps,
guidance {m['guidance']:g} (chosen for the SFT base's dino on a validation split of other subjects).
{oracle}</p>
<h2>Metrics</h2>{metrics_table(m)}
<h3>Evaluation protocol</h3><ul>{protocol}</ul>
<h2>Training curves</h2><div class="curves">{curves}</div>
<h2>Samples: one row per bench subject</h2>
<p>reference | <span class="sft">SFT samples</span> | <span class="control">SFT-additional samples</span> |
<span class="sfo">SFO samples</span> (same seeds, first prompt of each subject; hover for labels).</p>
{subject_rows(bench, samples)}
<h2>CDNS quadruplets</h2>
<p>reference | degraded condition (<code>cdns.image</code> = {html.escape(cdns['image'])}, text
<code>{html.escape(cdns['text'])}</code>, pairs <code>{html.escape(cdns.get('pairs', 'cdns'))}</code>) | positive x+ | negative x−,
the SFT base's sample from the degraded conditions.</p>
{quadruplets(train, negatives)}
<h3>What the negatives change, as the attribute reader sees it</h3>
{attribute_table(read_csv("reports/cdns/attributes.csv"))}
</body></html>
"""
    Path(OUT).write_text(page)
    stage.log.info("report: %s (%.0f kB, %d subjects, %d quadruplets)", OUT, len(page) / 1024, len(set(
        bench.column("subject_id").to_pylist())), min(QUADRUPLETS, negatives.num_rows))
    return [OUT]


if __name__ == "__main__":
    stage.run("report", main)
