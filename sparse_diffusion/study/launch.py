"""Command lines for a grid's runs: to launch each run under torchrun from ``experiment``, or
to print them for a cluster scheduler (``experiment --print-commands``).

A command carries every setting of its run as a flag, named as the ``train`` parser names it
(:func:`~sparse_diffusion.config.flag`: ``TrainConfig`` field ``x_y`` is ``--x-y``), so what it
trains is exactly what the grid describes, wherever it runs.
"""
from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ..config import TrainConfig, flag
from ..train import TrainingStopped


def flags(options: Dict) -> List[str]:
    """``--key value`` for each option that is set (None is the command's default); a boolean
    is ``--key`` or ``--no-key`` (``argparse.BooleanOptionalAction``, as ``train`` declares its
    boolean settings)."""
    result: List[str] = []
    for key, value in options.items():
        name = flag(key)
        if isinstance(value, bool):
            result.append(name if value else "--no-" + name[2:])
        elif value is not None:
            result += [name, str(value)]
    return result


def train_command(config: TrainConfig, resume: bool, nproc_per_node: int = 1,
                  program: Optional[List[str]] = None) -> List[str]:
    """The command that trains ``config``: ``sparse-diffusion train ...``, under ``torchrun
    --standalone --nproc-per-node N`` when N > 1 (one node; for several, replace
    ``--standalone`` by ``--nnodes`` and ``--rdzv-endpoint``). ``program`` replaces the launcher
    words (default: ``torchrun`` / ``sparse-diffusion``, as printed for a scheduler)."""
    arguments = flags(dataclasses.asdict(config)) + (["--resume"] if resume else [])
    if nproc_per_node > 1:
        launcher = program or ["torchrun"]
        return [*launcher, "--standalone", f"--nproc-per-node={nproc_per_node}", "-m", "sparse_diffusion", "train",
                *arguments]
    return [*(program or ["sparse-diffusion"]), "train", *arguments]


def autoencoder_command(out: Path, options: Dict) -> List[str]:
    """``sparse-diffusion train-autoencoder ...`` for a grid's study."""
    return ["sparse-diffusion", "train-autoencoder", *flags({**options, "out": str(out)})]


def run_under_torchrun(config: TrainConfig, resume: bool, nproc_per_node: int) -> None:
    """Trains ``config`` in ``nproc_per_node`` processes of this Python (``python -m
    torch.distributed.run``), their output on this terminal; a failure raises ``RuntimeError``
    naming the command."""
    command = train_command(config, resume, nproc_per_node, program=[sys.executable, "-m", "torch.distributed.run"])
    code = subprocess.run(command).returncode
    if code > 128:  # the ranks were signalled (Ctrl-C, SIGTERM) and saved a checkpoint
        raise TrainingStopped(f"stopped by signal {code - 128}; continue with the same command", code)
    if code != 0:
        raise RuntimeError(f"exit code {code} (its output is above) from: {shlex.join(command)}")
