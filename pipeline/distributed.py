"""Data-parallel training for `sft`, `sfo` and `control` with accelerate (DDP), `train.processes` processes.

The DVC command stays `python -m pipeline.stages.<stage>`: with `train.processes` > 1 the stage relaunches
itself under `accelerate launch --multi_gpu --num_processes N` (DDP through torch.distributed: NCCL on GPUs, gloo
on CPUs), and each process
trains on its share of every global batch. Every process draws the same global batch from the same seeded
generator and keeps rows `rank::N`-contiguous (`local`), DDP averages the gradients, so a step's update equals
the one-process update on the global batch up to float summation order (tests/test_distributed.py checks the
loss curves). Only the main process writes checkpoints and outputs. Multi-node: run the same command under
your own `accelerate launch --config_file ...` on each node; the stage sees WORLD_SIZE and does not relaunch.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from . import stage


def launched() -> bool:
    """True inside a process started by accelerate/torchrun (or any launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def relaunch_if_needed(processes: int, module: str) -> None:
    """With `processes` > 1 and no launcher around us, run this stage under `accelerate launch` and exit with
    its status; otherwise return and let the stage run here."""
    if processes <= 1 or launched():
        return
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--multi_gpu", "-m", module, *sys.argv[1:]]
    stage.log.info("%s: relaunching under accelerate with %d processes", module, processes)
    sys.exit(subprocess.call(cmd))


class Parallel:
    """The accelerate state a training stage needs: device, rank, the DDP-wrapped module, gathering."""

    def __init__(self):
        from accelerate import Accelerator
        self.acc = Accelerator(cpu=not torch.cuda.is_available())
        self.device, self.rank, self.size = self.acc.device, self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        if not self.main:                  # one log per stage: the other processes only warn
            stage.log.setLevel("WARNING")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module to call for trainable forwards: DDP-wrapped when there is more than one process."""
        module.to(self.device)
        if self.size == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def local(self, n: int) -> slice:
        """This process's rows of a global batch of `n` (contiguous shares; `n` must divide evenly)."""
        if n % self.size:
            from .config import ConfigError
            raise ConfigError(f"a global batch of {n} does not split over {self.size} processes "
                              f"(train.processes); choose a multiple")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over processes (equal shares: the global batch's mean)."""
        if self.size == 1:
            return value
        return self.acc.reduce(value.detach().to(self.device).float(), reduction="mean")

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Per-row values of every process, in global-batch order."""
        return value.detach() if self.size == 1 else self.acc.gather(value.detach().to(self.device).contiguous())

    def barrier(self):
        self.acc.wait_for_everyone()

    def work_dir(self, directory: str, fp: dict):
        """A `checkpoint.WorkDir` that the main process opens (and cleans, if stale) before the others open it."""
        from .checkpoint import WorkDir
        work = WorkDir(directory, fp) if self.main else None
        self.barrier()
        return work or WorkDir(directory, fp)

    def progress(self, iterable, **kw):
        """`stage.progress` on the main process; no bar on the others."""
        return stage.progress(iterable, **kw, **({} if self.main else {"disable": True}))
