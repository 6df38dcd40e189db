"""What a run trains and how far it got: :class:`TrainState`, built from a :class:`TrainConfig`.

The task (with its denoiser), the training set, AdamW, the EMA of the weights, the mask-update
algorithm, the fp16 gradient scaler and the sparsity report, plus the step, the loss history,
the training wall-clock, the evaluations made so far and the settings a resume changed.
:meth:`TrainState.state_dict` is what a checkpoint holds (:mod:`.checkpoint` stores it);
:meth:`TrainState.load_state_dict` puts it back, bit for bit.

As in diffusers' ``train_unconditional.py``, the denoiser is made sparse before the optimizer
and the EMA are created, so that both hold the block-sparse parameters. Dense and sparse runs
get the same generic speed-ups, so that their wall-clocks compare: image models run
channels-last with GroupNorm and SiLU fused (:mod:`.group_norm_silu`), AdamW is fused (or
foreach) and the EMA is a foreach update.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
from torch import nn

from .channels_last import channels_last
from .checkpoint import CheckpointError
from .config import METHODS, TrainConfig, block_pair
from .group_norm_silu import fuse_group_norm_silu
from .sparsify import SparsityReport, sparsify
from .tasks import build_task


class TrainState:
    """The model, its training machinery and its progress, built from ``config`` on ``device``.

    ``autoencoder``: the folder a latent run reads its autoencoder from instead of
    ``config.autoencoder`` (the run's own copy, see :meth:`~sparse_diffusion.run.Run.own_autoencoder`).
    The global seed is set to ``config.seed`` first: the model's initialisation and its initial
    masks depend on nothing else.
    """

    def __init__(self, config: TrainConfig, device: torch.device, autoencoder: Optional[str] = None):
        self.config, self.device = config, device
        torch.manual_seed(config.seed)  # model initialisation and initial masks
        build_config = dataclasses.replace(config, autoencoder=autoencoder) if autoencoder else config
        self.task, self.dataset = build_task(build_config, device)
        self.report: Optional[SparsityReport] = None
        if config.method != "dense":
            self.report = sparsify(self.denoiser, config.sparsity, block_size=block_pair(config.block_size),
                                   distribution=config.distribution)
        self.task.to(device)
        if config.model != "chirodiff":
            channels_last(self.task)
            fuse_group_norm_silu(self.denoiser)
        self.optimizer = make_adamw(self.trainable_parameters(), config.lr, config.weight_decay, device)
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(self.denoiser.parameters(), decay=config.ema_decay, foreach=True)
        self.algo = None
        if METHODS[config.method] is not None:
            self.algo = METHODS[config.method](
                self.denoiser, self.optimizer, total_steps=config.steps, update_interval=config.update_interval,
                drop_fraction=config.drop_fraction, seed=config.seed, ema=self.ema,
                regrow_dropped=config.regrow_dropped,
            )
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.step, self.losses, self.elapsed = 0, [], 0.0
        # Evaluations during training: [{"step", "wall_clock_s", "load_1min", metrics...}].
        self.curve: List[Dict] = []
        # The machine's 1-minute load average, sampled while training: was anything else running?
        self.max_load = 0.0
        # Earlier settings of this run: [{"step": s, "changed": {field: [before, after]}}].
        self.changes: List[Dict] = []

    @property
    def denoiser(self) -> nn.Module:
        """The network being trained (the task's UNet or ChiroDiff network)."""
        return self.task.denoiser

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def state_dict(self, world_size: int = 1) -> Dict:
        """What a checkpoint holds: the settings, the weights with their masks, the optimizer,
        the EMA, the algorithm, the scaler, the progress, and the ``world_size`` it trained on."""
        ema = self.ema.state_dict()
        return {
            "config": dataclasses.asdict(self.config),
            "changes": self.changes,
            "step": self.step,
            "model": self.denoiser.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": {**ema, "shadow_params": list(ema["shadow_params"])},
            "algo": self.algo.state_dict() if self.algo is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "elapsed": self.elapsed,
            "curve": self.curve,
            "max_load": self.max_load,
            "world_size": world_size,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Puts back what :meth:`state_dict` returned (a checkpoint as
        :meth:`~sparse_diffusion.run.Run.read_checkpoint` reads it: checked and migrated)."""
        self.denoiser.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _lay_out_like_parameters(self.optimizer)
        _load_ema(self.ema, state["ema"], self.denoiser)
        if self.algo is not None:
            self.algo.load_state_dict(state["algo"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.losses, self.elapsed = state["step"], state["losses"].tolist(), state["elapsed"]
        self.curve, self.max_load = list(state.get("curve", [])), state.get("max_load", 0.0)
        self.changes = list(state.get("changes", []))


def check_precision(config: TrainConfig, device: torch.device) -> None:
    """fp16 (with its gradient scaler) trains on CUDA only: a ``ValueError`` elsewhere."""
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")


def make_adamw(parameters, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with its fused implementation where this torch has one for ``device`` (CPU and
    CUDA), else the foreach one: the same update, fewer passes over memory."""
    try:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, foreach=device.type == "cuda")


def _lay_out_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state tensors shaped like their parameter take its memory format (a
    checkpoint stores them contiguous; fused and foreach updates want matching strides)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _load_ema(ema, state: Dict, model: nn.Module) -> None:
    """Loads an ``EMAModel`` state into the EMA's own shadow tensors, in place, so that whoever
    holds them (an algorithm zeroing regrown blocks) keeps seeing the live ones."""
    shadows = state["shadow_params"]
    if len(shadows) != len(ema.shadow_params) or any(a.shape != b.shape for a, b in zip(shadows, ema.shadow_params)):
        raise CheckpointError("the checkpoint's EMA does not match the model's parameters")
    ema.load_state_dict({k: v for k, v in state.items() if k != "shadow_params"})
    with torch.no_grad():
        for shadow, saved in zip(ema.shadow_params, shadows):
            shadow.copy_(saved)
