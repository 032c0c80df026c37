"""Resumable stages (issue: kills and lost workers cost no data): a work directory per stage, `checkpoints/<stage>/`,
holding training checkpoints or finished shards. It is gitignored and not a DVC output: DVC never deletes it, and
the stage's run-cache entry stays usable (DVC does not run-cache a stage with a `persist` output).

- A checkpoint is a directory `step-NNNNNN/` written under a temporary name and renamed, so it exists complete
  or not at all: the trainable weights (safetensors), the optimizer state (`torch.save`, read back with
  `weights_only=True`: no pickle code runs), the RNG states of torch, numpy, Python and the data-order
  generator, the step and the loop's logged rows (JSON). Only the newest is kept.
- Every work directory records a fingerprint of what produced it: the stage's params sections and the hashes
  of its input files. Work written under another fingerprint is refused with the keys that differ, never
  silently resumed.
- A finished stage empties its directory down to `finished.json` (a small summary), so the stage's declared
  outputs are all that it leaves of substance.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError

FINGERPRINT, FINISHED = "fingerprint.json", "finished.json"


def fault_point(name: str):
    """Fault injection for the kill tests: with SFO_FAULT=<name>:<n> the process SIGKILLs itself the n-th time
    it reaches `name` (a real kill: nothing is flushed or cleaned up); with SFO_FAULT_ONCE=<file> as well, only
    the first process across a run (e.g. one of several Ray workers) does. No effect when SFO_FAULT is unset."""
    spec = os.environ.get("SFO_FAULT", "")
    target, _, nth = spec.rpartition(":")
    if target != name:
        return
    fault_point.counts[name] = fault_point.counts.get(name, 0) + 1
    if fault_point.counts[name] != int(nth):
        return
    once = os.environ.get("SFO_FAULT_ONCE")     # a file: only the first process to create it dies
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), 9)


fault_point.counts = {}


def hash_inputs(*paths: str | Path) -> dict[str, str]:
    """md5 of every file under each path (sorted walk): the identity of a stage's inputs."""
    out = {}
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        h = hashlib.md5()
        for f in files:
            if not f.exists():
                raise ConfigError(f"{f}: input missing")
            h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        out[str(root)] = h.hexdigest()
    return out


# Training keys that do not change what a run computes: a checkpoint stays valid across them.
TRAIN_IGNORED = ("train.checkpoint_every", "train.processes")


def fingerprint(sections: dict, inputs: list[str | Path], ignore: tuple[str, ...] = ()) -> dict:
    """What a stage's work depends on: its params sections (dataclasses or dicts; `ignore` lists "section.key"s
    that do not change results, such as worker counts) and the hashes of its input files."""
    params = {k: {f: x for f, x in (v if isinstance(v, dict) else v.__dict__).items() if f"{k}.{f}" not in ignore}
              for k, v in sections.items()}
    return {"params": params, "inputs": hash_inputs(*inputs)}


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WorkDir:
    """A stage's persistent work directory, bound to one fingerprint."""

    def __init__(self, directory: str | Path, fp: dict):
        self.dir, self.fp = Path(directory), json.loads(json.dumps(fp))
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in [*self.dir.glob("tmp-*"), *self.dir.glob(".*.tmp-*")]:   # writes killed before their rename
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        fp_file = self.dir / FINGERPRINT
        if fp_file.exists():
            old = json.loads(fp_file.read_text())
            if old != self.fp:
                changes = "; ".join(_diff(old, self.fp)[:8])
                raise ConfigError(f"{self.dir}: holds unfinished work written with different params or inputs "
                                  f"({changes}); it is not resumed. Restore them, or delete {self.dir} to start over")
        else:
            (self.dir / FINISHED).unlink(missing_ok=True)
            atomic_write_text(fp_file, json.dumps(self.fp, indent=1, sort_keys=True))

    def finish(self, summary: dict):
        """Remove all work; leave `finished.json` only."""
        for p in self.dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        atomic_write_text(self.dir / FINISHED, json.dumps(summary, indent=1, sort_keys=True) + "\n")

    # --- training checkpoints ----------------------------------------------------------------------------
    def latest(self) -> Path | None:
        steps = sorted(self.dir.glob("step-*"))
        return steps[-1] if steps else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             generators: dict[str, torch.Generator], extra: dict, stage: str):
        tmp = self.dir / f"tmp-step-{step:06d}"
        tmp.mkdir()
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "weights.safetensors"))
        fault_point(f"{stage}:checkpoint-write")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), **{f"gen.{k}": g.get_state() for k, g in generators.items()}}
        save_file(rng, str(tmp / "rng.safetensors"))
        np_state = np.random.get_state()
        state = {"step": step, "extra": extra, "python_rng": _jsonable(random.getstate()),
                 "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.dir / f"step-{step:06d}"
        os.rename(tmp, final)                                   # the checkpoint exists complete, or not at all
        _fsync_dir(self.dir)
        for old in self.dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old)

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               generators: dict[str, torch.Generator]) -> tuple[int, dict]:
        """Load the newest checkpoint into model, optimizer and generators; returns (step, extra), or (0, {})."""
        ckpt = self.latest()
        if ckpt is None:
            return 0, {}
        where = str(ckpt)
        try:
            weights = load_file(str(ckpt / "weights.safetensors"))
            rng = load_file(str(ckpt / "rng.safetensors"))
            opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
            state = json.loads((ckpt / "state.json").read_text())
        except Exception as e:   # a corrupt or crafted file: refused, nothing of it executed
            raise ConfigError(f"{where}: unreadable checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                              f"delete it to start over") from None
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        if set(weights) != trainable:
            raise ConfigError(f"{where}: its weights do not match this model's trainable parameters")
        with torch.no_grad():
            for n, w in weights.items():
                if params[n].shape != w.shape:
                    raise ConfigError(f"{where}: {n} has shape {tuple(w.shape)}, the model {tuple(params[n].shape)}")
                params[n].copy_(w)
        optimizer.load_state_dict(opt_state)
        torch.set_rng_state(rng["torch"])
        for k, g in generators.items():
            g.set_state(rng[f"gen.{k}"])
        random.setstate(_tuples(state["python_rng"]))
        np_state = state["numpy_rng"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        return state["step"], state["extra"]


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f"tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
