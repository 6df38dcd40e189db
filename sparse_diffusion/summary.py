"""What a run reports: the numbers of ``metrics.json`` and the page ``summary.md``.

Functions over a :class:`~sparse_diffusion.state.TrainState` (and its
:class:`~sparse_diffusion.run.Run` where a file is written): the training loop calls them when
it ends, ``sparse-diffusion evaluate`` when it adds sample quality to a finished run.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

from sparse_kernels.extension import cpu_model

from .config import SPARSE_ONLY, TrainConfig
from .distributed import SINGLE, Distributed
from .run import Run
from .state import TrainState
from .tasks import count_flops

# A run's timing is "clean" when the machine's 1-minute load average stayed within this much
# of the threads the run itself uses: nothing else was competing for the CPUs.
LOAD_MARGIN = 0.75


def training_results(state: TrainState, dist: Distributed = SINGLE) -> Dict:
    """The numbers of ``metrics.json`` that training alone gives: steps, final loss, time, size,
    FLOPs, sparsity, memory, and for dynamic sparsity the mask updates."""
    config = state.config
    per_step = state.elapsed / max(state.step, 1)
    results = {
        "steps": state.step,
        "final_loss": mean_finite(state.losses[-100:]),
        "wall_clock_s": state.elapsed,
        "seconds_per_step": per_step,
        "samples_per_second": config.batch_size / per_step if per_step else None,
        "parameters": sum(p.numel() for p in state.denoiser.parameters()),
        "flops_per_sample": count_flops(state.task, state.dataset, state.device),
        "sparsity": state.report.global_sparsity if state.report else 0.0,
        "device": str(state.device),
        "world_size": dist.world_size,
        "state_bytes": state_bytes(state),
    }
    results["peak_rss_bytes"] = peak_rss_bytes()
    if state.device.type == "cuda":
        results["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(state.device)
    if state.algo is not None:
        results["itop_rate"] = state.algo.itop_rate()
        results["mask_updates"] = len(state.algo.history)
    return results


# What a curve point holds besides the metrics of its evaluation.
POINT_KEYS = ("step", "wall_clock_s", "load_1min")


def curve_point(state: TrainState, metrics: Dict) -> Dict:
    """One point of the FID-vs-steps / -wall-clock curve: now, and the metrics just computed."""
    return {"step": state.step, "wall_clock_s": state.elapsed, "load_1min": os.getloadavg()[0], **metrics}


def point_metrics(point: Dict) -> Dict:
    """The metrics of a curve point (what :func:`curve_point` was given)."""
    return {key: value for key, value in point.items() if key not in POINT_KEYS}


def machine_load(state: TrainState, dist: Distributed = SINGLE) -> Dict:
    """Whether the run's wall-clock is its own: the largest 1-minute load average seen while
    training (``state.max_load``, updated with now's) against the CPU threads the run uses
    (``clean`` when within :data:`LOAD_MARGIN`; on a GPU the host's load still tells whether it
    was shared), and the CPU it ran on (runs of one study may land on different machines)."""
    state.max_load = max(state.max_load, os.getloadavg()[0])
    threads = torch.get_num_threads() * dist.world_size
    return {"cpu": cpu_model(), "cpu_threads": threads, "cpus": os.cpu_count(),
            "max_load_1min": round(state.max_load, 2),
            "clean": state.max_load <= threads + LOAD_MARGIN}


def write_results(run: Run, state: TrainState, results: Dict) -> None:
    """Writes ``results`` as the run's ``metrics.json``, and its ``summary.md``."""
    run.write_metrics(results)
    write_summary(run, state, results)


def write_summary(run: Run, state: TrainState, results: Dict, path: Optional[Path] = None) -> Path:
    """``summary.md`` (or ``path``): settings, results, sample quality, sparsity, pictures."""
    return run.write_summary(summary_text(run, state, results), path)


def summary_text(run: Run, state: TrainState, results: Dict) -> str:
    config = state.config
    dense = config.method == "dense"
    config_rows = "\n".join(
        f"| {k} | {'- (dense run)' if dense and k in SPARSE_ONLY else v} |"
        for k, v in dataclasses.asdict(config).items())
    result_rows = "\n".join(f"| {k} | {v} |" for k, v in results.items() if k not in ("metrics", "curve"))
    metric_rows = "\n".join(f"| {k} | {v} |" for k, v in results.get("metrics", {}).items())
    changes = "".join(f"\n- from step {c['step']}: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in c["changed"].items())
                      for c in state.changes)
    report = str(state.report) if state.report else "dense model (no sparsity)"
    latest = run.sample_grids()
    return (
        f"# Run {run.folder.name}\n\n## Configuration\n\n| setting | value |\n| --- | --- |\n{config_rows}\n\n"
        + (f"Settings changed on a resume:\n{changes}\n\n" if changes else "")
        + f"## Results\n\n| quantity | value |\n| --- | --- |\n{result_rows}\n"
        + (f"\n## Sample quality\n\n| metric | value |\n| --- | --- |\n{metric_rows}\n" if metric_rows else "")
        + f"\n## Sparsity\n\n```\n{report}\n```\n"
        + (f"\n![samples](samples/{latest[-1].name})\n\n![loss](loss.png)\n" if latest else "")
    )


def state_bytes(state: TrainState) -> int:
    """Bytes of the training state: trainable parameters, their gradients, optimizer state."""
    params = sum(p.numel() * p.element_size() for p in state.trainable_parameters())
    optimizer = sum(
        t.numel() * t.element_size() for values in state.optimizer.state.values() for t in values.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    return 2 * params + optimizer


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
