"""Triton kernels for the block-sparse linear layer, and their launchers.

Two kernels serve the three products of ``y = x @ W.T`` with ``W`` block-sparse:

* ``_bsr_dsd_kernel``: dense @ block-sparse. The forward (``x @ W.T``, walking the
  row-sorted index) and the grad-input (``dy @ W``, walking the column-sorted index) are
  the same loop with the roles of the block dimensions swapped; the value tile is read
  through strides, so values are never transposed in memory.
* ``_bsr_sdd_kernel``: the sampled product ``dW[slot] = dy[:, rows].T @ x[:, cols]``,
  computed at live blocks only.

All accumulate in fp32. Under the Triton interpreter bf16 tiles are upcast to fp32
before ``tl.dot`` (its bf16 ``tl.dot`` returns garbage in Triton 3.8 and 3.9).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..triton_common import (autotune_configs, check_operands, checked_bias, on_device, precision_and_upcast,
                             reduction_splits)

# --------------------------------------------------------------------------- kernels
@triton.autotune(
    configs=autotune_configs([(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (128, 8, 5), (256, 8, 4)]),
    key=["M_BUCKET", "NNZ_BUCKET", "NUM_N_TILES", "BLOCK_OUT", "BLOCK_RED", "HAS_BIAS", "PRECISION"],
)
@triton.jit
def _bsr_dsd_kernel(
    a_ptr, values_ptr, bias_ptr, out_ptr,
    block_ptr_ptr, block_slots_ptr, slot_block_idx_ptr,
    M, M_BUCKET, NNZ_BUCKET, NUM_N_TILES,
    stride_am, stride_ak,
    stride_vs, stride_vk, stride_vn,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_RED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = a @ B (+ bias), ``B`` block-sparse with blocks ``BLOCK_RED x BLOCK_OUT``.

    a: [M, Kb * BLOCK_RED]; out: [M, Nb * BLOCK_OUT]; bias: [Nb * BLOCK_OUT].
    Block-column ``j`` of ``B`` owns the slots ``block_slots[block_ptr[j]:block_ptr[j + 1]]``;
    slot ``s`` sits at block-row ``slot_block_idx[s]`` and its ``(k, n)`` element is at
    ``values + s * stride_vs + k * stride_vk + n * stride_vn``.
    One program computes a ``BLOCK_M x BLOCK_N`` tile of ``out``; an empty block-column
    still writes its tile (zeros, or the bias). ``M_BUCKET`` (the next power of two of
    ``M``) is only an autotune key, so that every new batch size does not re-tune; so is
    ``NNZ_BUCKET`` (of the live blocks), so that each density bucket gets its own config.
    """
    # Program -> (row tile, column tile); consecutive programs share the row tile of `a`,
    # so it stays in L2 while the (small) values are read by everybody.
    pid = tl.program_id(0)
    pid_m = pid // NUM_N_TILES
    pid_n = pid % NUM_N_TILES
    TILES_PER_BLOCK: tl.constexpr = BLOCK_OUT // BLOCK_N
    block_col = pid_n // TILES_PER_BLOCK
    n0 = (pid_n % TILES_PER_BLOCK) * BLOCK_N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am

    # One flat loop over (live block, k-chunk) pairs keeps the software pipeliner happy.
    K_STEPS: tl.constexpr = BLOCK_RED // BLOCK_K
    start = tl.load(block_ptr_ptr + block_col)
    end = tl.load(block_ptr_ptr + block_col + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(start * K_STEPS, end * K_STEPS):
        slot = tl.load(block_slots_ptr + step // K_STEPS).to(tl.int64)
        block_row = tl.load(slot_block_idx_ptr + slot).to(tl.int64)
        k_in_block = (step % K_STEPS) * BLOCK_K + offs_k
        k = block_row * BLOCK_RED + k_in_block
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=m_mask[:, None], other=0.0)
        b = tl.load(
            values_ptr + slot * stride_vs
            + k_in_block[:, None] * stride_vk + (n0 + offs_n)[None, :] * stride_vn
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    cols = block_col * BLOCK_OUT + n0 + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.autotune(
    configs=autotune_configs([(m, w, st) for m in (32, 64, 128) for w, st in ((4, 3), (4, 4), (8, 3))]),
    key=["M_BUCKET", "NNZ_BUCKET", "BLOCK_OUT", "BLOCK_IN", "TILE_O", "TILE_I", "PRECISION"],
)
@triton.jit
def _bsr_sdd_kernel(
    dy_ptr, x_ptr, partial_ptr, row_slots_ptr, row_idx_ptr, col_idx_ptr,
    M, M_BUCKET, NNZ_BUCKET, CHUNK,
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    stride_psplit, stride_ps, stride_po, stride_pi,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
    TILE_O: tl.constexpr, TILE_I: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """partial[split, s] = dy[m, rows(s)].T @ x[m, cols(s)] summed over the rows ``m`` of this
    split's chunk: the weight gradient sampled at live blocks, in fp32 partial sums.

    dy: [M, R * BLOCK_OUT]; x: [M, C * BLOCK_IN]; partial: fp32 [splits, nnz, BLOCK_OUT, BLOCK_IN].
    Axis 0 of the grid runs over (slot, tile): one program computes a ``TILE_O x TILE_I`` tile
    of one slot, in row-sorted slot order (``row_slots``) so that programs running together
    read the same columns of ``dy`` from L2, whatever order mask updates left the slots in.
    Axis 1 runs over chunks of ``CHUNK`` rows (:func:`~sparse_kernels.triton_common.reduction_splits`: at low
    density there are few slots, and without the split a few hundred programs would leave
    most SMs idle); the launcher adds the chunks' sums in a fixed order.

    Tiles: each ``BLOCK_M`` step loads ``(TILE_O + TILE_I) x BLOCK_M`` elements for
    ``2 x TILE_O x TILE_I x BLOCK_M`` FLOPs, so the arithmetic intensity is
    ``TILE_O TILE_I / (TILE_O + TILE_I)`` FLOP per byte of bf16: 32 at 64x64, 43 at 64x128,
    64 at 128x128. An H200 needs about 206 FLOP/byte from HBM (989 TFLOP/s bf16, 4.8 TB/s)
    and about 80 from L2, which ``dy`` and ``x`` mostly hit (every slot of a block-row reads
    the same ``dy`` columns): tiles as large as the block allows, up to 128x128
    (:func:`sdd_tiles`), come closest to the roof, and the split over rows restores the
    parallelism that larger tiles take away. ``M_BUCKET`` and ``NNZ_BUCKET`` (next powers of
    two of ``M`` and ``nnz``) are only autotune keys: the config is tuned per batch-size and
    density bucket, not once for all densities.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    TILES_O: tl.constexpr = BLOCK_OUT // TILE_O
    TILES_I: tl.constexpr = BLOCK_IN // TILE_I
    slot = tl.load(row_slots_ptr + pid // (TILES_O * TILES_I)).to(tl.int64)
    tile = pid % (TILES_O * TILES_I)
    o0 = (tile // TILES_I) * TILE_O
    i0 = (tile % TILES_I) * TILE_I

    block_row = tl.load(row_idx_ptr + slot).to(tl.int64)
    block_col = tl.load(col_idx_ptr + slot).to(tl.int64)
    offs_o = block_row * BLOCK_OUT + o0 + tl.arange(0, TILE_O)
    offs_i = block_col * BLOCK_IN + i0 + tl.arange(0, TILE_I)
    offs_m = tl.arange(0, BLOCK_M)

    m_start = split * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    acc = tl.zeros((TILE_O, TILE_I), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + offs_m
        m_mask = rows < m_end
        rows64 = rows.to(tl.int64)
        # dy tile read transposed: [TILE_O, BLOCK_M]
        a = tl.load(
            dy_ptr + rows64[None, :] * stride_dym + offs_o[:, None] * stride_dyn,
            mask=m_mask[None, :], other=0.0,
        )
        b = tl.load(
            x_ptr + rows64[:, None] * stride_xm + offs_i[None, :] * stride_xk,
            mask=m_mask[:, None], other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out_ptrs = (
        partial_ptr + split.to(tl.int64) * stride_psplit + slot * stride_ps
        + (o0 + tl.arange(0, TILE_O))[:, None] * stride_po
        + (i0 + tl.arange(0, TILE_I))[None, :] * stride_pi
    )
    tl.store(out_ptrs, acc)


def sdd_tiles(block_out: int, block_in: int, dtype: torch.dtype) -> Tuple[int, int]:
    """The grad-weight kernel's tile: as large as the block, up to 128x128 for 16-bit types
    and 64x64 for fp32 (whose operands take twice the shared memory); see the kernel's
    docstring for the roofline argument."""
    limit = 64 if dtype == torch.float32 else 128
    return min(block_out, limit), min(block_in, limit)


# --------------------------------------------------------------------------- launchers
def _dsd(
    name: str,
    a: torch.Tensor,
    values: torch.Tensor,
    block_ptr: torch.Tensor,
    block_slots: torch.Tensor,
    slot_block_idx: torch.Tensor,
    transpose_values: bool,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Launches ``_bsr_dsd_kernel``: ``a [M, Kb * red] @ B -> [M, Nb * out]``.

    ``B``'s blocks are ``values[s].T`` (``transpose_values``, the forward) or ``values[s]``
    (the grad-input); either way values are read in place through their strides.
    """
    check_operands(name, a, values.shape[1:3], values, block_ptr, block_slots, slot_block_idx)
    values = values.contiguous()
    block_rows, block_cols = values.shape[1], values.shape[2]
    block_out, block_red = (block_rows, block_cols) if transpose_values else (block_cols, block_rows)
    stride_out, stride_red = values.stride(1), values.stride(2)
    if not transpose_values:
        stride_out, stride_red = stride_red, stride_out
    num_block_cols = block_ptr.shape[0] - 1
    if a.shape[1] % block_red:
        raise ValueError(f"{name}: input of shape {tuple(a.shape)} is not a whole number of {block_red}-wide blocks")
    out_features = num_block_cols * block_out
    bias = checked_bias(name, bias, out_features, a.dtype)
    M = a.shape[0]
    out = torch.empty(M, out_features, device=a.device, dtype=a.dtype)
    if M == 0 or out_features == 0:
        return out
    block_n = min(block_out, 128)
    num_n_tiles = out_features // block_n
    precision, upcast = precision_and_upcast(a.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * num_n_tiles,)  # noqa: E731
    with on_device(a):
        _bsr_dsd_kernel[grid](
            a, values, bias if bias is not None else out, out,
            block_ptr, block_slots, slot_block_idx,
            M, triton.next_power_of_2(M), triton.next_power_of_2(values.shape[0]), num_n_tiles,
            a.stride(0), a.stride(1),
            values.stride(0), stride_red, stride_out,
            out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None,
            BLOCK_OUT=block_out, BLOCK_RED=block_red,
            BLOCK_N=block_n, BLOCK_K=min(block_red, 64),
            UPCAST=upcast, PRECISION=precision,
        )
    return out


def bsr_linear_fwd(
    x: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    row_slots: torch.Tensor,
    col_idx: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` through the row-sorted index.

    x: [M, C * bi]; values: [nnz, bo, bi]; row_ptr: [R + 1]; row_slots, col_idx: [nnz];
    bias: [R * bo] or None. Returns y: [M, R * bo] in ``x.dtype``.
    """
    return _dsd("bsr_linear_fwd", x, values, row_ptr, row_slots, col_idx, transpose_values=True, bias=bias)


def bsr_linear_grad_input(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    col_ptr: torch.Tensor,
    col_slots: torch.Tensor,
    row_idx: torch.Tensor,
) -> torch.Tensor:
    """``dx = dy @ W`` through the column-sorted index.

    grad_out: [M, R * bo]; values: [nnz, bo, bi]; col_ptr: [C + 1]; col_slots, row_idx: [nnz].
    Returns dx: [M, C * bi].
    """
    return _dsd(
        "bsr_linear_grad_input", grad_out, values, col_ptr, col_slots, row_idx, transpose_values=False, bias=None
    )


def bsr_linear_grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    row_idx: torch.Tensor,
    col_idx: torch.Tensor,
    row_slots: torch.Tensor,
    block_size: Tuple[int, int],
) -> torch.Tensor:
    """``dW[s] = dy[:, rows(s)].T @ x[:, cols(s)]`` at live blocks only.

    grad_out: [M, R * bo]; x: [M, C * bi]; row_idx, col_idx, row_slots: [nnz].
    Returns grad values: [nnz, bo, bi] in ``x.dtype``.
    """
    block_out, block_in = block_size
    check_operands("bsr_linear_grad_weight", x, block_size, grad_out, row_idx, col_idx, row_slots)
    grad_values = torch.empty(row_idx.shape[0], block_out, block_in, device=x.device, dtype=x.dtype)
    if grad_out.dim() != 2 or grad_out.shape[0] != x.shape[0] or grad_out.dtype != x.dtype:
        raise ValueError(
            f"bsr_linear_grad_weight: grad_out {tuple(grad_out.shape)} {grad_out.dtype} does not "
            f"match x {tuple(x.shape)} {x.dtype}"
        )
    nnz, M = row_idx.shape[0], x.shape[0]
    if nnz == 0:
        return grad_values
    if M == 0:
        return grad_values.zero_()
    tile_o, tile_i = sdd_tiles(block_out, block_in, x.dtype)
    base_programs = nnz * (block_out // tile_o) * (block_in // tile_i)
    splits = reduction_splits(base_programs, M, x.device)
    chunk = triton.cdiv(triton.cdiv(M, splits), 256) * 256  # a multiple of every BLOCK_M
    splits = triton.cdiv(M, chunk)
    partial = torch.empty(splits, nnz, block_out, block_in, device=x.device, dtype=torch.float32)
    precision, upcast = precision_and_upcast(x.dtype)
    with on_device(x):
        _bsr_sdd_kernel[(base_programs, splits)](
            grad_out, x, partial, row_slots, row_idx, col_idx,
            M, triton.next_power_of_2(M), triton.next_power_of_2(nnz), chunk,
            grad_out.stride(0), grad_out.stride(1),
            x.stride(0), x.stride(1),
            *partial.stride(),
            BLOCK_OUT=block_out, BLOCK_IN=block_in, TILE_O=tile_o, TILE_I=tile_i,
            UPCAST=upcast, PRECISION=precision,
        )
    # The chunks' sums, added in a fixed order (deterministic), in grad_values' dtype.
    return grad_values.copy_(partial.sum(0))
