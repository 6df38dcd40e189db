"""Triton kernels for vector blocks ``(bo, 1)`` of the block-sparse linear layer, and their launchers.

A vector block is ``bo`` output channels x one input channel: each group of ``bo`` output
channels (block-row ``r``) picks its live input channels one by one, so two groups share no
tile of input channels and the square kernels' ``[k, n]`` value tiles do not exist. Three kernels:

* ``_bsr_vector_fwd_kernel``: ``y = x @ W.T``. A program owns ``BLOCK_M`` rows of one group and
  walks the group's live channels (row-sorted index), gathering ``BLOCK_K`` of them at a time
  into a ``[BLOCK_M, BLOCK_K]`` tile against the ``[BLOCK_K, bo]`` weights of those slots.
* ``_bsr_vector_grad_input_kernel``: ``dx = dy @ W``. An input channel's live groups share
  nothing with another channel's, so no tensor-core tile is wider than one channel; a program
  owns ``BLOCK_M`` rows of 16 consecutive input channels and walks their live blocks
  (column-sorted index, one contiguous run for the 16), each as a ``(bo, 16)`` block whose 15
  other columns are zero (the masked load fills them).
* ``_bsr_vector_grad_weight_kernel``: ``dW[s] = x[:, col(s)].T @ dy[:, group(s)]``, batched
  over the slots of one group (they share the ``dy`` tile), so that it is one ``tl.dot`` of
  ``[BLOCK_S, BLOCK_M] @ [BLOCK_M, bo]``.

The forward and the weight gradient gather input channels from a K-major copy of ``x``
(:func:`~sparse_kernels.triton_common.k_major`, ``[C, M_pad]``), for the reason in
``_bsr_vector_fwd_kernel``'s docstring. All accumulate in fp32; under the interpreter bf16
tiles are upcast before ``tl.dot`` (its bf16 ``tl.dot`` is wrong in Triton 3.8 and 3.9).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..triton_common import (
    autotune_configs,
    check_operands,
    checked_bias,
    k_major,
    on_device,
    precision_and_upcast,
    reduction_splits,
    vector_step,
)
from ..triton_common import VECTOR_GRAD_INPUT_CHANNELS as GRAD_INPUT_CHANNELS


# --------------------------------------------------------------------------- kernels
@triton.autotune(
    configs=autotune_configs([(64, 4, 3), (128, 4, 3), (128, 8, 4), (256, 8, 3)]),
    key=["M_BUCKET", "NNZ_BUCKET", "BLOCK_OUT", "BLOCK_K", "HAS_BIAS", "PRECISION"],
)
@triton.jit
def _bsr_vector_fwd_kernel(
    xt_ptr, values_ptr, bias_ptr, out_ptr,
    row_ptr_ptr, row_slots_ptr, col_idx_ptr,
    M, M_BUCKET, NNZ_BUCKET, NUM_GROUPS,
    stride_xc, stride_xm,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = x @ W.T (+ bias), ``W`` of vector blocks ``(BLOCK_OUT, 1)``.

    xt: [C, M_pad], the K-major copy of x [M, C] (M_pad >= every row tile, zero-padded);
    values: [nnz, BLOCK_OUT], contiguous (a slot's ``bo`` weights); out: [M, R * BLOCK_OUT]; bias: [R * BLOCK_OUT].
    Group ``r`` owns the slots ``row_slots[row_ptr[r]:row_ptr[r + 1]]``; slot ``s`` reads input
    channel ``col_idx[s]``. One program computes a ``BLOCK_M x BLOCK_OUT`` tile of ``out``; a
    group with no live channel still writes its tile (zeros, or the bias).

    Why the K-major copy: a step gathers ``BLOCK_K`` arbitrary channels of ``BLOCK_M`` rows. In
    x's own layout one channel's rows are ``C`` elements apart, so a warp loading 32 of them
    touches 32 sectors of 32 bytes for 64 bytes of bf16: 16x the traffic, with no promise that
    later steps find those sectors in L1. In ``xt`` they are one contiguous run, copied to shared
    memory in 16-byte pieces (``cp.async``). The copy costs one read and one write of x; the
    kernel reads ``nnz * M`` gathered elements, ``density * R`` times x's size (4x at 256
    outputs, blocks of 16, density 1/4), so the copy pays for itself as soon as ``density * R``
    is above about 1/8 of the traffic it saves. ``M_BUCKET`` and ``NNZ_BUCKET`` are only
    autotune keys (next powers of two of ``M`` and ``nnz``).
    """
    # Program -> (row tile, group); consecutive programs share the row tile, so the columns of
    # xt they gather stay in L2 while every group of the layer reads them.
    pid = tl.program_id(0)
    pid_m = pid // NUM_GROUPS
    group = pid % NUM_GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_OUT)
    offs_k = tl.arange(0, BLOCK_K)
    xt_rows = xt_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    # The group's live channels, BLOCK_K at a time; the last step's missing ones load zeros.
    start = tl.load(row_ptr_ptr + group)
    end = tl.load(row_ptr_ptr + group + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        position = k0 + offs_k
        live = position < end
        slot = tl.load(row_slots_ptr + position, mask=live, other=0).to(tl.int64)
        channel = tl.load(col_idx_ptr + slot, mask=live, other=0).to(tl.int64)
        a = tl.load(xt_rows + channel[None, :] * stride_xc, mask=live[None, :], other=0.0)
        b = tl.load(values_ptr + slot[:, None] * BLOCK_OUT + offs_n[None, :], mask=live[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    cols = group * BLOCK_OUT + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


# Four warps: the [16, 16] weight tile of a step is 2 elements a thread, copied in 4-byte pieces;
# with eight, 1 element (2 bytes of a 16-bit type) is below cp.async's smallest copy.
@triton.autotune(
    configs=autotune_configs([(64, 4, 3), (128, 4, 3), (128, 4, 4), (256, 4, 3)]),
    key=["M_BUCKET", "NNZ_BUCKET", "BLOCK_OUT", "BLOCK_C", "PRECISION"],
)
@triton.jit
def _bsr_vector_grad_input_kernel(
    dy_ptr, values_ptr, out_ptr,
    col_ptr_ptr, col_slots_ptr, row_idx_ptr, col_idx_ptr,
    M, M_BUCKET, NNZ_BUCKET, NUM_CHANNELS, NUM_C_TILES,
    stride_dym, stride_dyn,
    stride_om, stride_oc,
    BLOCK_OUT: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = dy @ W, ``W`` of vector blocks ``(BLOCK_OUT, 1)``: the input gradient.

    dy: [M, R * BLOCK_OUT]; values: [nnz, BLOCK_OUT], contiguous; out: [M, C]. Input channel ``c`` owns the
    slots ``col_slots[col_ptr[c]:col_ptr[c + 1]]``, so the ``BLOCK_C`` channels of a program own
    one contiguous run of them. One program computes a ``BLOCK_M x BLOCK_C`` tile of ``out``.

    Each step takes one live block ``s`` (group ``g``, channel ``c``): the ``[BLOCK_M, bo]`` tile
    ``dy[:, g]`` (``bo`` contiguous elements per row: whole 32-byte sectors of 16-bit ``dy`` at
    ``bo = 16``, so ``dy`` needs no copy) against ``[bo, BLOCK_C]`` weights holding ``values[s]`` in
    column ``c - c0`` and zeros elsewhere (a masked load). The tensor cores so do ``BLOCK_C``
    times the useful work, which costs no time: a step loads one ``dy`` element per useful MAC,
    and the loop is bound by those loads (from L2) either way. A dot, rather than a reduction on
    CUDA cores, is what Triton software-pipelines. ``BLOCK_RED`` is ``bo`` rounded up to 16 (the
    smallest reduction of a 16-bit dot): at ``bo = 8`` a step takes two blocks.
    """
    # Program -> (row tile, channel tile); consecutive programs share the row tile of dy.
    # dy's row stride is a multiple of bo (the launcher sees to it): written so, the compiler knows
    # that a group's bo channels start 16-byte aligned also at bo = 8 (it only learns multiples of 16).
    stride_dym = stride_dym // BLOCK_OUT * BLOCK_OUT
    pid = tl.program_id(0)
    pid_m = pid // NUM_C_TILES
    c0 = (pid % NUM_C_TILES) * BLOCK_C
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    # Reduction index k of a step -> (its block: the step's first + k // bo, output channel k % bo).
    SLOTS: tl.constexpr = BLOCK_RED // BLOCK_OUT
    offs_k = tl.arange(0, BLOCK_RED)
    k_slot = offs_k // BLOCK_OUT
    k_out = offs_k % BLOCK_OUT

    # The live blocks of channels c0 ... c0 + BLOCK_C - 1, SLOTS per step.
    start = tl.load(col_ptr_ptr + c0)
    end = tl.load(col_ptr_ptr + tl.minimum(c0 + BLOCK_C, NUM_CHANNELS))
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for first in range(start, end, SLOTS):
        position = first + k_slot
        live = position < end
        slot = tl.load(col_slots_ptr + position, mask=live, other=0).to(tl.int64)
        group = tl.load(row_idx_ptr + slot, mask=live, other=0).to(tl.int64)
        column = tl.load(col_idx_ptr + slot, mask=live, other=0) - c0
        a = tl.load(dy_rows + (group * BLOCK_OUT + k_out)[None, :] * stride_dyn, mask=m_mask[:, None] & live[None, :],
                    other=0.0)
        # each block's values in its channel's column, zeros in the others: [BLOCK_RED, BLOCK_C]
        b = tl.load(values_ptr + (slot * BLOCK_OUT + k_out)[:, None] + offs_c[None, :] * 0,
                    mask=live[:, None] & (column[:, None] == offs_c[None, :]), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    channels = c0 + offs_c
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + channels[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (channels < NUM_CHANNELS)[None, :])


@triton.autotune(
    configs=autotune_configs([(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 3)]),
    key=["M_BUCKET", "NNZ_BUCKET", "BLOCK_OUT", "BLOCK_S", "PRECISION"],
)
@triton.jit
def _bsr_vector_grad_weight_kernel(
    dy_ptr, xt_ptr, partial_ptr, row_ptr_ptr, row_slots_ptr, col_idx_ptr,
    M, M_BUCKET, NNZ_BUCKET, CHUNK, CHUNKS_PER_GROUP,
    stride_dym, stride_dyn,
    stride_xc, stride_xm,
    stride_psplit, stride_ps, stride_po,
    BLOCK_OUT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """partial[split, s] = x[m, col(s)] @ dy[m, group(s)] summed over the rows ``m`` of this
    split's chunk: the weight gradient of vector blocks, in fp32 partial sums.

    dy: [M, R * BLOCK_OUT]; xt: [C, M_pad], the K-major copy of x (zero past ``M``);
    partial: fp32 [splits, nnz, BLOCK_OUT]. Axis 0 of the grid runs over (group, chunk of
    ``BLOCK_S`` of its slots in row-sorted order): the slots of a group share the ``dy`` tile, so
    a chunk is one ``[BLOCK_S, BLOCK_M] @ [BLOCK_M, bo]`` dot per step (``BLOCK_S`` up to 64 rows:
    Hopper's wgmma). ``CHUNKS_PER_GROUP`` bounds the chunks of the fullest group; the programs
    past a group's end run no step. Axis 1 runs over chunks of ``CHUNK`` rows, as the square
    kernel's (:func:`~sparse_kernels.triton_common.reduction_splits`). Per step a program loads
    ``(BLOCK_S + bo) x BLOCK_M`` elements for ``BLOCK_S x bo x BLOCK_M`` MACs: 13 MACs per element
    at 64 slots and ``bo = 16``, the most a 16-channel group allows.
    """
    stride_dym = stride_dym // BLOCK_OUT * BLOCK_OUT  # a multiple of bo, as in grad-input
    pid = tl.program_id(0)
    split = tl.program_id(1)
    group = pid // CHUNKS_PER_GROUP
    first = tl.load(row_ptr_ptr + group) + (pid % CHUNKS_PER_GROUP) * BLOCK_S
    end = tl.load(row_ptr_ptr + group + 1)
    position = first + tl.arange(0, BLOCK_S)
    live = position < end
    slot = tl.load(row_slots_ptr + position, mask=live, other=0).to(tl.int64)
    channel = tl.load(col_idx_ptr + slot, mask=live, other=0).to(tl.int64)
    offs_o = tl.arange(0, BLOCK_OUT)
    xt_channels = xt_ptr + channel[:, None] * stride_xc
    dy_cols = dy_ptr + (group * BLOCK_OUT + offs_o)[None, :] * stride_dyn

    # Rows of this split; a chunk past its group's end runs no step. CHUNK is a multiple of
    # BLOCK_M and xt is zero past M, so xt needs no row mask (dy has one).
    m_start = split * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    m_end = tl.where(first < end, m_end, m_start)
    acc = tl.zeros((BLOCK_S, BLOCK_OUT), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        a = tl.load(xt_channels + rows64[None, :] * stride_xm, mask=live[:, None], other=0.0)
        b = tl.load(dy_cols + rows64[:, None] * stride_dym, mask=(rows < m_end)[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out_ptrs = partial_ptr + split.to(tl.int64) * stride_psplit + slot[:, None] * stride_ps + offs_o[None, :] * stride_po
    tl.store(out_ptrs, acc, mask=live[:, None])


# --------------------------------------------------------------------------- launchers
def _vector_values(name: str, values: torch.Tensor) -> torch.Tensor:
    """``[nnz, bo, 1] -> [nnz, bo]``, contiguous (a view of contiguous values)."""
    if values.dim() != 3 or values.shape[2] != 1:
        raise ValueError(f"{name}: vector-block values must be [nnz, bo, 1], got {tuple(values.shape)}")
    return values.reshape(values.shape[0], values.shape[1]).contiguous()


def _rows_of_groups(grad_out: torch.Tensor, block_out: int) -> torch.Tensor:
    """``grad_out`` with a row stride that is a multiple of ``bo`` (the kernels rely on it), copied
    only if it has not."""
    return grad_out if grad_out.stride(0) % block_out == 0 else grad_out.contiguous()


def bsr_linear_vector_fwd(
    x: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    row_slots: torch.Tensor,
    col_idx: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for vector blocks, through the row-sorted index.

    x: [M, C]; values: [nnz, bo, 1]; row_ptr: [R + 1]; row_slots, col_idx: [nnz];
    bias: [R * bo] or None. Returns y: [M, R * bo] in ``x.dtype``.
    """
    name = "bsr_linear_vector_fwd"
    check_operands(name, x, values.shape[1:3], values, row_ptr, row_slots, col_idx)
    weights = _vector_values(name, values)
    groups, block_out = row_ptr.shape[0] - 1, weights.shape[1]
    out_features = groups * block_out
    bias = checked_bias(name, bias, out_features, x.dtype)
    M = x.shape[0]
    out = torch.empty(M, out_features, device=x.device, dtype=x.dtype)
    if M == 0 or out_features == 0:
        return out
    xt = k_major(x)
    precision, upcast = precision_and_upcast(x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * groups,)  # noqa: E731
    with on_device(x):
        _bsr_vector_fwd_kernel[grid](
            xt, weights, bias if bias is not None else out, out,
            row_ptr, row_slots, col_idx,
            M, triton.next_power_of_2(M), triton.next_power_of_2(weights.shape[0]), groups,
            xt.stride(0), xt.stride(1),
            out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, BLOCK_OUT=block_out, BLOCK_K=vector_step(weights.shape[0], groups),
            UPCAST=upcast, PRECISION=precision,
        )
    return out


def bsr_linear_vector_grad_input(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    col_ptr: torch.Tensor,
    col_slots: torch.Tensor,
    row_idx: torch.Tensor,
    col_idx: torch.Tensor,
) -> torch.Tensor:
    """``dx = dy @ W`` for vector blocks, through the column-sorted index.

    grad_out: [M, R * bo]; values: [nnz, bo, 1]; col_ptr: [C + 1]; col_slots, row_idx, col_idx:
    [nnz]. Returns dx: [M, C].
    """
    name = "bsr_linear_vector_grad_input"
    check_operands(name, grad_out, values.shape[1:3], values, col_ptr, col_slots, row_idx, col_idx)
    weights = _vector_values(name, values)
    block_out, channels = weights.shape[1], col_ptr.shape[0] - 1
    if grad_out.shape[1] % block_out:
        raise ValueError(f"{name}: grad_out of shape {tuple(grad_out.shape)} is not a whole number of {block_out}-wide groups")
    grad_out = _rows_of_groups(grad_out, block_out)
    M = grad_out.shape[0]
    out = torch.empty(M, channels, device=grad_out.device, dtype=grad_out.dtype)
    if M == 0 or channels == 0:
        return out
    tiles = triton.cdiv(channels, GRAD_INPUT_CHANNELS)
    precision, upcast = precision_and_upcast(grad_out.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * tiles,)  # noqa: E731
    with on_device(grad_out):
        _bsr_vector_grad_input_kernel[grid](
            grad_out, weights, out,
            col_ptr, col_slots, row_idx, col_idx,
            M, triton.next_power_of_2(M), triton.next_power_of_2(weights.shape[0]), channels, tiles,
            grad_out.stride(0), grad_out.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_OUT=block_out, BLOCK_RED=max(block_out, 16), BLOCK_C=GRAD_INPUT_CHANNELS,
            UPCAST=upcast, PRECISION=precision,
        )
    return out


def bsr_linear_vector_grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    row_slots: torch.Tensor,
    col_idx: torch.Tensor,
    block_size: Tuple[int, int],
) -> torch.Tensor:
    """``dW[s] = dy[:, group(s)].T @ x[:, col(s)]`` at live vector blocks only.

    grad_out: [M, R * bo]; x: [M, C]; row_ptr: [R + 1]; row_slots, col_idx: [nnz].
    Returns grad values: [nnz, bo, 1] in ``x.dtype``.
    """
    name = "bsr_linear_vector_grad_weight"
    block_out = block_size[0]
    check_operands(name, x, block_size, grad_out, row_ptr, row_slots, col_idx)
    if grad_out.dim() != 2 or grad_out.shape[0] != x.shape[0] or grad_out.dtype != x.dtype:
        raise ValueError(f"{name}: grad_out {tuple(grad_out.shape)} {grad_out.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    nnz, M, groups = row_slots.shape[0], x.shape[0], row_ptr.shape[0] - 1
    if nnz == 0 or M == 0:
        return x.new_zeros(nnz, block_out, 1)
    grad_out = _rows_of_groups(grad_out, block_out)
    xt = k_major(x)
    block_s = vector_step(nnz, groups)
    chunks_per_group = triton.cdiv(x.shape[1], block_s)
    splits = reduction_splits(triton.cdiv(nnz, block_s), M, x.device)
    chunk = triton.cdiv(triton.cdiv(M, splits), 256) * 256  # a multiple of every BLOCK_M
    splits = triton.cdiv(M, chunk)
    partial = torch.empty(splits, nnz, block_out, device=x.device, dtype=torch.float32)
    precision, upcast = precision_and_upcast(x.dtype)
    with on_device(x):
        _bsr_vector_grad_weight_kernel[(groups * chunks_per_group, splits)](
            grad_out, xt, partial, row_ptr, row_slots, col_idx,
            M, triton.next_power_of_2(M), triton.next_power_of_2(nnz), chunk, chunks_per_group,
            grad_out.stride(0), grad_out.stride(1),
            xt.stride(0), xt.stride(1),
            *partial.stride(),
            BLOCK_OUT=block_out, BLOCK_S=block_s, UPCAST=upcast, PRECISION=precision,
        )
    # The chunks' sums, added in a fixed order (deterministic), in x's dtype.
    return partial.sum(0).to(x.dtype).unsqueeze(2)
