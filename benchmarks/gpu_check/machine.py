"""The stages of ``make gpu-check`` about the machine and the whole project: ``environment`` (GPU,
driver, versions, missing modules), ``after_build`` (``python -m sparse_kernels info``, the CUDA
mask update against the CPU one, ``benchmarks.masks``), ``ddp_smoke`` (a one-process torchrun of
``sparse_diffusion train``) and ``gpu_tests`` (``pytest -m gpu`` with the time left).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .records import ROOT, dry_run

OPTIONAL_MODULES = ("hypothesis", "yaml", "PIL", "diffusers", "ninja", "scipy")


def stage_environment(record) -> None:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "dry_run": dry_run(),
            "missing_modules": [m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is None],
            "ninja": shutil.which("ninja"), "nvcc": shutil.which("nvcc"), "cpu_count": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                    sms=properties.multi_processor_count, memory_gib=round(properties.total_memory / 2**30, 1))
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True)
        info["nvidia_smi"] = query.stdout.strip()
    record(kind="environment", **info)


def stage_after_build(record, build_log: Optional[Path]) -> None:
    import torch

    info = subprocess.run([sys.executable, "-m", "sparse_kernels", "info"], capture_output=True, text=True, cwd=ROOT)
    record(kind="info", returncode=info.returncode, output=(info.stdout + info.stderr)[-3000:])
    if info.returncode:
        raise RuntimeError(f"python -m sparse_kernels info failed: {(info.stdout + info.stderr)[-300:]}")
    import sparse_kernels as sk

    if torch.cuda.is_available() and not dry_run():
        identical = []
        for seed in range(5):
            generator = torch.Generator().manual_seed(seed)
            results = {}
            for device in ("cpu", "cuda"):
                torch.manual_seed(seed)
                layer = sk.BlockSparseLinear(256, 256, block_size=32, density=0.5).to(device)
                drop = layer.values.detach().flatten(1).norm(dim=1)
                grow = torch.rand(layer.layout.grid, generator=generator).to(device)
                sk.prune_and_regrow([sk.LayerUpdate(layer.layout, drop, grow, 5, [layer.values.data])])
                results[device] = (layer.row_idx.cpu(), layer.col_idx.cpu(), layer.values.detach().cpu())
                generator = torch.Generator().manual_seed(seed)
            identical.append(all(torch.equal(a, b) for a, b in zip(results["cpu"], results["cuda"])))
        record(kind="masks", what="CUDA mask update == CPU, bit for bit", cases=len(identical), ok=all(identical))
        if not all(identical):
            raise RuntimeError("the CUDA mask update differs from the CPU one")
    device = "cuda" if torch.cuda.is_available() and not dry_run() else "cpu"
    bench = subprocess.run([sys.executable, "-m", "benchmarks.masks", "--device", device, "--quick", "--out-dir",
                            str(Path(os.environ["GPU_CHECK_OUT_DIR"]))], capture_output=True, text=True, cwd=ROOT)
    record(kind="masks_benchmark", returncode=bench.returncode, output=(bench.stdout + bench.stderr)[-2000:])


def stage_ddp_smoke(record) -> None:
    import tempfile

    if importlib.util.find_spec("diffusers") is None:
        record(kind="ddp", status="skipped", reason="diffusers is not installed")
        return
    from sparse_diffusion.data import get_dataset

    try:
        get_dataset("fashion-mnist", "test")
    except Exception as error:  # noqa: BLE001 - any reason the data is not there
        record(kind="ddp", status="skipped", reason=f"no Fashion-MNIST: {str(error)[:200]}")
        return
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
                   "sparse_diffusion", "train", "--preset", "tiny", "--image-size", "16", "--method", "rigl",
                   "--sparsity", "0.5", "--block-size", "16", "--update-interval", "5", "--steps", "10",
                   "--batch-size", "16", "--limit", "256", "--sample-steps", "2", "--out", f"{folder}/run"]
        if dry_run():
            command += ["--device", "cpu"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        record(kind="ddp", returncode=result.returncode, output=(result.stdout + result.stderr)[-3000:])
    if result.returncode:
        raise RuntimeError("the one-process DDP run failed")


def stage_gpu_tests(record, seconds: float) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--continue-on-collection-errors", "-p",
               "no:randomly", "-x" if dry_run() else "-q", "tests/kernels/test_masks.py" if dry_run() else "tests"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=max(1.0, seconds),
                            env={**os.environ, "SPARSE_KERNELS_AUTOTUNE": "0"})
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    record(kind="pytest", returncode=result.returncode, summary=summary, output=result.stdout[-4000:])
    if result.returncode not in (0, 5):  # 5: nothing collected (no GPU test selected)
        raise RuntimeError(f"pytest -m gpu: {summary}")
