"""What every stage shares: logging, a progress bar that is quiet under CI, seeding, one closing log line
with the wall time, the peak memory and what the stage wrote, and a clean exit on bad input."""
from __future__ import annotations

import csv
import importlib
import json
import logging
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ConfigError

log = logging.getLogger("pipeline")


def progress(iterable=None, **kw):
    """tqdm, silent when CI is set or stderr is not a terminal."""
    kw.setdefault("disable", bool(os.environ.get("CI")) or not sys.stderr.isatty())
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (a stage tag, a base seed, a row, ...), via numpy's
    SeedSequence: distinct tuples give independent streams, with no arithmetic collisions."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def set_threads(n: int | None = None):
    """Intra-op threads: `n`, else $SFO_THREADS, else all cores."""
    n = n or int(os.environ.get("SFO_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def optimizer(kind: str, params: list, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """`adamw` (torch), or `prodigy` (the paper's: the `prodigyopt` package, lr 1 = its learning-rate multiplier)."""
    if kind == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optimizer prodigy needs the prodigyopt package: pip install prodigyopt==1.1.2 (make setup installs it)") from None
        return Prodigy(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def peak_rss_mb() -> float:
    """This process's own peak resident memory in MB: VmHWM on Linux. Not ru_maxrss, which Linux carries over
    from the parent at fork and exec, so a stage started by `dvc` would report at least dvc's size. Elsewhere
    ru_maxrss (bytes on macOS, KiB on other Unix)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """A training curve for DVC plots: one row per logged step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def quiet_libraries(load: bool = True):
    """No per-file progress bars or warnings from the model libraries: our own bars and log lines say it.
    `load=False` (what `run` does) quiets only the libraries already imported, and sets the environment variables
    transformers and diffusers read at import for those imported later: a stage that needs neither (`metrics`
    needs no diffusers, `report` neither) then pays no seconds importing them."""
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(var, value)
    for lib in ("diffusers", "transformers"):
        if load or lib in sys.modules:
            lib_logging = importlib.import_module(f"{lib}.utils.logging")
            lib_logging.set_verbosity_error()
            lib_logging.disable_progress_bar()
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings            # peft, on the SFO LoRA added beside the SFT LoRA: intended here
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


class Diverged(RuntimeError):
    """The training loss stopped being a finite number: the weights are lost, nothing is written."""


def check_finite(name: str, step: int, loss: float, hint: str):
    """Stop a training stage at the first step whose (process-averaged) loss is NaN or infinite."""
    if not math.isfinite(loss):
        raise Diverged(f"{name}: the loss is {loss} at step {step}: training diverged and nothing was written; "
                       f"{hint}")


def run(name: str, main: Callable[[], list | None]):
    """Run a stage's `main`; it returns the paths it wrote. Bad input exits 2 with the message alone."""
    logging.basicConfig(level=os.environ.get("SFO_LOG", "INFO"), format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_libraries(load=False)
    t0 = time.time()
    try:
        written = main() or []
    except (ConfigError, Diverged) as e:
        log.error("%s: stopped: %s", name, e)
        sys.exit(2)
    log.info("%s: done in %.1f s at %d torch threads, peak RSS %.0f MB, wrote %s", name, time.time() - t0,
             torch.get_num_threads(), peak_rss_mb(), ", ".join(str(p) for p in written) or "nothing")
