"""Probe, not part of the project: iterative (on-policy) SFO, measured 2026-11-27 (docs/calibration.md).

Round 1 is the default run. Round r > 1 merges round r-1's SFO LoRA into its base, makes fresh CDNS
negatives with that merged model, trains a new SFO LoRA on them with the merged model as the reference, and
samples the bench. Every round runs the project's own `cdns`, `sfo` and `evaluate --model sfo` stages, in
a git worktree beside the repository whose `models/sft` is the merged model (data, judges and bench are
links to the repository's). It prints each round's paired differences against the repository's SFT base.

Run from the repository root after `make repro` (for another seed: `dvc exp apply default-s1` first; the
worktrees take this workspace's params.yaml and guidance), e.g.

    python docs/probes/iterative_sfo.py --rounds 3

About 3.5 min a round on 2 cores. Remove the worktrees afterwards with `git worktree remove --force <dir>`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from pipeline.model import SubjectFlux, adapters_disabled, load_trained
from probe_common import make_worktree, paired, run_stages

LINKED = ("data/train", "data/bench", "data/bench_refs", "models/judges")


def merge(adapter: Path, base: Path, out: Path):
    """Save base + SFO adapter as one embedded SubjectFlux (LoRA folded into the weights), checked against the
    adapter model on a random input."""
    model = load_trained(adapter, base)
    tr = model.transformer
    lora_layers = [m for m in tr.modules() if hasattr(m, "lora_A") and hasattr(m, "merge")]
    for m in lora_layers:
        m.merge()
    state = {k.replace(".base_layer.", "."): v.clone() for k, v in tr.state_dict().items() if "lora_" not in k}
    for m in lora_layers:
        m.unmerge()
    merged = FluxTransformer2DModel.from_config(tr.config)
    merged.load_state_dict(state, strict=True)
    merged = SubjectFlux(merged, model.text, model.cfg, model.image_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.tokens(torch.zeros(1, *model.noise_shape)).shape[1:], generator=g)
    c = model.condition(torch.rand(2, *model.noise_shape, generator=g) * 2 - 1, ["a photo of a circle"] * 2)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        a, b = model(x, t, c), merged(x, t, c)
        with adapters_disabled(model):
            ref = model(x, t, c)
    gap = (a - b).abs().max().item()
    print(f"merged {adapter} into {base}: max |merged - adapter| {gap:.1e}, |adapter - base| "
          f"{(a - ref).abs().max().item():.3f}")
    if gap > 1e-4:
        sys.exit("the merged model does not reproduce the adapter model")
    merged.save_pretrained(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds in all, the default run being round 1")
    parser.add_argument("--dir", type=Path, default=Path("..") / "sfo-iterative", help="where the worktrees go")
    args = parser.parse_args()
    repo = Path.cwd().resolve()
    sft_dir = repo / "reports/eval/sft"
    print(f"round 1 (this workspace): sfo - sft: {paired(sft_dir, repo / 'reports/eval/sfo')}")
    prev = repo
    for r in range(2, args.rounds + 1):
        work = (args.dir / f"round{r}").resolve()
        make_worktree(repo, work, LINKED)
        merge(prev / "models/sfo", prev / "models/sft", work / "models/sft")
        run_stages(work, "cdns", "sfo", "evaluate --model sfo")
        print(f"round {r} ({work}): sfo - sft: {paired(sft_dir, work / 'reports/eval/sfo')}")
        prev = work


if __name__ == "__main__":
    main()
