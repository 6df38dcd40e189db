"""The correctness stages of ``make gpu-check``: ``triton_smoke`` (every kernel, small odd cases,
three dtypes), ``vector_smoke`` (the kernels of vector blocks such as 16x1) and ``large`` (one case
over 2^31 elements per kernel family), each against an fp64 truth built from the layout with
:func:`sparse_kernels.to_dense` / :func:`~sparse_kernels.from_dense`.

The Triton launchers are called directly (``sparse_kernels.<op>.triton_kernels``), one kernel
config per case (``SPARSE_KERNELS_AUTOTUNE=0``): they need no compiled extension, so these
stages run while it builds (the layouts' index then comes from plain torch).
"""
from __future__ import annotations

from .records import check, dense_truth, device, dry_run, make_mask

LINEAR_CASES = [((32, 32), (3, 2), "random", 77, False), ((16, 64), (4, 2), "random", 33, False),
                ((32, 32), (3, 2), "empty", 20, False), ((32, 32), (3, 2), "one", 1, False),
                ((32, 32), (2, 2), "full", 50, True)]  # (block, grid, mask, rows, transposed input)
CONV_CASES = [((3, 3), 1, 1, 1, False), ((3, 3), 2, 1, 1, True), ((3, 3), 1, 2, 2, True),
              ((1, 1), 1, 1, 0, False)]  # (kernel, stride, dilation, padding, channels-last)


def stage_triton_smoke(record) -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16] if dry_run() else [torch.bfloat16, torch.float16, torch.float32]
    for dtype in dtypes:
        for case in LINEAR_CASES:
            _linear_case(record, dtype, generator, *case)
    for dtype in dtypes:
        for case in CONV_CASES:
            _conv_case(record, dtype, generator, *case)


def _linear_case(record, dtype, generator, block, grid, kind, rows_m, transposed_input) -> None:
    import torch

    import sparse_kernels as sk
    import sparse_kernels.linear.triton_kernels as linear

    mask = make_mask(kind, grid, device(), generator)
    layout = sk.BlockSparseLayout.from_block_mask(mask, block)
    values = torch.randn(layout.nnz, *block, generator=generator).to(device(), dtype)
    out_f, in_f = layout.shape
    x = torch.randn(in_f, rows_m, generator=generator).to(device(), dtype).T if transposed_input else \
        torch.randn(rows_m, in_f, generator=generator).to(device(), dtype)
    dy = torch.randn(rows_m, out_f, generator=generator).to(device(), dtype)
    w = dense_truth(values, layout)
    results = {
        "fwd": (linear.bsr_linear_fwd(x, values, layout.row_ptr, layout.row_slots, layout.col_idx, None),
                x.double() @ w.T),
        "grad_input": (linear.bsr_linear_grad_input(dy, values, layout.col_ptr, layout.col_slots, layout.row_idx),
                       dy.double() @ w),
        "grad_weight": (linear.bsr_linear_grad_weight(dy, x, layout.row_idx, layout.col_idx, layout.row_slots, block),
                        sk.from_dense(dy.double().T @ x.double(), layout)),
    }
    for op, (result, truth) in results.items():
        check(record, "linear", op, dtype, result, truth,
              case=f"block {block} grid {grid} {kind} M={rows_m}{' non-contiguous x' if transposed_input else ''}")


def _conv_case(record, dtype, generator, kernel, stride, dilation, padding, channels_last) -> None:
    import torch
    import torch.nn.functional as F

    import sparse_kernels as sk
    import sparse_kernels.conv2d.triton_kernels as conv2d

    grid, block = (2, 2), (16, 16)
    mask = make_mask("random", grid, device(), generator)
    layout = sk.BlockSparseLayout.from_block_mask(mask, block)
    values = torch.randn(layout.nnz, *block, *kernel, generator=generator).to(device(), dtype)
    x = torch.randn(2, grid[1] * block[1], 9, 9, generator=generator).to(device(), dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = dense_truth(values, layout)
    conv = dict(stride=(stride, stride), padding=(padding, padding), dilation=(dilation, dilation))
    y64 = F.conv2d(x.double(), w, **conv)
    dy = torch.randn(y64.shape, generator=generator).to(device(), dtype)
    dx64 = torch.nn.grad.conv2d_input(x.shape, w, dy.double(), **conv)
    dw64 = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), **conv)
    results = {
        "fwd": (conv2d.bsr_conv2d_fwd(x, values, layout.row_ptr, layout.row_slots, layout.col_idx, None, **conv),
                y64),
        "grad_input": (conv2d.bsr_conv2d_grad_input(dy, values, layout.col_ptr, layout.col_slots, layout.row_idx,
                                                    x.shape[2:], **conv), dx64),
        "grad_weight": (conv2d.bsr_conv2d_grad_weight(dy, x, layout.row_idx, layout.col_idx, layout.row_slots,
                                                      (*block, *kernel), **conv), sk.from_dense(dw64, layout)),
    }
    for op, (result, truth) in results.items():
        check(record, "conv2d", op, dtype, result, truth,
              case=f"{kernel[0]}x{kernel[1]} stride {stride} dilation {dilation} "
                   f"{'channels-last' if channels_last else 'NCHW'}")


# Vector blocks (bo, 1): (block, grid, mask, rows) for linear; (kernel, stride, dilation, padding,
# channels-last) for conv2d at blocks of 16x1 (a 1x1 convolution runs on the linear kernels).
VECTOR_LINEAR_CASES = [((16, 1), (3, 37), "random", 77), ((8, 1), (5, 19), "random", 33),
                       ((32, 1), (2, 40), "random", 65), ((16, 1), (2, 20), "empty", 9), ((16, 1), (2, 20), "full", 1)]
VECTOR_CONV_CASES = [((3, 3), 1, 1, 1, True), ((3, 3), 2, 1, 1, False), ((3, 3), 1, 2, 2, True),
                     ((1, 1), 1, 1, 0, True)]


def stage_vector_smoke(record) -> None:
    """The vector-block kernels through the ops' Triton adapters, strict (a case Triton would not
    take raises instead of running the reference)."""
    import torch

    import sparse_kernels as sk
    from sparse_kernels.conv2d.kernels import triton_op_kernels as conv2d_kernels
    from sparse_kernels.linear.kernels import triton_op_kernels as linear_kernels

    linear, conv2d = linear_kernels(strict=True), conv2d_kernels(strict=True)
    generator = torch.Generator().manual_seed(0)
    # A dry run (Triton's interpreter, slow) checks that the stage runs, with a few cases; the kernels'
    # correctness on the CPU is the test suite's (tests/kernels/test_vector_blocks.py).
    linear_cases, conv_cases = (VECTOR_LINEAR_CASES[:1], VECTOR_CONV_CASES[:2]) if dry_run() else \
        (VECTOR_LINEAR_CASES, VECTOR_CONV_CASES)
    for dtype in [torch.float32] if dry_run() else [torch.bfloat16, torch.float32]:
        for block, grid, kind, rows in linear_cases:
            layout = sk.BlockSparseLayout.from_block_mask(make_mask(kind, grid, device(), generator), block)
            index = (layout.row_idx, layout.col_idx, layout.row_ptr, layout.row_slots, layout.col_ptr, layout.col_slots)
            values = torch.randn(layout.nnz, *block, generator=generator).to(device(), dtype)
            x = torch.randn(rows, layout.shape[1], generator=generator).to(device(), dtype)
            dy = torch.randn(rows, layout.shape[0], generator=generator).to(device(), dtype)
            w = dense_truth(values, layout)
            results = {
                "fwd": (linear["bsr_linear"](x, values, None, *index), x.double() @ w.T),
                "grad_input": (linear["bsr_linear_grad_input"](dy, values, *index), dy.double() @ w),
                "grad_weight": (linear["bsr_linear_grad_weight"](dy, x, *index, *block),
                                sk.from_dense(dy.double().T @ x.double(), layout)),
            }
            for op, (result, truth) in results.items():
                check(record, "linear", op, dtype, result, truth, case=f"vector block {block} grid {grid} {kind} M={rows}")
        for kernel, stride, dilation, padding, channels_last in conv_cases:
            _vector_conv_case(record, conv2d, dtype, generator, kernel, stride, dilation, padding, channels_last)


def _vector_conv_case(record, conv2d, dtype, generator, kernel, stride, dilation, padding, channels_last) -> None:
    import torch
    import torch.nn.functional as F

    import sparse_kernels as sk

    block = (16, 1)
    layout = sk.BlockSparseLayout.from_block_mask(make_mask("random", (3, 21), device(), generator), block)
    index = (layout.row_idx, layout.col_idx, layout.row_ptr, layout.row_slots, layout.col_ptr, layout.col_slots)
    values = torch.randn(layout.nnz, *block, *kernel, generator=generator).to(device(), dtype)
    x = torch.randn(2, layout.shape[1], 9, 9, generator=generator).to(device(), dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = dense_truth(values, layout)
    conv = ([stride] * 2, [padding] * 2, [dilation] * 2)
    y64 = F.conv2d(x.double(), w, None, *conv)
    dy = torch.randn(y64.shape, generator=generator).to(device(), dtype)
    results = {
        "fwd": (conv2d["bsr_conv2d"](x, values, None, *index, *conv), y64),
        "grad_input": (conv2d["bsr_conv2d_grad_input"](dy, values, *index, list(x.shape[2:]), *conv),
                       torch.nn.grad.conv2d_input(x.shape, w, dy.double(), *conv)),
        "grad_weight": (conv2d["bsr_conv2d_grad_weight"](dy, x, *index, [*block, *kernel], *conv),
                        sk.from_dense(torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), *conv), layout)),
    }
    for op, (result, truth) in results.items():
        check(record, "conv2d", op, dtype, result, truth,
              case=f"vector block {block} {kernel[0]}x{kernel[1]} stride {stride} dilation {dilation} "
                   f"{'channels-last' if channels_last else 'NCHW'}")


def stage_large(record) -> None:
    """One case over 2^31 elements per family (forward and grad-weight), checked on slices."""
    import torch
    import torch.nn.functional as F

    import sparse_kernels as sk
    import sparse_kernels.conv2d.triton_kernels as conv2d
    import sparse_kernels.linear.triton_kernels as linear

    dtype = torch.float32 if dry_run() else torch.bfloat16
    generator = torch.Generator(device=device()).manual_seed(0)
    # Linear: x [M, 256] with M * 256 > 2^31 (about 4.3 GB in bf16); a dry run uses 2^12 rows.
    rows = 2**12 if dry_run() else 2**23 + 1024
    block = (64, 64)
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(4, 4, dtype=torch.bool, device=device()), block)
    values = torch.randn(16, *block, device=device(), generator=generator).to(dtype)
    x = torch.randn(rows, 256, device=device(), generator=generator).to(dtype)
    y = linear.bsr_linear_fwd(x, values, layout.row_ptr, layout.row_slots, layout.col_idx, None)
    picks = torch.tensor([0, rows // 2, rows - 1], device=device())
    check(record, "linear", "fwd >2^31" if not dry_run() else "fwd (dry run size)", dtype, y[picks],
          x[picks].double() @ dense_truth(values, layout).T, case=f"x {tuple(x.shape)}: {x.numel()} elements")
    dw = linear.bsr_linear_grad_weight(y, x, layout.row_idx, layout.col_idx, layout.row_slots, block)
    truth = torch.zeros(64, 64, dtype=torch.float64, device=device())
    for start in range(0, rows, 2**20):  # block 0 = rows 0:64 of dy against columns 0:64 of x
        truth += y[start:start + 2**20, :64].double().T @ x[start:start + 2**20, :64].double()
    check(record, "linear", "grad_weight >2^31" if not dry_run() else "grad_weight (dry run size)", dtype,
          dw[0], truth, case=f"M={rows}")
    del x, y, dw
    # Conv: x [N, 128, 256, 256] with N * 128 * 256^2 > 2^31; checked on the last image.
    images = 1 if dry_run() else 257
    side = 8 if dry_run() else 256
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(2, 2, dtype=torch.bool, device=device()), block)
    values = torch.randn(4, *block, 3, 3, device=device(), generator=generator).to(dtype)
    x = torch.randn(images, 128, side, side, device=device(), generator=generator).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    y = conv2d.bsr_conv2d_fwd(x, values, layout.row_ptr, layout.row_slots, layout.col_idx, None, **conv)
    w = dense_truth(values, layout)
    check(record, "conv2d", "fwd >2^31" if not dry_run() else "fwd (dry run size)", dtype, y[-1:],
          F.conv2d(x[-1:].double(), w, **conv), case=f"x {tuple(x.shape)}: {x.numel()} elements")
    dw = conv2d.bsr_conv2d_grad_weight(y, x, layout.row_idx, layout.col_idx, layout.row_slots, (*block, 3, 3), **conv)
    # The truth in fp32 (cuDNN's fp64 convolutions are slow), over chunks of 16 images.
    truth = sum(torch.nn.grad.conv2d_weight(x[i:i + 16].float(), w.shape, y[i:i + 16].float(), **conv).double()
                for i in range(0, images, 16))
    check(record, "conv2d", "grad_weight >2^31" if not dry_run() else "grad_weight (dry run size)", dtype, dw,
          sk.from_dense(truth, layout), case=f"{images} images of {side}x{side}")
