"""The training loop behind ``sparse-diffusion train``: one run folder per run.

A run folder holds ``config.json``, ``checkpoint.pt`` (model with its masks, optimizer,
EMA, algorithm state, loss history; written atomically), ``samples/step-*.png``,
``loss.png``, ``metrics.json`` and ``summary.md``.

Every step draws its batch and its noise from a generator seeded by ``(seed, step)``, so
``--resume`` continues exactly where the uninterrupted run would be.

Dense and sparse runs get the same generic speed-ups, so that their wall-clocks compare:
image models run channels-last, AdamW is fused (or foreach) and the EMA is a foreach update.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

import sparse_diffusion as sd

from .channels_last import channels_last
from .io import atomic_save, check_writable, save_image_grid, save_loss_curve
from .tasks import build_task, count_flops, draw_batch, reference_and_samples_for_metrics

METHODS = {"dense": None, "static": sd.Static, "rigl": sd.RigL, "magran": sd.MagRan}
PRECISIONS = ("fp32", "bf16", "fp16")
# Fields that define what a checkpoint is; a resume must match them all.
IDENTITY = (
    "model", "dataset", "method", "sparsity", "block_size", "distribution", "preset", "image_size", "max_len",
    "chirodiff_kind", "seed", "batch_size", "drop_fraction", "update_interval", "autoencoder", "limit",
    "prediction",
)


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
    data_dir: Optional[str] = None
    limit: Optional[int] = None
    device: str = "auto"

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
        if self.model == "ldm" and not self.autoencoder:
            raise ValueError(
                "--model ldm needs --autoencoder PATH (a diffusers AutoencoderKL folder); train one with "
                "`sparse-diffusion train-autoencoder --dataset ... --out runs/ae` and pass --autoencoder runs/ae"
            )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Builds a run from a :class:`TrainConfig` (or resumes it) and trains it."""

    def __init__(self, config: TrainConfig, resume: bool = False):
        config.validate()
        self.config, self.out = config, Path(config.out)
        self.device = resolve_device(config.device)
        check_writable(self.out)
        self.checkpoint_path = self.out / "checkpoint.pt"
        if resume and not self.checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: there is no checkpoint in {self.out} ({self.checkpoint_path} is missing)")
        if not resume and self.checkpoint_path.exists():
            raise FileExistsError(f"{self.out} already holds a run: pass --resume to continue it, or choose another --out")
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")

        torch.manual_seed(config.seed)  # model initialisation and initial masks
        self.task, self.dataset = build_task(config, self.device)
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
            )
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.step, self.losses, self.elapsed = 0, [], 0.0
        # Seconds per phase of the loop ("data", "forward", "backward", "optimizer",
        # "mask_update", "ema", "io"), summed while `timing` is set (benchmarks set it; on a
        # GPU each phase then synchronises).
        self.timing = False
        self.phase_seconds: Dict[str, float] = defaultdict(float)
        if resume:
            self._load_checkpoint()
        else:
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    # ------------------------------------------------------------------ training
    def train(self) -> Dict:
        """Trains to ``config.steps``; writes samples, the loss curve, metrics and the summary."""
        from tqdm.auto import tqdm

        config = self.config
        bar = tqdm(total=config.steps, initial=self.step, desc=self.out.name, unit="step", dynamic_ncols=True)
        start = time.perf_counter() - self.elapsed
        while self.step < config.steps:
            self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{sum(self.losses[-50:]) / len(self.losses[-50:]):.4f}")
            with self.phase("io"):
                if config.sample_every and self.step % config.sample_every == 0:
                    self.save_samples()
                if self.step == config.steps or (config.checkpoint_every and self.step % config.checkpoint_every == 0):
                    self.save_checkpoint()
            self.elapsed = time.perf_counter() - start
        bar.close()
        self.save_samples()
        save_loss_curve(self.losses, self.out / "loss.png")
        return self.write_results()

    def train_step(self) -> float:
        """One optimizer step: batch, forward, backward, optimizer, mask update, EMA. Returns the loss."""
        config = self.config
        self.denoiser.train()
        with self.phase("data"):
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.step)
            batch = draw_batch(self.dataset, config.batch_size, generator, self.device)
        with self.phase("forward"), _autocast(config.precision, self.device):
            loss = self.task.loss(batch, generator)
        with self.phase("backward"):
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
        with self.phase("optimizer"):
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in self.denoiser.parameters() if p.requires_grad],
                                               config.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        if self.algo is not None:
            with self.phase("mask_update"):
                self.algo.step()  # reads the gradients (RigL): before they are cleared
        with self.phase("optimizer"):
            self.optimizer.zero_grad(set_to_none=True)
        with self.phase("ema"):
            self.ema.step(self.denoiser.parameters())
        self.step += 1
        self.losses.append(loss.item())
        return self.losses[-1]

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

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def generate(self, num: int, seed: int = 1234):
        """Samples from the EMA weights: images ``[num, C, H, W]`` in [-1, 1] (strokes are
        returned as ``(points, lengths)``)."""
        parameters = list(self.denoiser.parameters())
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        self.denoiser.eval()
        try:
            generator = torch.Generator().manual_seed(seed)
            return self.task.sample(num, generator, sampler=self.config.sampler, steps=self.config.sample_steps)
        finally:
            self.ema.restore(parameters)
            self.denoiser.train()

    def save_samples(self, rows: int = 8) -> Path:
        """A grid of ``rows`` rows of samples; a class-conditional model gets one class per column."""
        from .metrics.raster import rasterize_strokes

        columns = getattr(self.dataset, "num_classes", None) if getattr(self.task, "conditional", False) else None
        columns = columns or 8
        samples = self.generate(rows * columns)  # conditional: labels 0, 1, ..., C-1, 0, 1, ...
        if isinstance(samples, tuple):
            samples = rasterize_strokes(samples[0].cpu(), samples[1].cpu(), size=64)
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        save_image_grid(samples.cpu(), path, columns=columns)
        return path

    def save_checkpoint(self) -> None:
        state = {
            "version": 1,
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "model": self.denoiser.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "algo": self.algo.state_dict() if self.algo is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "losses": self.losses,
            "elapsed": self.elapsed,
        }
        atomic_save(state, self.checkpoint_path)

    def _load_checkpoint(self) -> None:
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        saved = state.get("config", {})
        mismatched = {k: (saved.get(k), getattr(self.config, k)) for k in IDENTITY if saved.get(k) != getattr(self.config, k)}
        if mismatched:
            details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"cannot resume {self.checkpoint_path}: the run was made with other settings ({details})")
        self.denoiser.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        if self.algo is not None:
            self.algo.load_state_dict(state["algo"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.losses, self.elapsed = state["step"], list(state["losses"]), state["elapsed"]

    def evaluate(self, num_samples: int) -> Dict:
        """FID / KID (Inception) and FD / KID in a locally trained network, on ``num_samples`` samples."""
        from .metrics import SampleEvaluator

        name, reference, labels, samples = reference_and_samples_for_metrics(self, num_samples)
        evaluator = SampleEvaluator(name, reference, labels, device=self.device)
        return evaluator.evaluate(samples)

    def write_results(self) -> Dict:
        config = self.config
        per_step = self.elapsed / max(self.step, 1)
        results = {
            "steps": self.step,
            "final_loss": sum(self.losses[-100:]) / len(self.losses[-100:]),
            "wall_clock_s": self.elapsed,
            "seconds_per_step": per_step,
            "samples_per_second": config.batch_size / per_step if per_step else None,
            "parameters": sum(p.numel() for p in self.denoiser.parameters()),
            "flops_per_sample": count_flops(self.task, self.dataset, self.device),
            "sparsity": self.report.global_sparsity if self.report else 0.0,
            "device": str(self.device),
            "state_bytes": self.state_bytes(),
        }
        if self.device.type == "cuda":
            results["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.algo is not None:
            results["itop_rate"] = self.algo.itop_rate()
            results["mask_updates"] = len(self.algo.history)
        if config.eval_samples:
            results["metrics"] = self.evaluate(config.eval_samples)
        (self.out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        (self.out / "summary.md").write_text(self._summary(results))
        return results

    def state_bytes(self) -> int:
        """Bytes of the training state: trainable parameters, their gradients, optimizer state."""
        trainable = [p for p in self.denoiser.parameters() if p.requires_grad]
        params = sum(p.numel() * p.element_size() for p in trainable)
        optimizer = sum(
            t.numel() * t.element_size() for state in self.optimizer.state.values() for t in state.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )
        return 2 * params + optimizer

    def _summary(self, results: Dict) -> str:
        config_rows = "\n".join(f"| {k} | {v} |" for k, v in dataclasses.asdict(self.config).items())
        result_rows = "\n".join(f"| {k} | {v} |" for k, v in results.items() if k != "metrics")
        metric_rows = "\n".join(f"| {k} | {v} |" for k, v in results.get("metrics", {}).items())
        report = str(self.report) if self.report else "dense model (no sparsity)"
        latest = sorted((self.out / "samples").glob("step-*.png"))
        return (
            f"# Run {self.out.name}\n\n## Configuration\n\n| setting | value |\n| --- | --- |\n{config_rows}\n\n"
            f"## Results\n\n| quantity | value |\n| --- | --- |\n{result_rows}\n"
            + (f"\n## Sample quality\n\n| metric | value |\n| --- | --- |\n{metric_rows}\n" if metric_rows else "")
            + f"\n## Sparsity\n\n```\n{report}\n```\n"
            + (f"\n![samples](samples/{latest[-1].name})\n\n![loss](loss.png)\n" if latest else "")
        )


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


def train(config: TrainConfig, resume: bool = False) -> Dict:
    """Trains (or resumes) the run described by ``config``; returns its ``metrics.json``."""
    return Trainer(config, resume=resume).train()


def load_run(out: str, device: str = "auto") -> Trainer:
    """The trainer of an existing run folder, at its last checkpoint (for sampling and evaluation)."""
    path = Path(out) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{out} is not a run folder: {path} is missing")
    fields = json.loads(path.read_text())
    fields["device"] = device
    return Trainer(TrainConfig(**fields), resume=True)


__all__: List[str] = ["TrainConfig", "Trainer", "load_run", "train"]
