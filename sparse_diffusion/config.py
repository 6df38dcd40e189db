"""The settings of a training run (:class:`TrainConfig`, what ``sparse-diffusion train`` takes)
and the device they name."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .algorithms import MagRan, RigL, Static

METHODS = {"dense": None, "static": Static, "rigl": RigL, "magran": MagRan}
PRECISIONS = ("fp32", "bf16", "fp16")
# Fields that define what a checkpoint is; a resume must match them all.
IDENTITY = (
    "model", "dataset", "method", "sparsity", "block_size", "distribution", "preset", "image_size", "max_len",
    "chirodiff_kind", "seed", "batch_size", "drop_fraction", "update_interval", "limit", "prediction",
    "regrow_dropped",
)
# Settings that mean nothing for a dense run.
SPARSE_ONLY = ("sparsity", "block_size", "distribution", "drop_fraction", "update_interval", "regrow_dropped")
# Where a run is and what it runs on, not what it computes. A latent run keeps its own copy
# of the autoencoder (RUN/autoencoder, AUTOENCODER_COPY) and reads that one, so the
# `autoencoder` it was given is a place too.
PLACE = ("out", "device", "data_dir", "autoencoder", "dist_backend")
AUTOENCODER_COPY = "autoencoder"


@dataclass
class TrainConfig:
    """Everything a training run depends on (see ``sparse-diffusion train --help``)."""

    out: str = "runs/run"
    model: str = "pixel"  # pixel | ldm | chirodiff
    dataset: str = "fashion-mnist"
    method: str = "dense"  # dense | static | rigl | magran
    sparsity: float = 0.5
    block_size: int = 32
    distribution: str = "erk"
    drop_fraction: float = 0.3
    update_interval: int = 100
    regrow_dropped: bool = True  # RigL / MagRan: a just-dropped block may be regrown (the RigL paper)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: Optional[float] = None
    precision: str = "fp32"
    seed: int = 0
    preset: str = "demo"
    image_size: Optional[int] = None
    max_len: int = 64
    chirodiff_kind: str = "gru"
    autoencoder: Optional[str] = None
    ema_decay: float = 0.999
    prediction: str = "epsilon"  # epsilon | v
    sampler: str = "ddim"
    sample_steps: int = 50
    sample_every: int = 0
    checkpoint_every: int = 500
    eval_samples: int = 0
    eval_every: int = 0  # also evaluate every N steps: metrics.json's FID-vs-steps / -wall-clock curve
    eval_reference: int = 0  # test-split items FID compares with (0: as many as the samples)
    data_dir: Optional[str] = None
    limit: Optional[int] = None
    device: str = "auto"
    dist_backend: Optional[str] = None  # under torchrun: nccl | gloo (default: nccl with a GPU per rank)

    def validate(self) -> None:
        if self.model not in ("pixel", "ldm", "chirodiff"):
            raise ValueError(f"--model must be pixel, ldm or chirodiff, got {self.model!r}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"--steps and --batch-size must be positive, got {self.steps} and {self.batch_size}")
        if self.method not in ("dense", "static") and self.steps < self.update_interval:
            raise ValueError(f"--steps ({self.steps}) must be at least --update-interval ({self.update_interval})")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1], got {self.ema_decay}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if min(self.checkpoint_every, self.sample_every, self.eval_samples, self.eval_every, self.eval_reference) < 0:
            raise ValueError("--checkpoint-every, --sample-every, --eval-samples, --eval-every and --eval-reference "
                             "must be >= 0")
        if self.eval_every and not self.eval_samples:
            raise ValueError(f"--eval-every {self.eval_every} needs --eval-samples N (how many samples each FID uses)")
        if self.model == "ldm" and not self.autoencoder:
            raise ValueError(
                "--model ldm needs --autoencoder PATH (a diffusers AutoencoderKL folder); train one with "
                "`sparse-diffusion train-autoencoder --dataset ... --out runs/ae` and pass --autoencoder runs/ae"
            )


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; a device that this
    machine does not have is a ``ValueError`` naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no usable CUDA device (torch.cuda.is_available() "
                             "is False); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device
