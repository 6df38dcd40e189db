"""What a run writes and reports besides its checkpoint: samples (from the EMA weights, split
among the ranks for FID), ``metrics.json``, ``summary.md``. Mixed into
:class:`~sparse_diffusion.train.Trainer`, whose state it reads."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

from sparse_kernels.extension import cpu_model

from .config import SPARSE_ONLY, TrainConfig
from .io import save_image_grid
from .tasks import count_flops, metric_inputs

# Below this many samples FID's covariance (2048 Inception features) is rank-deficient and
# FID is biased upward: results carry a caveat.
MIN_FID_SAMPLES = 2048
# A run's timing is "clean" when the machine's 1-minute load average stayed within this much
# of the threads the run itself uses: nothing else was competing for the CPUs.
LOAD_MARGIN = 0.75


class RunOutputs:
    """Samples, metrics and the summary of a :class:`~sparse_diffusion.train.Trainer`."""

    @torch.no_grad()
    def generate(self, num: int, seed: int = 1234, first: int = 0):
        """Samples from the EMA weights: images ``[num, C, H, W]`` in [-1, 1] (strokes are
        returned as ``(points, lengths)``). A class-conditional model samples the classes in
        turn, starting with that of sample number ``first``."""
        parameters = list(self.denoiser.parameters())
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        self.denoiser.eval()
        options = dict(sampler=self.config.sampler, steps=self.config.sample_steps)
        if getattr(self.task, "conditional", False):
            options["labels"] = torch.arange(first, first + num) % self.task.unet.config.num_class_embeds
        try:
            generator = torch.Generator().manual_seed(seed)
            return self.task.sample(num, generator, **options)
        finally:
            self.ema.restore(parameters)
            self.denoiser.train()

    def generate_split(self, num: int, seed: int = 1234):
        """:meth:`generate` shared among the ranks: rank r makes its contiguous part of the
        ``num`` samples (seeded by ``seed + r``); rank 0 returns them all, the others ``None``.
        In a single process it is ``generate(num, seed)``."""
        if not self.dist.active:
            return self.generate(num, seed)
        bounds = [num * r // self.dist.world_size for r in range(self.dist.world_size + 1)]
        first, stop = bounds[self.dist.rank], bounds[self.dist.rank + 1]
        part = self.generate(stop - first, seed + self.dist.rank, first) if stop > first else None
        if isinstance(part, tuple):
            part = tuple(t.cpu() for t in part)
        elif part is not None:
            part = part.cpu()
        parts = [p for p in self.dist.gather(part) if p is not None]
        if not self.dist.is_main:
            return None
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(pieces) for pieces in zip(*parts))
        return torch.cat(parts)

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

    def evaluate(self, num_samples: int) -> Dict:
        """FID / KID (Inception) and FD / KID in a locally trained network, on ``num_samples``
        EMA samples. Below :data:`MIN_FID_SAMPLES` the result carries a ``caveat``."""
        from .metrics import SampleEvaluator

        if num_samples < 2:
            raise ValueError(f"--num-samples must be at least 2, got {num_samples}")
        samples = self.generate_split(num_samples)
        if not self.dist.is_main:
            return {}
        name, reference, labels, samples = metric_inputs(self.config, samples)
        evaluator = SampleEvaluator(name, reference, labels, device=self.device)
        metrics = evaluator.evaluate(samples)
        if num_samples < MIN_FID_SAMPLES:
            metrics["caveat"] = (
                f"computed from {num_samples} samples, fewer than {MIN_FID_SAMPLES} (the Inception feature size): "
                "the covariance is rank-deficient and FID is biased upward; compare only runs evaluated with "
                "the same number of samples")
        return metrics

    def write_results(self) -> Dict:
        """Writes ``metrics.json`` and ``summary.md`` (FID too when ``eval_samples`` is set;
        every rank generates its part of the samples, rank 0 scores them and writes)."""
        config = self.config
        per_step = self.elapsed / max(self.step, 1)
        results = {
            "steps": self.step,
            "final_loss": mean_finite(self.losses[-100:]),
            "wall_clock_s": self.elapsed,
            "seconds_per_step": per_step,
            "samples_per_second": config.batch_size / per_step if per_step else None,
            "parameters": sum(p.numel() for p in self.denoiser.parameters()),
            "flops_per_sample": count_flops(self.task, self.dataset, self.device),
            "sparsity": self.report.global_sparsity if self.report else 0.0,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "state_bytes": self.state_bytes(),
        }
        results["peak_rss_bytes"] = peak_rss_bytes()
        if self.device.type == "cuda":
            results["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.algo is not None:
            results["itop_rate"] = self.algo.itop_rate()
            results["mask_updates"] = len(self.algo.history)
        if config.eval_samples:
            results["metrics"] = self.evaluate(config.eval_samples)
            if config.eval_every:
                results["curve"] = self.curve + [self.curve_point(results["metrics"])]
        results["timing"] = self.machine_load()
        if self.dist.is_main:
            (self.out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            self.write_summary(results)
        self.dist.barrier()
        return results

    def curve_point(self, metrics: Dict) -> Dict:
        """One point of the FID-vs-steps / -wall-clock curve: now, and the metrics just computed."""
        return {"step": self.step, "wall_clock_s": self.elapsed, "load_1min": os.getloadavg()[0], **metrics}

    def machine_load(self) -> Dict:
        """Whether the run's wall-clock is its own: the largest 1-minute load average seen while
        training against the CPU threads the run uses (``clean`` when within
        :data:`LOAD_MARGIN`; on a GPU the host's load still tells whether it was shared), and
        the CPU it ran on (runs of one study may land on different machines)."""
        self.max_load = max(self.max_load, os.getloadavg()[0])
        threads = torch.get_num_threads() * self.dist.world_size
        return {"cpu": cpu_model(), "cpu_threads": threads, "cpus": os.cpu_count(),
                "max_load_1min": round(self.max_load, 2),
                "clean": self.max_load <= threads + LOAD_MARGIN}

    def write_summary(self, results: Dict, path: Optional[Path] = None) -> Path:
        """``summary.md`` (or ``path``): settings, results, sample quality, sparsity, pictures."""
        path = Path(path) if path is not None else self.out / "summary.md"
        path.write_text(self._summary(results))
        return path

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
        dense = self.config.method == "dense"
        config_rows = "\n".join(
            f"| {k} | {'- (dense run)' if dense and k in SPARSE_ONLY else v} |"
            for k, v in dataclasses.asdict(self.config).items())
        result_rows = "\n".join(f"| {k} | {v} |" for k, v in results.items() if k not in ("metrics", "curve"))
        metric_rows = "\n".join(f"| {k} | {v} |" for k, v in results.get("metrics", {}).items())
        changes = "".join(f"\n- from step {c['step']}: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in c["changed"].items())
                          for c in self.changes)
        report = str(self.report) if self.report else "dense model (no sparsity)"
        latest = sorted((self.out / "samples").glob("step-*.png"))
        return (
            f"# Run {self.out.name}\n\n## Configuration\n\n| setting | value |\n| --- | --- |\n{config_rows}\n\n"
            + (f"Settings changed on a resume:\n{changes}\n\n" if changes else "")
            + f"## Results\n\n| quantity | value |\n| --- | --- |\n{result_rows}\n"
            + (f"\n## Sample quality\n\n| metric | value |\n| --- | --- |\n{metric_rows}\n" if metric_rows else "")
            + f"\n## Sparsity\n\n```\n{report}\n```\n"
            + (f"\n![samples](samples/{latest[-1].name})\n\n![loss](loss.png)\n" if latest else "")
        )


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident set size (Linux's ``VmHWM``; what ``/usr/bin/time -v``
    reports for a process started from a shell), or None where ``/proc`` does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def mean_finite(values: List[float]) -> float:
    """The mean of the finite values (NaN if there is none)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def loss_label(config: TrainConfig) -> str:
    """The loss curve's axis label: what the network is trained to predict."""
    return {"epsilon": "noise-prediction MSE", "v": "v-prediction MSE"}[config.prediction]
