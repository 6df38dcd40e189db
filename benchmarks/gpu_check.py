"""``make gpu-check``: one time-boxed pass over the GPU path, for a GPU lent for a few minutes.

    python -m benchmarks.gpu_check --out-dir benchmarks/results     # on the GPU machine
    GPU_CHECK_DRY_RUN=1 python -m benchmarks.gpu_check --out-dir /tmp/x   # here: CPU, tiny sizes

The whole run keeps to ``GPU_CHECK_SECONDS`` (default 450, build included). The stages run in
priority order, each in its own process with a time box, and every stage appends its records
to ``gpu-check-<date>-<gpu>.jsonl`` (and its output to the ``.log`` beside it) as it goes, so a
run cut off at any point leaves what it did; a stage that fails or times out never stops the
next:

1. ``environment``: GPU, driver, versions, which optional modules are missing;
2. ``build``: ``pip install --no-build-isolation --no-deps -e .`` (the compiled extension)
   starts in the background; the Triton stages meanwhile load the kernels from the source
   tree without it;
3. ``triton_smoke``: one kernel config per case (``SPARSE_KERNELS_AUTOTUNE=0``): linear and
   conv forward / grad-input / grad-weight in bf16, fp16 and fp32 against an fp64 truth;
   rectangular blocks, empty / one-block / full masks, M=1, a non-contiguous input, stride 2,
   dilation 2, 1x1, NCHW and channels-last;
4. ``large``: one case over 2^31 elements per kernel family (forward and grad-weight),
   spot-checked against torch on slices;
5. ``headline``: autotuned times at block 64, densities 1 / 0.5 / 0.25 / 0.1: linear
   4096x4096 on 8192 rows (each kernel, forward+backward replayed as a CUDA graph, torch's
   BSR forward) against cuBLAS, target fwd+bwd <= 1.2 d + 0.03; the three UNet 3x3 convs of
   the conv issue (128 at 64x64, 256 at 32x32, 512 at 16x16, batch 32) against cuDNN, target
   <= 1.25 d + 0.05 (1.3 at d = 1); ``d`` is the *actual* density (live blocks / all blocks:
   a 128->128 conv at block 64 has 4 blocks, so "0.1" is one block of four);
6. ``after_build``: waits for the build; ``python -m sparse_kernels info``, the CUDA mask
   update against the CPU one (bit for bit), ``benchmarks.masks``;
7. ``ddp_smoke``: ``torchrun --nproc-per-node 1 -m sparse_diffusion train`` (NCCL, the UNet
   under DDP) for a few steps, where diffusers and Fashion-MNIST are installed;
8. ``gpu_tests``: ``pytest -m gpu`` with the time left (collection errors are not fatal).

Stages 1-6 need only torch, triton and numpy (none of hypothesis, yaml, PIL, diffusers). The
run ends with one summary table. ``GPU_CHECK_FAIL_STAGE=name`` makes that stage fail at its
start (the test suite checks that the later stages still run).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
# (name, the most seconds it may take); the GPU tests take whatever is left.
STAGES = [("environment", 30), ("triton_smoke", 150), ("large", 60), ("headline", 150), ("after_build", 90),
          ("ddp_smoke", 60), ("gpu_tests", None)]
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
LINEAR_TARGET = 0.03  # fwd+bwd time / dense <= 1.2 * density + 0.03 (the kernels' issue)
OPTIONAL_MODULES = ("hypothesis", "yaml", "PIL", "diffusers", "ninja", "scipy")


# --------------------------------------------------------------------------- records
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


# --------------------------------------------------------------------------- the kernels, without the extension
def triton_modules():
    """``sparse_kernels.triton.linear`` and ``.conv2d`` loaded from the source tree without
    running ``sparse_kernels/__init__`` (which needs the compiled extension, still building)."""
    if "sparse_kernels" not in sys.modules:
        package = types.ModuleType("sparse_kernels")
        package.__path__ = [str(ROOT / "sparse_kernels")]
        sys.modules["sparse_kernels"] = package
    import sparse_kernels.triton.conv2d as conv2d
    import sparse_kernels.triton.linear as linear

    return linear, conv2d


def index(mask):
    """The layout index of a block mask ``[R, C]`` in plain torch: ``(row_idx, col_idx,
    row_ptr, row_slots, col_ptr, col_slots)``, int32, slots in row-major block order."""
    import torch

    rows, cols = mask.nonzero(as_tuple=True)
    R, C = mask.shape
    row_slots = torch.argsort(rows * C + cols, stable=True)
    col_slots = torch.argsort(cols * R + rows, stable=True)
    ptr = lambda counts: torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # noqa: E731
    as32 = lambda t: t.to(torch.int32).to(mask.device)  # noqa: E731
    return (as32(rows), as32(cols), as32(ptr(torch.bincount(rows, minlength=R))), as32(row_slots),
            as32(ptr(torch.bincount(cols, minlength=C))), as32(col_slots))


def dense_weight(values, rows, cols, grid, taps=()):
    """The dense weight (fp64) of ``values [nnz, bo, bi, *taps]`` at blocks ``(rows, cols)``."""
    import torch

    nnz, bo, bi = values.shape[:3]
    blocks = torch.zeros(grid[0], grid[1], bo, bi, *taps, dtype=torch.float64, device=values.device)
    blocks[rows.long(), cols.long()] = values.double()
    return blocks.transpose(1, 2).reshape(grid[0] * bo, grid[1] * bi, *taps)


def relative_error(result, truth) -> float:
    scale = truth.abs().max().item() or 1.0
    return (result.double() - truth).abs().max().item() / scale


def make_mask(kind, grid, device, generator):
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


# --------------------------------------------------------------------------- stages
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


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not dry_run() else "cpu")


def stage_triton_smoke(record) -> None:
    import torch
    import torch.nn.functional as F

    linear, conv2d = triton_modules()
    device = _device()
    generator = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16] if dry_run() else [torch.bfloat16, torch.float16, torch.float32]
    linear_cases = [((32, 32), (3, 2), "random", 77, False), ((16, 64), (4, 2), "random", 33, False),
                    ((32, 32), (3, 2), "empty", 20, False), ((32, 32), (3, 2), "one", 1, False),
                    ((32, 32), (2, 2), "full", 50, True)]
    for dtype in dtypes:
        for block, grid, kind, rows_m, transposed_input in linear_cases:
            mask = make_mask(kind, grid, device, generator)
            row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index(mask)
            nnz = int(mask.sum())
            values = torch.randn(nnz, *block, generator=generator).to(device, dtype)
            out_f, in_f = grid[0] * block[0], grid[1] * block[1]
            x = torch.randn(in_f, rows_m, generator=generator).to(device, dtype).T if transposed_input else \
                torch.randn(rows_m, in_f, generator=generator).to(device, dtype)
            dy = torch.randn(rows_m, out_f, generator=generator).to(device, dtype)
            w = dense_weight(values, row_idx, col_idx, grid)
            results = {
                "fwd": (linear.bsr_linear_fwd(x, values, row_ptr, row_slots, col_idx, None), x.double() @ w.T),
                "grad_input": (linear.bsr_linear_grad_input(dy, values, col_ptr, col_slots, row_idx), dy.double() @ w),
                "grad_weight": (linear.bsr_linear_grad_weight(dy, x, row_idx, col_idx, row_slots, block),
                                _blocks(dy.double().T @ x.double(), row_idx, col_idx, block)),
            }
            for op, (result, truth) in results.items():
                _check(record, "linear", op, dtype, result, truth,
                       case=f"block {block} grid {grid} {kind} M={rows_m}{' non-contiguous x' if transposed_input else ''}")
    conv_cases = [((3, 3), 1, 1, 1, False), ((3, 3), 2, 1, 1, True), ((3, 3), 1, 2, 2, True), ((1, 1), 1, 1, 0, False)]
    for dtype in dtypes:
        for kernel, stride, dilation, padding, channels_last in conv_cases:
            grid, block = (2, 2), (16, 16)
            mask = make_mask("random", grid, device, generator)
            row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index(mask)
            values = torch.randn(int(mask.sum()), *block, *kernel, generator=generator).to(device, dtype)
            x = torch.randn(2, grid[1] * block[1], 9, 9, generator=generator).to(device, dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            w = dense_weight(values, row_idx, col_idx, grid, kernel)
            conv = dict(stride=(stride, stride), padding=(padding, padding), dilation=(dilation, dilation))
            y64 = F.conv2d(x.double(), w, **conv)
            dy = torch.randn(y64.shape, generator=generator).to(device, dtype)
            dx64 = torch.nn.grad.conv2d_input(x.shape, w, dy.double(), **conv)
            dw64 = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), **conv)
            results = {
                "fwd": (conv2d.bsr_conv2d_fwd(x, values, row_ptr, row_slots, col_idx, None, **conv), y64),
                "grad_input": (conv2d.bsr_conv2d_grad_input(dy, values, col_ptr, col_slots, row_idx, x.shape[2:],
                                                            **conv), dx64),
                "grad_weight": (conv2d.bsr_conv2d_grad_weight(dy, x, row_idx, col_idx, row_slots, (*block, *kernel),
                                                              **conv), _blocks(dw64, row_idx, col_idx, block)),
            }
            for op, (result, truth) in results.items():
                _check(record, "conv2d", op, dtype, result, truth,
                       case=f"{kernel[0]}x{kernel[1]} stride {stride} dilation {dilation} "
                            f"{'channels-last' if channels_last else 'NCHW'}")


def _blocks(dense, rows, cols, block):
    """The blocks ``(rows, cols)`` of a dense ``[R*bo, C*bi, *taps]`` matrix: ``[nnz, bo, bi, *taps]``."""
    bo, bi = block
    taps = dense.shape[2:]
    grid = (dense.shape[0] // bo, dense.shape[1] // bi)
    tiles = dense.reshape(grid[0], bo, grid[1], bi, *taps).transpose(1, 2)
    return tiles[rows.long(), cols.long()]


# The cases of this process that were off: its stage fails at the end, after recording them all.
raise_later: List[str] = []


def _check(record, family, op, dtype, result, truth, case) -> None:
    import torch

    name = str(dtype).replace("torch.", "")
    error = relative_error(result, truth) if truth.numel() else 0.0
    ok = bool(torch.isfinite(result).all()) and error <= TOLERANCE[name]
    record(kind="case", family=family, op=op, dtype=name, case=case, relative_error=error, ok=ok)
    if not ok:
        raise_later.append(f"{family} {op} {name} {case}: relative error {error:.3g}")



def stage_large(record) -> None:
    """One case over 2^31 elements per family (forward and grad-weight), checked on slices."""
    import torch
    import torch.nn.functional as F

    linear, conv2d = triton_modules()
    device = _device()
    dtype = torch.float32 if dry_run() else torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(0)
    # Linear: x [M, 256] with M * 256 > 2^31 (about 4.3 GB in bf16); a dry run uses 2^12 rows.
    rows = 2**12 if dry_run() else 2**23 + 1024
    grid, block = (4, 4), (64, 64)
    mask = torch.ones(grid, dtype=torch.bool, device=device)
    row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index(mask)
    values = torch.randn(16, *block, device=device, generator=generator).to(dtype)
    x = torch.randn(rows, 256, device=device, generator=generator).to(dtype)
    y = linear.bsr_linear_fwd(x, values, row_ptr, row_slots, col_idx, None)
    w = dense_weight(values, row_idx, col_idx, grid).to(torch.float32)
    picks = torch.tensor([0, rows // 2, rows - 1], device=device)
    _check(record, "linear", "fwd >2^31" if not dry_run() else "fwd (dry run size)", dtype, y[picks],
           x[picks].double() @ w.double().T, case=f"x {tuple(x.shape)}: {x.numel()} elements")
    dw = linear.bsr_linear_grad_weight(y, x, row_idx, col_idx, row_slots, block)
    truth = torch.zeros(64, 64, dtype=torch.float64, device=device)
    for start in range(0, rows, 2**20):  # block 0 = rows 0:64 of dy against columns 0:64 of x
        truth += y[start:start + 2**20, :64].double().T @ x[start:start + 2**20, :64].double()
    _check(record, "linear", "grad_weight >2^31" if not dry_run() else "grad_weight (dry run size)", dtype,
           dw[0], truth, case=f"M={rows}")
    del x, y, dw
    # Conv: x [N, 128, 256, 256] with N * 128 * 256^2 > 2^31; checked on the last image.
    images = 1 if dry_run() else 257
    side = 8 if dry_run() else 256
    grid, block = (2, 2), (64, 64)
    mask = torch.ones(grid, dtype=torch.bool, device=device)
    row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index(mask)
    values = torch.randn(4, *block, 3, 3, device=device, generator=generator).to(dtype)
    x = torch.randn(images, 128, side, side, device=device, generator=generator).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    y = conv2d.bsr_conv2d_fwd(x, values, row_ptr, row_slots, col_idx, None, **conv)
    w = dense_weight(values, row_idx, col_idx, grid, (3, 3))
    _check(record, "conv2d", "fwd >2^31" if not dry_run() else "fwd (dry run size)", dtype, y[-1:],
           F.conv2d(x[-1:].double(), w, **conv), case=f"x {tuple(x.shape)}: {x.numel()} elements")
    dw = conv2d.bsr_conv2d_grad_weight(y, x, row_idx, col_idx, row_slots, (*block, 3, 3), **conv)
    # The truth in fp32 (cuDNN's fp64 convolutions are slow), over chunks of 16 images.
    truth = sum(torch.nn.grad.conv2d_weight(x[i:i + 16].float(), w.shape, y[i:i + 16].float(), **conv).double()
                for i in range(0, images, 16))
    _check(record, "conv2d", "grad_weight >2^31" if not dry_run() else "grad_weight (dry run size)", dtype, dw,
           _blocks(truth, row_idx, col_idx, block), case=f"{images} images of {side}x{side}")


def _time_ms(fn, device) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench on a GPU; one call in a dry run)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def stage_headline(record) -> None:
    import torch
    import torch.nn.functional as F

    linear, conv2d = triton_modules()
    device = _device()
    dtype = torch.float32 if dry_run() else torch.bfloat16
    size, rows_m = (128, 64) if dry_run() else (4096, 8192)
    block = (64, 64) if not dry_run() else (32, 32)
    grid = (size // block[0], size // block[1])
    x = torch.randn(rows_m, size, device=device, dtype=dtype)
    dy = torch.randn(rows_m, size, device=device, dtype=dtype)
    dense = torch.randn(size, size, device=device, dtype=dtype)
    dense_ms = _time_ms(lambda: (x @ dense.T, dy @ dense, dy.T @ x), device)
    record(kind="timing", family="linear", what="dense fwd+bwd (cuBLAS)", ms=dense_ms, shape=[rows_m, size, size])
    for density in (1.0, 0.5, 0.25, 0.1):
        mask = torch.rand(grid) < density
        mask.view(-1)[0] = True
        mask = mask.to(device)
        row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index(mask)
        actual = mask.float().mean().item()
        values = torch.randn(int(mask.sum()), *block, device=device, dtype=dtype)
        kernels = {
            "fwd": lambda: linear.bsr_linear_fwd(x, values, row_ptr, row_slots, col_idx, None),
            "grad_input": lambda: linear.bsr_linear_grad_input(dy, values, col_ptr, col_slots, row_idx),
            "grad_weight": lambda: linear.bsr_linear_grad_weight(dy, x, row_idx, col_idx, row_slots, block),
        }
        times = {name: _time_ms(fn, device) for name, fn in kernels.items()}
        total = sum(times.values())
        graph_ms = None
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            for fn in kernels.values():  # compiled and tuned before capture
                fn()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                for fn in kernels.values():
                    fn()
            graph_ms = _time_ms(graph.replay, device)
        bsr_ms = None
        try:
            bsr = dense.masked_fill(~mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1), 0) \
                .to_sparse_bsr(block)
            bsr_ms = _time_ms(lambda: bsr @ x.T, device)
        except (RuntimeError, NotImplementedError) as error:
            record(kind="note", what=f"torch BSR forward unavailable: {str(error)[:120]}")
        ratio = total / dense_ms
        target = 1.2 * actual + LINEAR_TARGET
        record(kind="timing", family="linear", density=density, actual_density=actual, ms=times, fwd_bwd_ms=total,
               graph_ms=graph_ms, torch_bsr_fwd_ms=bsr_ms, ratio_to_dense=ratio, target=target, meets=ratio <= target)
    # The conv issue's target shapes (Cin = Cout, side): fwd+bwd <= 1.25 d + 0.05 of cuDNN (1.3 at d = 1).
    shapes = [(128, 64), (256, 32), (512, 16)] if not dry_run() else [(32, 6)]
    batch, cblock = (32, (64, 64)) if not dry_run() else (1, (16, 16))
    for channels, side in shapes:
        xc = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
        xc = xc.contiguous(memory_format=torch.channels_last)
        wd = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
        wd = wd.contiguous(memory_format=torch.channels_last)
        dyc = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
        dyc = dyc.contiguous(memory_format=torch.channels_last)
        dense_ms = _time_ms(lambda: torch.ops.aten.convolution_backward(
            dyc, xc, wd, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, (True, True, False)), device)
        dense_ms += _time_ms(lambda: F.conv2d(xc, wd, padding=1), device)
        cgrid = (channels // cblock[0], channels // cblock[1])
        conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
        for density in (1.0, 0.5, 0.25, 0.1):
            mask = torch.rand(cgrid) < density
            mask.view(-1)[0] = True
            mask = mask.to(device)
            row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index(mask)
            values = torch.randn(int(mask.sum()), *cblock, 3, 3, device=device, dtype=dtype)
            kernels = {
                "fwd": lambda: conv2d.bsr_conv2d_fwd(xc, values, row_ptr, row_slots, col_idx, None, **conv),
                "grad_input": lambda: conv2d.bsr_conv2d_grad_input(dyc, values, col_ptr, col_slots, row_idx,
                                                                   (side, side), **conv),
                "grad_weight": lambda: conv2d.bsr_conv2d_grad_weight(dyc, xc, row_idx, col_idx, row_slots,
                                                                     (*cblock, 3, 3), **conv),
            }
            times = {name: _time_ms(fn, device) for name, fn in kernels.items()}
            actual = mask.float().mean().item()
            ratio = sum(times.values()) / dense_ms
            target = 1.3 if actual == 1.0 else 1.25 * actual + 0.05
            record(kind="timing", family="conv2d", shape=[batch, channels, side, side], block=list(cblock),
                   density=density, actual_density=actual, ms=times, dense_fwd_bwd_ms=dense_ms,
                   ratio_to_dense=ratio, target=target, meets=ratio <= target)


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


def run_stage(name: str, jsonl: Path, seconds: float, build_log: Optional[Path]) -> int:
    """One stage, in this process (the runner starts one process per stage)."""
    record = Recorder(jsonl, name)
    if os.environ.get("GPU_CHECK_FAIL_STAGE") == name:
        raise RuntimeError(f"stage {name} failed on purpose (GPU_CHECK_FAIL_STAGE)")
    if name == "after_build":
        stage_after_build(record, build_log)
    elif name == "gpu_tests":
        stage_gpu_tests(record, seconds)
    else:
        globals()[f"stage_{name}"](record)
    if raise_later:
        raise RuntimeError(f"{len(raise_later)} case(s) off: " + "; ".join(raise_later[:5]))
    return 0


# --------------------------------------------------------------------------- the runner
def gpu_name() -> str:
    if dry_run():
        return "cpu-dry-run"
    smi = shutil.which("nvidia-smi")
    if smi:
        name = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if name.returncode == 0 and name.stdout.strip():
            return re.sub(r"[^A-Za-z0-9_.]+", "-", name.stdout.strip().splitlines()[0]).strip("-")
    return "no-gpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("GPU_CHECK_SECONDS", 450)))
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--jsonl", help=argparse.SUPPRESS)
    parser.add_argument("--stage-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return run_stage(args.stage, Path(args.jsonl), args.stage_seconds, None)

    started = time.monotonic()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"gpu-check-{datetime.date.today().isoformat()}-{gpu_name()}"
    jsonl, log = stem.with_suffix(".jsonl"), stem.with_suffix(".log")
    env = {**os.environ, "GPU_CHECK_OUT_DIR": str(out_dir), "SPARSE_KERNELS_AUTOTUNE": "0", "PYTHONPATH": str(ROOT)}
    if dry_run():
        env["TRITON_INTERPRET"] = "1"
    build = start_build(log, env)
    rows = []
    for name, cap in STAGES:
        left = args.seconds - (time.monotonic() - started)
        limit = left if cap is None else min(cap, left)
        if name == "headline":
            env_stage = {**env, "SPARSE_KERNELS_AUTOTUNE": "1"}  # the headline ratios are autotuned
        else:
            env_stage = env
        if name == "after_build" and build is not None:
            waited = wait_for_build(build, limit, log)
            limit -= waited
        if limit < 5:
            rows.append((name, "skipped (no time left)", 0.0))
            Recorder(jsonl, name)(kind="stage", status="skipped", reason="no time left")
            continue
        status, seconds = run_stage_process(name, jsonl, log, limit, env_stage)
        rows.append((name, status, seconds))
        Recorder(jsonl, name)(kind="stage", status=status, seconds=round(seconds, 1))
    if build is not None and build.poll() is None:
        build.kill()
    print_summary(rows, jsonl, log, time.monotonic() - started)
    return 0


def start_build(log: Path, env: Dict[str, str]):
    """The extension build, in the background (a dry run only imports the installed package)."""
    if dry_run():
        command = [sys.executable, "-c", "import sparse_kernels"]
    else:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]
        note = "ninja found: parallel build" if shutil.which("ninja") else "ninja not found: files build one by one"
        with open(log, "a") as handle:
            handle.write(f"== build: {' '.join(command)} ({note})\n")
    handle = open(log, "a")
    return subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                            env={**env, "MAX_JOBS": str(os.cpu_count() or 4)})


def wait_for_build(build, limit: float, log: Path) -> float:
    start = time.monotonic()
    try:
        build.wait(timeout=max(1.0, limit - 5))
    except subprocess.TimeoutExpired:
        pass
    with open(log, "a") as handle:
        handle.write(f"== build: {'exit ' + str(build.returncode) if build.returncode is not None else 'still running'}\n")
    return time.monotonic() - start


def run_stage_process(name: str, jsonl: Path, log: Path, limit: float, env: Dict[str, str]):
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", name, "--jsonl", str(jsonl),
               "--stage-seconds", str(limit)]
    start = time.monotonic()
    with open(log, "a") as handle:
        handle.write(f"\n== stage {name} (at most {limit:.0f} s)\n")
        handle.flush()
        try:
            result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                    timeout=limit)
            status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    return status, time.monotonic() - start


def print_summary(rows, jsonl: Path, log: Path, seconds: float) -> None:
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    cases = [r for r in records if r.get("kind") == "case"]
    bad = [r for r in cases if not r["ok"]]
    print(f"\ngpu-check: {seconds:.0f} s; records in {jsonl}, output in {log}")
    print(f"{'stage':<14} {'status':<28} {'seconds':>8}")
    for name, status, took in rows:
        print(f"{name:<14} {status:<28} {took:>8.1f}")
    print(f"correctness cases: {len(cases) - len(bad)} of {len(cases)} within tolerance")
    if dry_run():
        print("(a dry run: Triton's interpreter on the CPU, so the times below mean nothing)")
    for r in bad[:10]:
        print(f"  OFF {r['family']} {r['op']} {r['dtype']} {r['case']}: {r['relative_error']:.3g}")
    for r in records:
        if r.get("kind") == "timing" and "ratio_to_dense" in r:
            print(f"  {r['family']} density {r['density']} (actual {r['actual_density']:.3f}): "
                  f"{r['ratio_to_dense']:.2f}x of dense, target <= {r['target']:.2f}: {'met' if r['meets'] else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
