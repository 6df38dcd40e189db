"""Triton implicit-GEMM kernels for vector blocks ``(bo, 1)`` of the block-sparse conv2d, and their launchers.

A vector block is ``bo`` output channels x one input channel x every tap: a group of ``bo``
output channels (block-row ``r``) picks its live input channels one by one. The GEMM view is the
square kernels' (rows: output pixels; reduction: input channel and tap), with the reduction of
a group walked as a flat list of (live block, tap) pairs, so that a 3x3 block with four live
channels is one step of 36 pairs rather than nine steps of four. No im2col buffer is made.

* ``_bsr_conv2d_vector_fwd_kernel``: a program owns ``BLOCK_M`` output pixels of one group and
  gathers ``BLOCK_K`` (channel, tap) pairs at a time into a ``[BLOCK_M, BLOCK_K]`` tile against
  their ``[BLOCK_K, bo]`` weights.
* ``_bsr_conv2d_vector_grad_input_kernel``: the transposed convolution; a program owns
  ``BLOCK_M`` input pixels of 16 consecutive input channels and walks their live blocks x taps
  (column-sorted index), each pair a ``(bo, 16)`` block with one non-zero column, as
  :mod:`sparse_kernels.linear.triton_vector_kernels` explains.
* ``_bsr_conv2d_vector_grad_weight_kernel``: ``BLOCK_S`` (block, tap) pairs of one group per
  program, which share the ``dy`` tile: one ``[BLOCK_S, BLOCK_M] @ [BLOCK_M, bo]`` dot per step.

Layouts. The gathered activation is read from an NCHW copy (``x`` itself when it is NCHW): that
is the K-major layout of an image, where the output pixels of a tile read, for one (channel,
tap), a run of consecutive input pixels (contiguous at stride 1, every other one at stride 2),
while channels-last would put them ``C`` elements apart (one 32-byte sector per element). Those
runs start at any pixel (a tap shifts them by one) and image borders mask single pixels, so the
gathered tile is copied element by element, not in 16-byte pieces: for 16-bit types it is
loaded into registers, not with ``cp.async`` (tests/kernels/compile_kernels_aot.py records it).
``dy`` is read channels-last (a group's ``bo`` channels contiguous per pixel), values as
``[nnz, kh * kw, bo]`` (a tap's ``bo`` weights contiguous). Since the gathered tile passes
through registers, its steps take at most 32 pairs (:data:`GATHER_STEP`) and the configs keep it
to 16 elements a thread: 64 (a step of 64 pairs at 128 rows on 4 warps) spill on sm_90.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..shapes import conv_output_size
from ..triton_common import VECTOR_GRAD_INPUT_CHANNELS as GRAD_INPUT_CHANNELS
from ..triton_common import (autotune_configs, check_operands, checked_bias, on_device, precision_and_upcast,
                             reduction_splits, vector_step)

Pair = Tuple[int, int]
# The most (block, tap) pairs a step of the gathering kernels (forward, grad-weight) takes.
GATHER_STEP = 32


# --------------------------------------------------------------------------- kernels
@triton.autotune(
    configs=autotune_configs([(64, 4, 3), (128, 8, 3), (64, 4, 4), (128, 8, 4)]),
    key=["M_BUCKET", "NNZ_BUCKET", "BLOCK_OUT", "BLOCK_K", "KH", "KW", "HAS_BIAS", "PRECISION"],
)
@triton.jit
def _bsr_conv2d_vector_fwd_kernel(
    x_ptr, values_ptr, bias_ptr, out_ptr,
    row_ptr_ptr, row_slots_ptr, col_idx_ptr,
    M, M_BUCKET, NNZ_BUCKET, NUM_GROUPS,
    OUT_H, OUT_W, IN_H, IN_W,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    pad_h, pad_w, dil_h, dil_w,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[n, group channels, h, w] = sum over the group's live (channel, tap) pairs of
    x[n, channel, h*STRIDE_H - pad_h + r*dil_h, w*STRIDE_W - pad_w + t*dil_w] * values[slot, tap] (+ bias).

    x: [N, C, IN_H, IN_W] (NCHW strides); values: [nnz, KH*KW, BLOCK_OUT], contiguous; out: [N, R*BLOCK_OUT,
    OUT_H, OUT_W] (channels-last strides); M = N * OUT_H * OUT_W. Group ``r`` owns the slots
    ``row_slots[row_ptr[r]:row_ptr[r + 1]]``, slot ``s`` reads channel ``col_idx[s]``. One program
    computes a ``BLOCK_M x BLOCK_OUT`` tile; ``M_BUCKET`` and ``NNZ_BUCKET`` are autotune keys only.
    """
    # Program -> (pixel tile, group); consecutive programs share the pixel tile.
    pid = tl.program_id(0)
    pid_m = pid // NUM_GROUPS
    group = pid % NUM_GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    image = offs_m // (OUT_H * OUT_W)
    pixel = offs_m % (OUT_H * OUT_W)
    out_h = pixel // OUT_W
    out_w = pixel % OUT_W
    base_h = out_h * STRIDE_H - pad_h
    base_w = out_w * STRIDE_W - pad_w
    # A gathered element's address is (pixel part) + (pair part): separable, fewer registers.
    x_pixels = (x_ptr + image.to(tl.int64) * stride_xn + base_h.to(tl.int64) * stride_xh
                + base_w.to(tl.int64) * stride_xw)
    offs_n = tl.arange(0, BLOCK_OUT)
    offs_k = tl.arange(0, BLOCK_K)

    # The group's (live block, tap) pairs, BLOCK_K at a time; missing ones load zeros.
    TAPS: tl.constexpr = KH * KW
    start = tl.load(row_ptr_ptr + group) * TAPS
    end = tl.load(row_ptr_ptr + group + 1) * TAPS
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        pair = k0 + offs_k
        live = pair < end
        tap = pair % TAPS
        slot = tl.load(row_slots_ptr + pair // TAPS, mask=live, other=0).to(tl.int64)
        channel = tl.load(col_idx_ptr + slot, mask=live, other=0)
        shift_h = tap // KW * dil_h
        shift_w = tap % KW * dil_w
        pair_offsets = channel.to(tl.int64) * stride_xc + shift_h * stride_xh + shift_w * stride_xw
        # 0 <= in_h < IN_H as one unsigned comparison (a negative in_h wraps to a large one)
        in_h = (base_h[:, None] + shift_h[None, :]).to(tl.uint32)
        in_w = (base_w[:, None] + shift_w[None, :]).to(tl.uint32)
        valid = m_mask[:, None] & live[None, :] & (in_h < IN_H) & (in_w < IN_W)
        a = tl.load(x_pixels[:, None] + pair_offsets[None, :], mask=valid, other=0.0)
        b = tl.load(
            values_ptr + (slot * TAPS + tap)[:, None] * BLOCK_OUT + offs_n[None, :],
            mask=live[:, None], other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    cols = group * BLOCK_OUT + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_pixels = out_ptr + image.to(tl.int64) * stride_on + out_h.to(tl.int64) * stride_oh + out_w.to(tl.int64) * stride_ow
    tl.store(out_pixels[:, None] + cols.to(tl.int64)[None, :] * stride_oc, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None])


# Four warps, for the reason in sparse_kernels/linear/triton_vector_kernels.py.
@triton.autotune(
    configs=autotune_configs([(64, 4, 3), (128, 4, 3), (128, 4, 4), (256, 4, 3)]),
    key=["M_BUCKET", "NNZ_BUCKET", "BLOCK_OUT", "KH", "KW", "PRECISION"],
)
@triton.jit
def _bsr_conv2d_vector_grad_input_kernel(
    dy_ptr, values_ptr, out_ptr,
    col_ptr_ptr, col_slots_ptr, row_idx_ptr, col_idx_ptr,
    M, M_BUCKET, NNZ_BUCKET, NUM_CHANNELS, NUM_C_TILES,
    OUT_H, OUT_W, SRC_H, SRC_W,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_on, stride_oc, stride_oh, stride_ow,
    pad_h, pad_w, dil_h, dil_w,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[n, c, h, w] = sum over the live blocks (group g, channel c) and taps (r, t) of
    dy[n, g channels, (h + pad_h - r*dil_h) / STRIDE_H, (w + pad_w - t*dil_w) / STRIDE_W] @ values[slot, tap],
    where both divide exactly: the input gradient.

    dy: [N, R*BLOCK_OUT, SRC_H, SRC_W] (channels-last strides); values: [nnz, KH*KW, BLOCK_OUT], contiguous;
    out: [N, C, OUT_H, OUT_W] (channels-last strides); M = N * OUT_H * OUT_W. The ``BLOCK_C``
    channels of a program own ``col_slots[col_ptr[c0]:col_ptr[c0 + BLOCK_C]]``; each step takes one
    tap of ``BLOCK_RED / bo`` of those blocks (one, or two at ``bo = 8``: a 16-bit dot reduces over
    16 at least): their ``[BLOCK_M, bo]`` tiles of ``dy`` (contiguous per pixel) against a
    ``[BLOCK_RED, BLOCK_C]`` weight tile holding each block's ``bo`` weights in its channel's
    column and zeros elsewhere.
    """
    # Program -> (pixel tile, channel tile); consecutive programs share the pixel tile.
    # dy's pixel strides are multiples of bo (channels-last): written so, the compiler knows that a
    # group's bo channels start 16-byte aligned also at bo = 8 (it only learns multiples of 16).
    stride_dyn = stride_dyn // BLOCK_OUT * BLOCK_OUT
    stride_dyh = stride_dyh // BLOCK_OUT * BLOCK_OUT
    stride_dyw = stride_dyw // BLOCK_OUT * BLOCK_OUT
    pid = tl.program_id(0)
    pid_m = pid // NUM_C_TILES
    c0 = (pid % NUM_C_TILES) * BLOCK_C
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    image = offs_m // (OUT_H * OUT_W)
    pixel = offs_m % (OUT_H * OUT_W)
    out_h = pixel // OUT_W
    out_w = pixel % OUT_W
    base_h = out_h + pad_h
    base_w = out_w + pad_w
    dy_images = dy_ptr + image.to(tl.int64) * stride_dyn
    offs_c = tl.arange(0, BLOCK_C)
    # Reduction index k of a step -> (its block: the step's first + k // bo, output channel k % bo).
    SLOTS: tl.constexpr = BLOCK_RED // BLOCK_OUT
    offs_k = tl.arange(0, BLOCK_RED)
    k_slot = offs_k // BLOCK_OUT
    k_out = offs_k % BLOCK_OUT

    # One flat loop over (tap, SLOTS of the tile's live blocks): a step's blocks share the tap, so
    # the source pixels are computed once a step.
    TAPS: tl.constexpr = KH * KW
    start = tl.load(col_ptr_ptr + c0)
    end = tl.load(col_ptr_ptr + tl.minimum(c0 + BLOCK_C, NUM_CHANNELS))
    chunks = tl.cdiv(end - start, SLOTS)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for step in range(0, chunks * TAPS):
        tap = step // chunks
        position = start + (step % chunks) * SLOTS + k_slot
        live = position < end
        slot = tl.load(col_slots_ptr + position, mask=live, other=0).to(tl.int64)
        group = tl.load(row_idx_ptr + slot, mask=live, other=0).to(tl.int64)
        column = tl.load(col_idx_ptr + slot, mask=live, other=0) - c0
        # Divide non-negative numerators only: the same in C and in the interpreter.
        num_h = base_h - tap // KW * dil_h
        num_w = base_w - tap % KW * dil_w
        num_h_pos = tl.maximum(num_h, 0)
        num_w_pos = tl.maximum(num_w, 0)
        src_h = num_h_pos // STRIDE_H
        src_w = num_w_pos // STRIDE_W
        valid = (num_h >= 0) & (num_w >= 0) & (num_h_pos % STRIDE_H == 0) & (num_w_pos % STRIDE_W == 0)
        valid = valid & (src_h < SRC_H) & (src_w < SRC_W) & m_mask
        dy_pixels = dy_images + src_h.to(tl.int64) * stride_dyh + src_w.to(tl.int64) * stride_dyw
        a = tl.load(dy_pixels[:, None] + (group * BLOCK_OUT + k_out)[None, :] * stride_dyc,
                    mask=valid[:, None] & live[None, :], other=0.0)
        # each block's weights at this tap in its channel's column, zeros elsewhere: [BLOCK_RED, BLOCK_C]
        b = tl.load(values_ptr + ((slot * TAPS + tap) * BLOCK_OUT + k_out)[:, None] + offs_c[None, :] * 0,
                    mask=live[:, None] & (column[:, None] == offs_c[None, :]), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    channels = c0 + offs_c
    out_pixels = out_ptr + image.to(tl.int64) * stride_on + out_h.to(tl.int64) * stride_oh + out_w.to(tl.int64) * stride_ow
    tl.store(out_pixels[:, None] + channels.to(tl.int64)[None, :] * stride_oc, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & (channels < NUM_CHANNELS)[None, :])


@triton.autotune(
    configs=autotune_configs([(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 3)]),
    key=["M_BUCKET", "NNZ_BUCKET", "BLOCK_OUT", "BLOCK_S", "KH", "KW", "PRECISION"],
)
@triton.jit
def _bsr_conv2d_vector_grad_weight_kernel(
    dy_ptr, x_ptr, partial_ptr, row_ptr_ptr, row_slots_ptr, col_idx_ptr,
    M, M_BUCKET, NNZ_BUCKET, CHUNK, CHUNKS_PER_GROUP,
    OUT_H, OUT_W, IN_H, IN_W,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_psplit, stride_ps, stride_pt, stride_po,
    pad_h, pad_w, dil_h, dil_w,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """partial[split, s, tap] = sum over the output pixels m of this split's chunk of
    x[m shifted by tap, col(s)] * dy[m, group(s) channels]: the weight gradient, fp32 partial sums.

    dy: [N, R*BLOCK_OUT, OUT_H, OUT_W] (channels-last strides); x: [N, C, IN_H, IN_W] (NCHW
    strides); partial: fp32 [splits, nnz, KH*KW, BLOCK_OUT]. Axis 0 of the grid runs over
    (group, chunk of ``BLOCK_S`` of its (block, tap) pairs in row-sorted order), which share the
    ``dy`` tile; ``CHUNKS_PER_GROUP`` bounds the fullest group's chunks, and the programs past a
    group's end run no step. Axis 1 runs over chunks of ``CHUNK`` pixels.
    """
    # dy's pixel strides are multiples of bo, as in grad-input.
    stride_dyn = stride_dyn // BLOCK_OUT * BLOCK_OUT
    stride_dyh = stride_dyh // BLOCK_OUT * BLOCK_OUT
    stride_dyw = stride_dyw // BLOCK_OUT * BLOCK_OUT
    pid = tl.program_id(0)
    split = tl.program_id(1)
    group = pid // CHUNKS_PER_GROUP
    TAPS: tl.constexpr = KH * KW
    first = tl.load(row_ptr_ptr + group) * TAPS + (pid % CHUNKS_PER_GROUP) * BLOCK_S
    end = tl.load(row_ptr_ptr + group + 1) * TAPS
    pair = first + tl.arange(0, BLOCK_S)
    live = pair < end
    tap = pair % TAPS
    slot = tl.load(row_slots_ptr + pair // TAPS, mask=live, other=0).to(tl.int64)
    channel = tl.load(col_idx_ptr + slot, mask=live, other=0).to(tl.int64)
    shift_h = tap // KW * dil_h - pad_h
    shift_w = tap % KW * dil_w - pad_w
    # A gathered element's address is (pair part) + (pixel part): separable, fewer registers.
    x_pairs = x_ptr + channel * stride_xc + shift_h.to(tl.int64) * stride_xh + shift_w.to(tl.int64) * stride_xw
    offs_o = tl.arange(0, BLOCK_OUT)

    m_start = split * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    m_end = tl.where(first < end, m_end, m_start)  # a chunk past its group's end runs no step
    acc = tl.zeros((BLOCK_S, BLOCK_OUT), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        image = (offs_m // (OUT_H * OUT_W)).to(tl.int64)
        pixel = offs_m % (OUT_H * OUT_W)
        out_h = pixel // OUT_W
        out_w = pixel % OUT_W
        # 0 <= in_h < IN_H as one unsigned comparison (a negative in_h wraps to a large one)
        in_h = (shift_h[:, None] + (out_h * STRIDE_H)[None, :]).to(tl.uint32)
        in_w = (shift_w[:, None] + (out_w * STRIDE_W)[None, :]).to(tl.uint32)
        valid = live[:, None] & m_mask[None, :] & (in_h < IN_H) & (in_w < IN_W)
        pixel_offsets = image * stride_xn + (out_h * STRIDE_H).to(tl.int64) * stride_xh + (out_w * STRIDE_W).to(tl.int64) * stride_xw
        # x tile [BLOCK_S, BLOCK_M]: each pair's channel at its shifted pixels
        a = tl.load(x_pairs[:, None] + pixel_offsets[None, :], mask=valid, other=0.0)
        dy_pixels = dy_ptr + image * stride_dyn + out_h.to(tl.int64) * stride_dyh + out_w.to(tl.int64) * stride_dyw
        b = tl.load(dy_pixels[:, None] + (group * BLOCK_OUT + offs_o)[None, :] * stride_dyc, mask=m_mask[:, None],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out_ptrs = (partial_ptr + split.to(tl.int64) * stride_psplit + slot[:, None] * stride_ps
                + tap[:, None] * stride_pt + offs_o[None, :] * stride_po)
    tl.store(out_ptrs, acc, mask=live[:, None])


# --------------------------------------------------------------------------- launchers
def _tap_major(values: torch.Tensor) -> torch.Tensor:
    """``[nnz, bo, 1, kh, kw] -> [nnz, kh * kw, bo]``, contiguous (a small copy)."""
    nnz, bo, _, kh, kw = values.shape
    return values.reshape(nnz, bo, kh * kw).transpose(1, 2).contiguous()


def _check_vector(name: str, values: torch.Tensor) -> None:
    if values.dim() != 5 or values.shape[2] != 1:
        raise ValueError(f"{name}: vector-block values must be [nnz, bo, 1, kh, kw], got {tuple(values.shape)}")


def bsr_conv2d_vector_fwd(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, row_slots: torch.Tensor,
                          col_idx: torch.Tensor, bias: Optional[torch.Tensor], stride: Pair, padding: Pair,
                          dilation: Pair) -> torch.Tensor:
    """``y = conv2d(x, W) + bias`` for vector blocks, through the row-sorted index.

    x: [N, C, H, W]; values: [nnz, bo, 1, kh, kw]; bias: [R * bo] or None.
    Returns y: [N, R * bo, OH, OW], channels-last.
    """
    name = "bsr_conv2d_vector_fwd"
    check_operands(name, x, values.shape[1:3], values, row_ptr, row_slots, col_idx, dense_dims=4)
    _check_vector(name, values)
    bo, kh, kw = values.shape[1], values.shape[3], values.shape[4]
    groups = row_ptr.shape[0] - 1
    out_channels = groups * bo
    bias = checked_bias(name, bias, out_channels, x.dtype)
    out_h = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    out = torch.empty(x.shape[0], out_channels, out_h, out_w, device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    M = x.shape[0] * out_h * out_w
    if M == 0 or out_channels == 0:
        return out
    x = x.contiguous()  # NCHW: the K-major layout the gather reads (module docstring)
    weights = _tap_major(values)
    precision, upcast = precision_and_upcast(x.dtype, conv=True)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * groups,)  # noqa: E731
    with on_device(x):
        _bsr_conv2d_vector_fwd_kernel[grid](
            x, weights, bias if bias is not None else out, out,
            row_ptr, row_slots, col_idx,
            M, triton.next_power_of_2(M), triton.next_power_of_2(values.shape[0]), groups,
            out_h, out_w, x.shape[2], x.shape[3],
            *x.stride(), *out.stride(),
            *padding, *dilation,
            STRIDE_H=stride[0], STRIDE_W=stride[1], KH=kh, KW=kw, HAS_BIAS=bias is not None,
            BLOCK_OUT=bo, BLOCK_K=vector_step(values.shape[0] * kh * kw, groups, GATHER_STEP),
            UPCAST=upcast, PRECISION=precision,
        )
    return out


def bsr_conv2d_vector_grad_input(grad_out: torch.Tensor, values: torch.Tensor, col_ptr: torch.Tensor,
                                 col_slots: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor, input_hw: Pair,
                                 stride: Pair, padding: Pair, dilation: Pair) -> torch.Tensor:
    """``dx``: the transposed convolution of ``dy`` over live vector blocks, column-sorted index.

    grad_out: [N, R * bo, OH, OW]; values: [nnz, bo, 1, kh, kw]; returns dx: [N, C, *input_hw],
    channels-last.
    """
    name = "bsr_conv2d_vector_grad_input"
    check_operands(name, grad_out, values.shape[1:3], values, col_ptr, col_slots, row_idx, col_idx, dense_dims=4)
    _check_vector(name, values)
    bo, kh, kw = values.shape[1], values.shape[3], values.shape[4]
    channels = col_ptr.shape[0] - 1
    if grad_out.shape[1] % bo:
        raise ValueError(f"{name}: grad_out of shape {tuple(grad_out.shape)} is not a whole number of {bo}-channel groups")
    out = torch.empty(grad_out.shape[0], channels, *input_hw, device=grad_out.device, dtype=grad_out.dtype,
                      memory_format=torch.channels_last)
    M = grad_out.shape[0] * input_hw[0] * input_hw[1]
    if M == 0 or channels == 0:
        return out
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    weights = _tap_major(values)
    tiles = triton.cdiv(channels, GRAD_INPUT_CHANNELS)
    precision, upcast = precision_and_upcast(grad_out.dtype, conv=True)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * tiles,)  # noqa: E731
    with on_device(grad_out):
        _bsr_conv2d_vector_grad_input_kernel[grid](
            grad_out, weights, out,
            col_ptr, col_slots, row_idx, col_idx,
            M, triton.next_power_of_2(M), triton.next_power_of_2(values.shape[0]), channels, tiles,
            input_hw[0], input_hw[1], grad_out.shape[2], grad_out.shape[3],
            *grad_out.stride(), *out.stride(),
            *padding, *dilation,
            STRIDE_H=stride[0], STRIDE_W=stride[1], KH=kh, KW=kw,
            BLOCK_OUT=bo, BLOCK_RED=max(bo, 16), BLOCK_C=GRAD_INPUT_CHANNELS,
            UPCAST=upcast, PRECISION=precision,
        )
    return out


def bsr_conv2d_vector_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor,
                                  row_slots: torch.Tensor, col_idx: torch.Tensor, block_shape: Sequence[int],
                                  stride: Pair, padding: Pair, dilation: Pair) -> torch.Tensor:
    """Weight gradient at live vector blocks: ``[nnz, bo, 1, kh, kw]`` in ``x.dtype``.

    grad_out: [N, R * bo, OH, OW]; x: [N, C, H, W]; block_shape: (bo, 1, kh, kw).
    """
    name = "bsr_conv2d_vector_grad_weight"
    bo, bi, kh, kw = block_shape
    check_operands(name, x, (bo, bi), grad_out, row_ptr, row_slots, col_idx, dense_dims=4)
    if grad_out.dim() != 4 or grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: grad_out {tuple(grad_out.shape)} does not match x {tuple(x.shape)}")
    batch, _, out_h, out_w = grad_out.shape
    nnz, groups, taps = row_slots.shape[0], row_ptr.shape[0] - 1, kh * kw
    M = batch * out_h * out_w
    if nnz == 0 or M == 0:
        return x.new_zeros(nnz, bo, 1, kh, kw)
    x = x.contiguous()  # NCHW: the K-major layout the gather reads
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    block_s = vector_step(nnz * taps, groups, GATHER_STEP)
    chunks_per_group = triton.cdiv(x.shape[1] * taps, block_s)
    splits = reduction_splits(triton.cdiv(nnz * taps, block_s), M, x.device)
    chunk = triton.cdiv(triton.cdiv(M, splits), 256) * 256  # a multiple of every BLOCK_M
    splits = triton.cdiv(M, chunk)
    partial = torch.empty(splits, nnz, taps, bo, device=x.device, dtype=torch.float32)
    precision, upcast = precision_and_upcast(x.dtype, conv=True)
    with on_device(x):
        _bsr_conv2d_vector_grad_weight_kernel[(groups * chunks_per_group, splits)](
            grad_out, x, partial, row_ptr, row_slots, col_idx,
            M, triton.next_power_of_2(M), triton.next_power_of_2(nnz), chunk, chunks_per_group,
            out_h, out_w, x.shape[2], x.shape[3],
            *grad_out.stride(), *x.stride(), *partial.stride(),
            *padding, *dilation,
            STRIDE_H=stride[0], STRIDE_W=stride[1], KH=kh, KW=kw, BLOCK_OUT=bo, BLOCK_S=block_s,
            UPCAST=upcast, PRECISION=precision,
        )
    # The chunks' sums in a fixed order (deterministic): [nnz, taps, bo] -> [nnz, bo, 1, kh, kw], contiguous
    # like every grad-weight (the fake kernel's strides).
    return partial.sum(0).transpose(1, 2).contiguous().view(nnz, bo, 1, kh, kw).to(x.dtype)
