"""Timing, environment records and result files shared by the benchmark runners."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from sparse_kernels.extension import cpu_model


def environment(device: torch.device) -> Dict[str, object]:
    """Device name and versions, recorded with every result."""
    record: Dict[str, object] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
        record["cuda"] = torch.version.cuda
        record["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        record["device_name"] = f"{record['cpu']} ({record['torch_threads']} threads)"
    record["sparse_kernels_backend"] = os.environ.get("SPARSE_KERNELS_BACKEND", "auto")
    if device.type == "cpu":
        import sparse_kernels as sk

        # What CPU fp32 block-32 ops run on here, and the compiled kernels' instruction set.
        record["cpu_backend"] = sk.select_backend(device, torch.float32, (32, 32))
        record["cpu_isa"] = sk.extension.cpu_isa()
    return record


def measure_ms(fn: Callable[[], object], device: torch.device, min_seconds: float = 1.0, max_reps: int = 100) -> float:
    """Median wall time of ``fn`` in milliseconds.

    CUDA: ``triton.testing.do_bench`` (events, L2 flushed between runs). CPU: a warm-up
    call, then repetitions until ``min_seconds`` or ``max_reps``, whichever comes first.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(int(min_seconds * 1000), 50), return_mode="median"))
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_seconds or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def run_command(command: List[str], env: Optional[Dict[str, str]] = None) -> None:
    """Runs ``command`` to the end in a fresh process; a failure raises one line: the exit code,
    the command and the last lines of its stderr."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"exit code {done.returncode} from {' '.join(command)}: {tail}")


def time_in_turns(steps: Dict[str, Callable[[], object]], rounds: int, calls: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per call of each of ``steps`` (name -> step), per round: each step ``warmup``
    times first, then ``rounds`` rounds in which every step runs ``calls`` times in turn, so
    that whatever else the machine does falls on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def time_step(step: Optional[Callable[[], object]], device: torch.device, min_seconds: float) -> Tuple[Optional[float], Optional[str]]:
    """``(median ms, None)``; ``(None, None)`` for no step; ``(None, error)`` where the
    step fails (torch's BSR lacks some dtype/device pairs, say)."""
    if step is None:
        return None, None
    try:
        return measure_ms(step, device, min_seconds), None
    except (RuntimeError, NotImplementedError) as error:
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def add_vs_dense(rows: List[Dict[str, object]], group: Sequence[str]) -> None:
    """Sets ``vs_dense`` = ms / the ``dense`` row's ms with the same values of ``group``."""
    dense = {tuple(r[k] for k in group): r["ms"] for r in rows if r["method"] == "dense"}
    for r in rows:
        base = dense.get(tuple(r[k] for k in group))
        r["vs_dense"] = r["ms"] / base if r["ms"] and base else None


def fill_defaults(
    args, quick: Dict[str, object], full: Dict[str, object], cpu: Optional[Dict[str, object]] = None
) -> None:
    """Sets every argument left at ``None`` from ``quick`` (with ``--quick``), ``cpu`` (on a
    CPU device, when given) or ``full``, and the dtype from the device (bf16 on CUDA, fp32
    elsewhere)."""
    on_cpu = not args.device.startswith("cuda")
    chosen = quick if args.quick else cpu if (cpu is not None and on_cpu) else full
    for name, value in chosen.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"


def forward_backward(
    forward: Callable[[], torch.Tensor], inputs: Tuple[torch.Tensor, ...], grad: torch.Tensor
) -> Callable[[], object]:
    """A step that runs ``forward`` and the gradients of ``inputs`` for output gradient ``grad``
    (``autograd.grad``: nothing accumulates in ``.grad`` between repetitions)."""
    return lambda: torch.autograd.grad(forward(), inputs, grad)


def synchronized(step: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``step`` followed by a device synchronisation on CUDA (for wall-clock timers)."""
    if device.type != "cuda":
        return step

    def run():
        step()
        torch.cuda.synchronize(device)

    return run


def add_output_arguments(parser, threads: bool = False) -> None:
    """``--out`` / ``--out-dir`` (where the JSON goes), and ``--threads`` for the CPU suites."""
    if threads:
        parser.add_argument("--threads", type=int, default=2, help="torch's intra-op threads")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--out-dir", help="folder for a JSON file named after the date and device")


def parameters_of(args) -> Dict[str, object]:
    """The run's arguments for its JSON record, without where the record goes."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "out_dir")}


def result_path(out: Optional[str], out_dir: Optional[str], suite: str, env: Dict[str, object]) -> Optional[Path]:
    """``out`` as given, or ``out_dir/<suite>-<date>-<device name>.json``."""
    if out:
        return Path(out)
    if not out_dir:
        return None
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", str(env["device_name"])).strip("-")
    return Path(out_dir) / f"{suite}-{str(env['date'])[:10]}-{name}.json"


def write_json(path: Optional[Path], payload: Dict[str, object]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    """Plain fixed-width table of ``rows`` (dicts) in ``columns`` order."""
    cells = [[_format(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
