"""The training loop behind ``sparse-diffusion train``: one run folder per run.

A run folder holds ``config.json`` (the settings in effect, and the ones changed on a resume),
``checkpoint.safetensors`` (model with its masks, optimizer, EMA, algorithm state, loss
history; tensors in safetensors and the rest in JSON, so loading it runs no code; written
atomically), ``samples/step-*.png``, ``loss.png``, ``metrics.json`` and ``summary.md``. The
folder is self-contained: it can be copied or moved, and ``sample`` / ``evaluate`` / ``--resume``
read the folder they are given.

Every step draws its batch and its noise from a generator seeded by ``(seed, step)``, so
``--resume`` continues exactly where the uninterrupted run would be. SIGINT and SIGTERM save a
checkpoint before the run stops; a step whose loss is not finite is skipped, and a loss that
stays non-finite stops the run.

Dense and sparse runs get the same generic speed-ups, so that their wall-clocks compare:
image models run channels-last, AdamW is fused (or foreach) and the EMA is a foreach update.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparse_diffusion as sd

from .channels_last import channels_last
from .checkpoint import CheckpointError, load_state, non_finite_tensors, save_state
from .config import AUTOENCODER_COPY, IDENTITY, METHODS, PLACE, TrainConfig, resolve_device, settings_it_predates
from .distributed import SINGLE, Distributed, from_environment
from .io import atomic_write_folder, check_writable, remove_stale_temporaries, save_loss_curve
from .outputs import RunOutputs, loss_label, mean_finite
from .tasks import build_task, draw_batch

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # torch.save pickles (before version 2): never unpickled
# A run whose loss stays non-finite this many steps in a row has diverged and stops.
MAX_NON_FINITE_STEPS = 10
LOAD_EVERY = 25  # steps between samples of the machine's load average


class TrainingStopped(RuntimeError):
    """The run stopped before its last step (a signal, or a diverged loss); ``exit_code`` is
    what the command line exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Trainer(RunOutputs):
    """Builds a run from a :class:`TrainConfig` (or resumes it) and trains it.

    ``writable=False`` opens an existing run for reading only (sampling, evaluation, export):
    nothing in its folder is written, so a run the user cannot write can still be read.

    ``dist`` (:func:`~sparse_diffusion.distributed.from_environment`) trains data-parallel: the
    denoiser runs under DDP, each rank trains on its rows of every global batch, and only rank
    0 writes the run folder (the others wait at barriers where a file is written).
    """

    def __init__(self, config: TrainConfig, resume: bool = False, writable: bool = True,
                 dist: Distributed = SINGLE):
        config.validate()
        self.config, self.out, self.writable, self.dist = config, Path(config.out), writable, dist
        self.device = dist.device or resolve_device(config.device)
        writes = writable and dist.is_main  # this process writes the run folder
        if writes:
            check_writable(self.out)
            remove_stale_temporaries(self.out)
        self.checkpoint_path = self.out / CHECKPOINT
        legacy = self.out / LEGACY_CHECKPOINT
        if resume and not self.checkpoint_path.exists():
            if legacy.exists():
                load_state(legacy)  # raises: says why an old pickle is not read
            raise FileNotFoundError(f"there is no checkpoint in {self.out} ({self.checkpoint_path} is missing)")
        if not resume and (self.checkpoint_path.exists() or legacy.exists()):
            raise FileExistsError(f"{self.out} already holds a run: pass --resume to continue it, or choose another --out")
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")

        torch.manual_seed(config.seed)  # model initialisation and initial masks
        own_autoencoder = self.out / AUTOENCODER_COPY
        has_own = config.model == "ldm" and (own_autoencoder / "config.json").is_file()
        build_config = dataclasses.replace(config, autoencoder=str(own_autoencoder)) if has_own else config
        self.task, self.dataset = build_task(build_config, self.device)
        if config.model == "ldm" and writes and not has_own:
            autoencoder = self.task.autoencoder
            atomic_write_folder(lambda folder: autoencoder.save_pretrained(folder, safe_serialization=True),
                                own_autoencoder)
        self.denoiser: nn.Module = self.task.denoiser
        self.report = None
        if config.method != "dense":
            self.report = sd.sparsify(self.denoiser, config.sparsity, block_size=config.block_size,
                                      distribution=config.distribution)
        self.task.to(self.device)
        if config.model != "chirodiff":
            channels_last(self.task)
        parameters = [p for p in self.denoiser.parameters() if p.requires_grad]
        self.optimizer = make_adamw(parameters, config.lr, config.weight_decay, self.device)
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
        self.non_finite_steps = 0  # consecutive steps whose loss was not finite
        # Seconds per phase of the loop ("data", "forward", "backward", "optimizer",
        # "mask_update", "ema", "io"), summed while `timing` is set (benchmarks set it; on a
        # GPU each phase then synchronises).
        self.timing = False
        self.phase_seconds: Dict[str, float] = defaultdict(float)
        self._stop_signal: Optional[int] = None
        self._stop_agreed = False  # a signal reached some rank before this step's all-reduce
        if resume:
            self._load_checkpoint()
        # The module the loss calls: the denoiser, or its DDP wrapper (which averages gradients).
        self.network: nn.Module = self.denoiser
        if dist.launched:
            self.network = DistributedDataParallel(
                self.denoiser, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if writes:
            self._write_config()
        dist.barrier()  # the folder is ready (config, autoencoder copy) before any rank goes on

    # ------------------------------------------------------------------ training
    def train(self) -> Dict:
        """Trains to ``config.steps``; writes samples, the loss curve, metrics and the summary.

        SIGINT (Ctrl-C) and SIGTERM finish the current step, save a checkpoint and raise
        :class:`TrainingStopped`; so does a loss that stays non-finite (without saving)."""
        from tqdm.auto import tqdm

        config = self.config
        main = self.dist.is_main
        bar = tqdm(total=config.steps, initial=self.step, desc=self.out.name, unit="step", dynamic_ncols=True,
                   disable=not main)
        start = time.perf_counter() - self.elapsed
        with self._signals_save_and_stop(), bar:  # the bar ends its line before any message
            while self.step < config.steps:
                self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{mean_finite(self.losses[-50:]):.4f}")
                self.elapsed = time.perf_counter() - start
                if self.step % LOAD_EVERY == 0:
                    self.max_load = max(self.max_load, os.getloadavg()[0])
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                    paused = time.perf_counter()  # before the checkpoint, which then holds the point
                    self.curve.append(self.curve_point(self.evaluate(config.eval_samples)))
                    start += time.perf_counter() - paused  # evaluation is not training time
                with self.phase("io"):
                    if main and config.sample_every and self.step % config.sample_every == 0:
                        self.save_samples()
                    if self.step == config.steps or (config.checkpoint_every and self.step % config.checkpoint_every == 0):
                        self.save_checkpoint()
                # every rank stops after the same step: the ranks agreed in the step's all-reduce
                if self._stop_agreed if self.dist.active else self._stop_signal is not None:
                    self.save_checkpoint()
                    signum = self._stop_signal or signal.SIGTERM  # None: another rank was signalled
                    cause = f"by {signal.Signals(signum).name}" if self._stop_signal else "with a signalled rank"
                    raise TrainingStopped(
                        f"stopped {cause} after step {self.step}: checkpoint saved in {self.checkpoint_path}; "
                        f"continue with --resume", 128 + signum)
        if main:
            self.save_samples()
            save_loss_curve(self.losses, self.out / "loss.png", ylabel=loss_label(config))
        return self.write_results()

    @contextlib.contextmanager
    def _signals_save_and_stop(self) -> Iterator[None]:
        """While training (in the main thread): SIGINT and SIGTERM ask the loop to stop after
        the current step; a second SIGINT interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def train_step(self) -> float:
        """One optimizer step: batch, forward, backward, optimizer, mask update, EMA. Returns
        the loss. A step whose loss is not finite leaves the weights and the EMA unchanged;
        after :data:`MAX_NON_FINITE_STEPS` such steps in a row the run has diverged
        (:class:`TrainingStopped`)."""
        config = self.config
        self.denoiser.train()
        with self.phase("data"):
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.step)
            rows = self.dist.rows(config.batch_size)  # this rank's part of the global batch
            batch = draw_batch(self.dataset, config.batch_size, generator, self.device, rows)
        with self.phase("forward"), _autocast(config.precision, self.device):
            loss = self.task.loss(batch, generator, rows, network=self.network)
        with self.phase("backward"):
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
        # the global batch's loss (every rank decides alike) and whether any rank was signalled
        value, self._stop_agreed = self.dist.mean_and_any(loss, self._stop_signal is not None)
        finite = math.isfinite(value)
        with self.phase("optimizer"):
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in self.denoiser.parameters() if p.requires_grad],
                                               config.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips the update itself when gradients overflow
                self.scaler.update()
            elif finite:
                self.optimizer.step()
        if self.algo is not None:
            with self.phase("mask_update"):
                updates = len(self.algo.history)
                self.algo.step()  # reads the gradients (RigL): before they are cleared
                if self.dist.active and len(self.algo.history) > updates:
                    self._check_masks_synced()
        with self.phase("optimizer"):
            self.optimizer.zero_grad(set_to_none=True)
        if finite:
            with self.phase("ema"):
                self.ema.step(self.denoiser.parameters())
        self.step += 1
        self.losses.append(value)
        self._count_non_finite(finite, value)
        return value

    def _check_masks_synced(self) -> None:
        try:
            sd.assert_masks_synced(self.denoiser)
        except AssertionError as error:
            raise TrainingStopped(f"step {self.step}: {error}; the run stops (no checkpoint of the diverged "
                                  "masks is written)", 1) from None

    def _count_non_finite(self, finite: bool, value: float) -> None:
        if finite:
            self.non_finite_steps = 0
            return
        self.non_finite_steps += 1
        if self.non_finite_steps >= MAX_NON_FINITE_STEPS:
            saved = f"the last checkpoint ({self.checkpoint_path}) is kept" if self.checkpoint_path.exists() else \
                "no checkpoint was written"
            raise TrainingStopped(
                f"the loss was not finite for {self.non_finite_steps} steps in a row (step {self.step}: {value}): "
                f"the run diverged; {saved}; try a lower --lr or --grad-clip", 1)
        warnings.warn(f"step {self.step}: the loss is {value}; the step leaves the weights unchanged", RuntimeWarning)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the block's wall-clock to ``phase_seconds[name]`` while ``timing`` is set."""
        if not self.timing:
            yield
            return
        _synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.device)
            self.phase_seconds[name] += time.perf_counter() - start

    def save_checkpoint(self) -> None:
        """Writes the whole training state to ``checkpoint.safetensors``, atomically (rank 0;
        every rank returns once it is written)."""
        if self.dist.is_main:
            self._write_checkpoint()
        self.dist.barrier()

    def _write_checkpoint(self) -> None:
        ema = self.ema.state_dict()
        state = {
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
            "world_size": self.dist.world_size,
        }
        save_state(state, self.checkpoint_path)

    def _load_checkpoint(self) -> None:
        path = self.checkpoint_path
        state = load_state(path, self.device)
        missing = {"config", "step", "model", "optimizer", "ema", "algo", "losses"} - set(state)
        if missing:
            raise CheckpointError(f"{path} lacks {sorted(missing)}: it is not a training checkpoint")
        saved = settings_it_predates(state["config"])
        mismatched = {k: (saved.get(k), getattr(self.config, k)) for k in IDENTITY if saved.get(k) != getattr(self.config, k)}
        if mismatched:
            details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"cannot resume {path}: the run was made with other settings ({details})")
        bad = non_finite_tensors({"model": state["model"], "ema": state["ema"]["shadow_params"]})
        if bad:
            raise CheckpointError(f"{path} holds non-finite weights ({', '.join(bad[:3])}"
                                  f"{', ...' if len(bad) > 3 else ''}): refused")
        if state["step"] > self.config.steps and self.writable:
            raise ValueError(f"cannot resume {path} with --steps {self.config.steps}: the run is at step {state['step']}")
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
        changed = {k: [saved.get(k), v] for k, v in dataclasses.asdict(self.config).items()
                   if k not in PLACE and saved.get(k) != v}
        if self.writable and state.get("world_size", 1) != self.dist.world_size:
            # The global batch and its randomness do not depend on the world size: only the
            # order of the gradient sums (fp32 rounding) changes.
            changed["world_size"] = [state.get("world_size", 1), self.dist.world_size]
        if changed and self.writable:
            self.changes.append({"step": self.step, "changed": changed})

    def _write_config(self) -> None:
        """``config.json``: the settings in effect, and under ``changes`` those a resume changed."""
        record = {**dataclasses.asdict(self.config), "changes": self.changes}
        (self.out / "config.json").write_text(json.dumps(record, indent=2) + "\n")


def make_adamw(parameters, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with its fused implementation where this torch has one for ``device`` (CPU and
    CUDA), else the foreach one: the same update, fewer passes over memory."""
    try:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, foreach=device.type == "cuda")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


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


def train(config: TrainConfig, resume: bool = False) -> Dict:
    """Trains (or resumes) the run described by ``config``; returns its ``metrics.json``.
    Under ``torchrun`` every process calls it and they train one run data-parallel
    (:mod:`sparse_diffusion.distributed`)."""
    dist = from_environment(config.device, config.dist_backend, config.batch_size)
    trainer, wait = None, False
    try:
        trainer = Trainer(config, resume=resume, dist=dist)
        results = trainer.train()
        wait = True
    except TrainingStopped:
        wait = True  # every rank stops after the same step
        raise
    finally:
        # DDP holds the process group: free it before the group ends (a group that outlives
        # destroy_process_group can abort the process at exit). After another error, do not
        # wait for the other ranks: torchrun stops them.
        del trainer
        gc.collect()
        dist.close(wait)
    return results


def load_run(run: str, device: str = "auto") -> Trainer:
    """The trainer of the run folder ``run`` at its last checkpoint, opened read-only (for
    sampling, evaluation and export). The folder is the truth: a copied or moved run loads
    its own weights, whatever path its ``config.json`` was written under."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run folder: {path} is missing")
    try:
        fields = json.loads(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid run configuration: {error}") from None
    fields.pop("changes", None)
    fields = settings_it_predates(fields)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path} has settings this version does not know: {', '.join(unknown)}")
    fields.update(out=str(run), device=device)
    return Trainer(TrainConfig(**fields), resume=True, writable=False)


__all__: List[str] = ["TrainConfig", "Trainer", "load_run", "train"]
