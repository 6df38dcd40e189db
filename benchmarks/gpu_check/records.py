"""What every stage of ``make gpu-check`` shares: the record file, the dry-run switch, the device,
the fp64 truths of the correctness cases and their check, and timing."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}

# The cases of this process that were off: its stage fails at the end, after recording them all.
raise_later: List[str] = []


class Recorder:
    """Appends one JSON object per line to ``path`` (flushed at once: a killed run keeps it)."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = path, stage

    def __call__(self, **record) -> None:
        record = {"stage": self.stage, "time": round(time.time(), 3), **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
        print(json.dumps(record, default=str), flush=True)


def dry_run() -> bool:
    return os.environ.get("GPU_CHECK_DRY_RUN") == "1"


def device():
    """The GPU, or the CPU (Triton's interpreter) in a dry run or without one."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not dry_run() else "cpu")


# --------------------------------------------------------------------------- correctness cases
def make_mask(kind, grid, device, generator):
    """A block mask ``[R, C]``: ``empty``, ``full``, ``one`` live block, or about half at random."""
    import torch

    if kind == "empty":
        return torch.zeros(grid, dtype=torch.bool, device=device)
    if kind == "full":
        return torch.ones(grid, dtype=torch.bool, device=device)
    if kind == "one":
        mask = torch.zeros(grid, dtype=torch.bool, device=device)
        mask[grid[0] // 2, grid[1] - 1] = True
        return mask
    return (torch.rand(grid, generator=generator) < 0.5).to(device)


def dense_truth(values, layout):
    """The dense fp64 weight ``[R*bo, C*bi, *taps]`` of ``values [nnz, bo, bi, *taps]``."""
    import sparse_kernels as sk

    return sk.to_dense(values.double(), layout)


def relative_error(result, truth) -> float:
    scale = truth.abs().max().item() or 1.0
    return (result.double() - truth).abs().max().item() / scale


def check(record, family, op, dtype, result, truth, case) -> None:
    """Records one case (finite, and within the dtype's tolerance of the fp64 truth); a case off
    is kept in :data:`raise_later`, so that its stage fails once every case is recorded."""
    import torch

    name = str(dtype).replace("torch.", "")
    error = relative_error(result, truth) if truth.numel() else 0.0
    ok = bool(torch.isfinite(result).all()) and error <= TOLERANCE[name]
    record(kind="case", family=family, op=op, dtype=name, case=case, relative_error=error, ok=ok)
    if not ok:
        raise_later.append(f"{family} {op} {name} {case}: relative error {error:.3g}")


# --------------------------------------------------------------------------- timing
def time_ms(fn, device) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench on a GPU; one call in a dry run)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)
