"""The training loop behind ``sparse-diffusion train``: :func:`train` and its :class:`Trainer`.

Like diffusers' ``train_unconditional.py``: draw a batch, add noise at random timesteps,
predict it, step AdamW, then (here) let the algorithm update the masks, and step the EMA;
sample a grid, save a checkpoint and evaluate every so many steps. What the loop trains is a
:class:`~sparse_diffusion.state.TrainState`; where it writes is a :class:`~sparse_diffusion.run.Run`.

Every step draws its batch and its noise from a generator seeded by ``(seed, step)``, so
``--resume`` continues exactly where the uninterrupted run would be. SIGINT and SIGTERM save a
checkpoint before the run stops; a step whose loss is not finite is skipped, and a loss that
stays non-finite stops the run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import signal
import threading
import time
import warnings
from collections import defaultdict
from typing import Dict, Iterator, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .algorithms import assert_masks_synced
from .config import PLACE, TrainConfig, resolve_device
from .distributed import SINGLE, Distributed, from_environment
from .run import CHECKPOINT, Run
from .sampling import evaluate, save_samples
from .state import TrainState, check_precision
from .summary import curve_point, loss_label, machine_load, mean_finite, point_metrics, training_results, write_results
from .tasks import draw_batch

# A run whose loss stays non-finite this many steps in a row has diverged and stops.
MAX_NON_FINITE_STEPS = 10
LOAD_EVERY = 25  # steps between samples of the machine's load average


class TrainingStopped(RuntimeError):
    """The run stopped before its last step (a signal, or a diverged loss); ``exit_code`` is
    what the command line exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Trainer:
    """Trains the run ``config`` describes, from scratch or (``resume``) from its checkpoint.

    ``run`` is its folder, ``state`` what it trains. ``dist``
    (:func:`~sparse_diffusion.distributed.from_environment`) trains data-parallel: the denoiser
    runs under DDP, each rank trains on its rows of every global batch, and only rank 0 writes
    the run folder (the others wait at barriers where a file is written).
    """

    def __init__(self, config: TrainConfig, resume: bool = False, dist: Distributed = SINGLE):
        config.validate()
        self.config, self.dist = config, dist
        self.device = dist.device or resolve_device(config.device)
        writes = dist.is_main  # this process writes the run folder
        self.run = Run.for_training(config, resume=resume, writes=writes)
        check_precision(config, self.device)
        self.state = TrainState(config, self.device, autoencoder=self.run.own_autoencoder(write=writes))
        self.non_finite_steps = 0  # consecutive steps whose loss was not finite
        # Seconds per phase of the loop ("data", "forward", "backward", "optimizer",
        # "mask_update", "ema", "io"), summed while `timing` is set (benchmarks set it; on a
        # GPU each phase then synchronises).
        self.timing = False
        self.phase_seconds: Dict[str, float] = defaultdict(float)
        self._stop_signal: Optional[int] = None
        self._stop_agreed = False  # a signal reached some rank before this step's all-reduce
        if resume:
            self._resume()
        # The module the loss calls: the denoiser, or its DDP wrapper (which averages gradients);
        # with --compile, that module compiled (the training forward and backward only: sampling
        # and evaluation run eagerly, and so does a step whose gradients RigL collects with hooks).
        self.eager_network: nn.Module = self.state.denoiser
        if dist.launched:
            self.eager_network = DistributedDataParallel(
                self.state.denoiser, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.network = torch.compile(self.eager_network) if config.compile else self.eager_network
        if writes:
            self.run.write_config(self.state.changes)
        dist.barrier()  # the folder is ready (config, autoencoder copy) before any rank goes on

    def _resume(self) -> None:
        """Loads the checkpoint; settings that changed since (and the world size) are recorded."""
        checkpoint = self.run.read_checkpoint(self.device)
        if checkpoint["step"] > self.config.steps:
            raise ValueError(f"cannot resume {self.run.checkpoint_path} with --steps {self.config.steps}: the run is "
                             f"at step {checkpoint['step']}")
        self.state.load_state_dict(checkpoint)
        saved = checkpoint["config"]
        changed = {k: [saved.get(k), v] for k, v in dataclasses.asdict(self.config).items()
                   if k not in PLACE and saved.get(k) != v}
        if checkpoint.get("world_size", 1) != self.dist.world_size:
            # The global batch and its randomness do not depend on the world size: only the
            # order of the gradient sums (fp32 rounding) changes.
            changed["world_size"] = [checkpoint.get("world_size", 1), self.dist.world_size]
        if changed:
            self.state.changes.append({"step": self.state.step, "changed": changed})

    # ------------------------------------------------------------------ the loop
    def train(self) -> Dict:
        """Trains to ``config.steps``; writes samples, the loss curve, metrics and the summary.

        SIGINT (Ctrl-C) and SIGTERM finish the current step, save a checkpoint and raise
        :class:`TrainingStopped`; so does a loss that stays non-finite (without saving)."""
        from tqdm.auto import tqdm

        config, state, main = self.config, self.state, self.dist.is_main
        bar = tqdm(total=config.steps, initial=state.step, desc=self.run.folder.name, unit="step",
                   dynamic_ncols=True, disable=not main)
        start = time.perf_counter() - state.elapsed
        with self._signals_save_and_stop(), bar:  # the bar ends its line before any message
            while state.step < config.steps:
                self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{mean_finite(state.losses[-50:]):.4f}")
                state.elapsed = time.perf_counter() - start
                if state.step % LOAD_EVERY == 0:
                    state.max_load = max(state.max_load, os.getloadavg()[0])
                if config.eval_every and (state.step % config.eval_every == 0 or state.step == config.steps):
                    # before the checkpoint, which then holds the point (the last step's too, so that
                    # a run trained longer later keeps it)
                    paused = time.perf_counter()
                    state.curve.append(curve_point(state, evaluate(state, config.eval_samples, self.dist)))
                    start += time.perf_counter() - paused  # evaluation is not training time
                with self.phase("io"):
                    if main and config.sample_every and state.step % config.sample_every == 0:
                        save_samples(self.run, state)
                    if state.step == config.steps or (config.checkpoint_every
                                                      and state.step % config.checkpoint_every == 0):
                        self.save_checkpoint()
                # every rank stops after the same step: the ranks agreed in the step's all-reduce
                if self._stop_agreed if self.dist.active else self._stop_signal is not None:
                    self._stop_after_signal()
        if main:
            save_samples(self.run, state)
            self.run.write_loss_curve(state.losses, loss_label(config))
        return self._write_results()

    def train_step(self) -> float:
        """One optimizer step: batch, forward, backward, optimizer, mask update, EMA. Returns
        the loss. A step whose loss is not finite leaves the weights and the EMA unchanged;
        after :data:`MAX_NON_FINITE_STEPS` such steps in a row the run has diverged
        (:class:`TrainingStopped`)."""
        config, state = self.config, self.state
        state.denoiser.train()
        with self.phase("data"):
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + state.step)
            random = self.dist.random(generator, config.batch_size)  # and this rank's rows of the batch
            batch = draw_batch(state.dataset, config.batch_size, random, self.device)
        eager = state.algo is not None and state.algo.collects_gradients
        with self.phase("forward"), _autocast(config.precision, self.device):
            loss = state.task.loss(batch, random, network=self.eager_network if eager else self.network)
        with self.phase("backward"):
            if state.scaler is not None:
                state.scaler.scale(loss).backward()
                state.scaler.unscale_(state.optimizer)
            else:
                loss.backward()
        # the global batch's loss (every rank decides alike) and whether any rank was signalled
        value, self._stop_agreed = self.dist.mean_and_any(loss, self._stop_signal is not None)
        finite = math.isfinite(value)
        with self.phase("optimizer"):
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(state.trainable_parameters(), config.grad_clip)
            if state.scaler is not None:
                state.scaler.step(state.optimizer)  # skips the update itself when gradients overflow
                state.scaler.update()
            elif finite:
                state.optimizer.step()
        if state.algo is not None:
            with self.phase("mask_update"):
                updates = len(state.algo.history)
                state.algo.step()  # reads the gradients (RigL): before they are cleared
                if self.dist.active and len(state.algo.history) > updates:
                    self._check_masks_synced()
        with self.phase("optimizer"):
            state.optimizer.zero_grad(set_to_none=True)
        if finite:
            with self.phase("ema"):
                state.ema.step(state.denoiser.parameters())
        state.step += 1
        state.losses.append(value)
        self._count_non_finite(finite, value)
        return value

    def save_checkpoint(self) -> None:
        """Writes the whole training state to ``checkpoint.safetensors``, atomically (rank 0;
        every rank returns once it is written)."""
        if self.dist.is_main:
            self.run.write_checkpoint(self.state.state_dict(self.dist.world_size))
        self.dist.barrier()

    def _write_results(self) -> Dict:
        """``metrics.json`` and ``summary.md``, with FID too when ``eval_samples`` is set (every
        rank generates its part of the samples, rank 0 scores them and writes)."""
        config, state = self.config, self.state
        results = training_results(state, self.dist)
        if config.eval_samples:
            last = state.curve[-1] if state.curve else None
            if config.eval_every and last is not None and last["step"] == state.step:
                results["metrics"] = point_metrics(last)  # evaluated at the last step of the loop
            else:
                results["metrics"] = evaluate(state, config.eval_samples, self.dist)
                if config.eval_every:  # a run the loop had nothing left to train: the point is kept too
                    state.curve.append(curve_point(state, results["metrics"]))
                    self.save_checkpoint()
            if config.eval_every:
                results["curve"] = list(state.curve)
        results["timing"] = machine_load(state, self.dist)
        if self.dist.is_main:
            write_results(self.run, state, results)
        self.dist.barrier()
        return results

    # ------------------------------------------------------------------ stopping
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

    def _stop_after_signal(self) -> None:
        self.save_checkpoint()
        signum = self._stop_signal or signal.SIGTERM  # None: another rank was signalled
        cause = f"by {signal.Signals(signum).name}" if self._stop_signal else "with a signalled rank"
        raise TrainingStopped(f"stopped {cause} after step {self.state.step}: checkpoint saved in "
                              f"{self.run.checkpoint_path}; continue with --resume", 128 + signum)

    def _check_masks_synced(self) -> None:
        try:
            assert_masks_synced(self.state.denoiser)
        except AssertionError as error:
            raise TrainingStopped(f"step {self.state.step}: {error}; the run stops (no checkpoint of the diverged "
                                  "masks is written)", 1) from None

    def _count_non_finite(self, finite: bool, value: float) -> None:
        if finite:
            self.non_finite_steps = 0
            return
        self.non_finite_steps += 1
        step, path = self.state.step, self.run.checkpoint_path
        if self.non_finite_steps >= MAX_NON_FINITE_STEPS:
            saved = f"the last checkpoint ({path}) is kept" if path.exists() else "no checkpoint was written"
            raise TrainingStopped(
                f"the loss was not finite for {self.non_finite_steps} steps in a row (step {step}: {value}): "
                f"the run diverged; {saved}; try a lower --lr or --grad-clip", 1)
        warnings.warn(f"step {step}: the loss is {value}; the step leaves the weights unchanged", RuntimeWarning)

    # ------------------------------------------------------------------ phase timing
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


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


__all__ = ["CHECKPOINT", "TrainConfig", "Trainer", "TrainingStopped", "train"]
