"""The ``headline`` stage of ``make gpu-check``: autotuned times of the Triton kernels against
cuBLAS / cuDNN at the issues' shapes, with their targets.

Linear 4096x4096 on 8192 rows at block 64 (each kernel, forward+backward replayed as a CUDA
graph, torch's BSR forward), target fwd+bwd <= 1.2 d + 0.03 of dense; the three UNet 3x3 convs
(128 at 64x64, 256 at 32x32, 512 at 16x16, batch 32), target <= 1.25 d + 0.05 (1.3 at d = 1);
``d`` is the *actual* density (live blocks / all blocks).
"""
from __future__ import annotations

from . import records
from .records import time_ms

LINEAR_TARGET = 0.03  # fwd+bwd time / dense <= 1.2 * density + 0.03 (the kernels' issue)


def random_layout(grid, density, block, device):
    """``(mask, layout)``: about ``density`` of the blocks of ``grid``, at random, never none."""
    import torch

    import sparse_kernels as sk

    mask = torch.rand(grid) < density
    mask.view(-1)[0] = True
    mask = mask.to(device)
    return mask, sk.BlockSparseLayout.from_block_mask(mask, block)


def stage_headline(record) -> None:
    import torch
    import torch.nn.functional as F

    import sparse_kernels as sk
    import sparse_kernels.conv2d.triton_kernels as conv2d
    import sparse_kernels.linear.triton_kernels as linear

    device = records.device()
    dtype = torch.float32 if records.dry_run() else torch.bfloat16
    size, rows_m = (128, 64) if records.dry_run() else (4096, 8192)
    block = (64, 64) if not records.dry_run() else (32, 32)
    grid = (size // block[0], size // block[1])
    x = torch.randn(rows_m, size, device=device, dtype=dtype)
    dy = torch.randn(rows_m, size, device=device, dtype=dtype)
    dense = torch.randn(size, size, device=device, dtype=dtype)
    dense_ms = time_ms(lambda: (x @ dense.T, dy @ dense, dy.T @ x), device)
    record(kind="timing", family="linear", what="dense fwd+bwd (cuBLAS)", ms=dense_ms, shape=[rows_m, size, size])
    for density in (1.0, 0.5, 0.25, 0.1):
        mask, layout = random_layout(grid, density, block, device)
        row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = layout.tensors()
        actual = mask.float().mean().item()
        values = torch.randn(int(mask.sum()), *block, device=device, dtype=dtype)
        kernels = {
            "fwd": lambda: linear.bsr_linear_fwd(x, values, row_ptr, row_slots, col_idx, None),
            "grad_input": lambda: linear.bsr_linear_grad_input(dy, values, col_ptr, col_slots, row_idx),
            "grad_weight": lambda: linear.bsr_linear_grad_weight(dy, x, row_idx, col_idx, row_slots, block),
        }
        times = {name: time_ms(fn, device) for name, fn in kernels.items()}
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
            graph_ms = time_ms(graph.replay, device)
        bsr_ms = None
        try:
            bsr = dense.masked_fill(~mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1), 0) \
                .to_sparse_bsr(block)
            bsr_ms = time_ms(lambda: bsr @ x.T, device)
        except (RuntimeError, NotImplementedError) as error:
            record(kind="note", what=f"torch BSR forward unavailable: {str(error)[:120]}")
        ratio = total / dense_ms
        target = 1.2 * actual + LINEAR_TARGET
        record(kind="timing", family="linear", density=density, actual_density=actual, ms=times, fwd_bwd_ms=total,
               graph_ms=graph_ms, torch_bsr_fwd_ms=bsr_ms, ratio_to_dense=ratio, target=target, meets=ratio <= target)
    # The conv issue's target shapes (Cin = Cout, side): fwd+bwd <= 1.25 d + 0.05 of cuDNN (1.3 at d = 1).
    shapes = [(128, 64), (256, 32), (512, 16)] if not records.dry_run() else [(32, 6)]
    batch, cblock = (32, (64, 64)) if not records.dry_run() else (1, (16, 16))
    for channels, side in shapes:
        xc = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
        xc = xc.contiguous(memory_format=torch.channels_last)
        wd = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
        wd = wd.contiguous(memory_format=torch.channels_last)
        dyc = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
        dyc = dyc.contiguous(memory_format=torch.channels_last)
        dense_ms = time_ms(lambda: torch.ops.aten.convolution_backward(
            dyc, xc, wd, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, (True, True, False)), device)
        dense_ms += time_ms(lambda: F.conv2d(xc, wd, padding=1), device)
        cgrid = (channels // cblock[0], channels // cblock[1])
        conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
        for density in (1.0, 0.5, 0.25, 0.1):
            mask, layout = random_layout(cgrid, density, cblock, device)
            row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = layout.tensors()
            values = torch.randn(int(mask.sum()), *cblock, 3, 3, device=device, dtype=dtype)
            kernels = {
                "fwd": lambda: conv2d.bsr_conv2d_fwd(xc, values, row_ptr, row_slots, col_idx, None, **conv),
                "grad_input": lambda: conv2d.bsr_conv2d_grad_input(dyc, values, col_ptr, col_slots, row_idx,
                                                                   (side, side), **conv),
                "grad_weight": lambda: conv2d.bsr_conv2d_grad_weight(dyc, xc, row_idx, col_idx, row_slots,
                                                                     (*cblock, 3, 3), **conv),
            }
            times = {name: time_ms(fn, device) for name, fn in kernels.items()}
            actual = mask.float().mean().item()
            ratio = sum(times.values()) / dense_ms
            target = 1.3 if actual == 1.0 else 1.25 * actual + 0.05
            record(kind="timing", family="conv2d", shape=[batch, channels, side, side], block=list(cblock),
                   density=density, actual_density=actual, ms=times, dense_fwd_bwd_ms=dense_ms,
                   ratio_to_dense=ratio, target=target, meets=ratio <= target)
