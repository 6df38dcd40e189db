"""Samples of a run and their quality: functions over a :class:`~sparse_diffusion.state.TrainState`
(a run being trained, or one :func:`~sparse_diffusion.run.load_run` opened).

Samples always come from the EMA weights, as diffusers' training scripts sample. Under data
parallelism the samples of an evaluation are split among the ranks, and rank 0 scores them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from .distributed import SINGLE, Distributed
from .run import Run
from .state import TrainState
from .tasks import metric_inputs

# Below this many samples FID's covariance (2048 Inception features) is rank-deficient and
# FID is biased upward: results carry a caveat.
MIN_FID_SAMPLES = 2048


@torch.no_grad()
def generate(state: TrainState, num: int, seed: int = 1234, first: int = 0):
    """Samples from the EMA weights, with the run's sampler and step count
    (``config.sampler``, ``config.sample_steps``): images ``[num, C, H, W]`` in [-1, 1]
    (strokes are returned as ``(points, lengths)``). A class-conditional model samples the
    classes in turn, starting with that of sample number ``first``. The training weights are
    put back afterwards."""
    parameters = list(state.denoiser.parameters())
    state.ema.store(parameters)
    state.ema.copy_to(parameters)
    state.denoiser.eval()
    options = dict(sampler=state.config.sampler, steps=state.config.sample_steps)
    if getattr(state.task, "conditional", False):
        options["labels"] = torch.arange(first, first + num) % state.task.unet.config.num_class_embeds
    try:
        generator = torch.Generator().manual_seed(seed)
        return state.task.sample(num, generator, **options)
    finally:
        state.ema.restore(parameters)
        state.denoiser.train()


def generate_split(state: TrainState, num: int, seed: int = 1234, dist: Distributed = SINGLE):
    """:func:`generate` shared among the ranks: rank r makes its contiguous part of the ``num``
    samples (seeded by ``seed + r``); rank 0 returns them all, the others ``None``. In a single
    process it is ``generate(state, num, seed)``."""
    if not dist.active:
        return generate(state, num, seed)
    bounds = [num * r // dist.world_size for r in range(dist.world_size + 1)]
    first, stop = bounds[dist.rank], bounds[dist.rank + 1]
    part = generate(state, stop - first, seed + dist.rank, first) if stop > first else None
    if isinstance(part, tuple):
        part = tuple(t.cpu() for t in part)
    elif part is not None:
        part = part.cpu()
    parts = [p for p in dist.gather(part) if p is not None]
    if not dist.is_main:
        return None
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(pieces) for pieces in zip(*parts))
    return torch.cat(parts)


def save_samples(run: Run, state: TrainState, rows: int = 8) -> Path:
    """A grid of ``rows`` rows of samples in the run's ``samples/`` folder, named by the step;
    a class-conditional model gets one class per column."""
    from .metrics.raster import rasterize_strokes

    columns = getattr(state.dataset, "num_classes", None) if getattr(state.task, "conditional", False) else None
    columns = columns or 8
    samples = generate(state, rows * columns)  # conditional: labels 0, 1, ..., C-1, 0, 1, ...
    if isinstance(samples, tuple):
        samples = rasterize_strokes(samples[0].cpu(), samples[1].cpu(), size=64)
    return run.write_sample_grid(samples.cpu(), state.step, columns)


def evaluate(state: TrainState, num_samples: int, dist: Distributed = SINGLE) -> Dict:
    """FID / KID (Inception) and FD / KID in a locally trained network, on ``num_samples`` EMA
    samples against the dataset's test split. Below :data:`MIN_FID_SAMPLES` the result carries
    a ``caveat``. Under data parallelism every rank generates its part; rank 0 scores them and
    returns the metrics, the others ``{}``."""
    from .metrics import SampleEvaluator

    if num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2, got {num_samples}")
    samples = generate_split(state, num_samples, dist=dist)
    if not dist.is_main:
        return {}
    name, reference, labels, samples = metric_inputs(state.config, samples)
    evaluator = SampleEvaluator(name, reference, labels, device=state.device)
    metrics = evaluator.evaluate(samples)
    if num_samples < MIN_FID_SAMPLES:
        metrics["caveat"] = (
            f"computed from {num_samples} samples, fewer than {MIN_FID_SAMPLES} (the Inception feature size): "
            "the covariance is rank-deficient and FID is biased upward; compare only runs evaluated with "
            "the same number of samples")
    return metrics
