"""Triton implicit-GEMM kernels for the block-sparse conv2d, and their launchers.

The GEMM view of ``y = conv2d(x, W)``: rows are output pixels ``(n, oh, ow)``, columns
are output channels, and the reduction runs over (input channel, tap). No im2col buffer
is made: each tile of ``x`` is gathered from the shifted pixels of one tap.

* ``_bsr_conv2d_dsd_kernel``: dense pixels @ block-sparse weight. The forward walks the
  row-sorted index; the grad-input (a transposed convolution) walks the column-sorted one,
  each input pixel gathering the output pixels that read it, which handles stride and
  dilation without scattering.
* ``_bsr_conv2d_sdd_kernel``: the weight gradient at live blocks only, per tap, reducing
  over batch and pixels; the pixels are split across programs when there are few blocks,
  and the fp32 partial sums are added afterwards (deterministic, no atomics).

Activations are read through their strides; the launchers pass channels-last copies
(the channel is the reduction axis, so its loads are then contiguous). Values are passed
as ``[nnz, kh, kw, bo, bi]`` so a tap's block is contiguous.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..shapes import conv_output_size
from ..triton_common import (autotune_configs, check_operands, checked_bias, on_device, precision_and_upcast,
                             reduction_splits)

Pair = Tuple[int, int]


# --------------------------------------------------------------------------- kernels
@triton.autotune(
    configs=autotune_configs([(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3)]),
    key=["M_BUCKET", "NNZ_BUCKET", "NUM_N_TILES", "BLOCK_OUT", "BLOCK_RED", "KH", "KW", "TRANSPOSED", "HAS_BIAS",
         "PRECISION"],
)
@triton.jit
def _bsr_conv2d_dsd_kernel(
    src_ptr, values_ptr, bias_ptr, out_ptr,
    block_ptr_ptr, block_slots_ptr, slot_block_idx_ptr,
    M, M_BUCKET, NNZ_BUCKET, NUM_N_TILES,
    OUT_H, OUT_W, SRC_H, SRC_W,
    stride_sn, stride_sc, stride_sh, stride_sw,
    stride_vs, stride_vr, stride_vt, stride_vk, stride_vn,
    stride_on, stride_oc, stride_oh, stride_ow,
    pad_h, pad_w, dil_h, dil_w,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_RED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[n, :, h, w] = sum over live blocks and taps of src pixels @ value tiles (+ bias).

    src: [N, Cs, SRC_H, SRC_W]; out: [N, Co, OUT_H, OUT_W]; M = N * OUT_H * OUT_W.
    Block-column ``j`` (output channels ``j * BLOCK_OUT ...``) owns the slots
    ``block_slots[block_ptr[j]:block_ptr[j + 1]]``; slot ``s`` reads source channels
    ``slot_block_idx[s] * BLOCK_RED ...`` and its tap ``(r, t)`` element ``(k, n)`` is at
    ``values + s*stride_vs + r*stride_vr + t*stride_vt + k*stride_vk + n*stride_vn``.
    Forward (``TRANSPOSED=False``): out pixel ``h`` reads src row ``h*STRIDE_H - pad_h + r*dil_h``.
    Grad-input (``TRANSPOSED=True``): out pixel ``h`` (an input pixel) reads the src row
    (an output pixel) ``(h + pad_h - r*dil_h) / STRIDE_H`` when that divides exactly.
    The strides are compile-time constants (divisions by them become shifts); ``M_BUCKET``
    is only an autotune key.
    """
    pid = tl.program_id(0)
    pid_m = pid // NUM_N_TILES
    pid_n = pid % NUM_N_TILES
    TILES_PER_BLOCK: tl.constexpr = BLOCK_OUT // BLOCK_N
    block_col = pid_n // TILES_PER_BLOCK
    n0 = (pid_n % TILES_PER_BLOCK) * BLOCK_N

    # Output pixel -> (image, row, column).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    image = offs_m // (OUT_H * OUT_W)
    pixel = offs_m % (OUT_H * OUT_W)
    out_h = pixel // OUT_W
    out_w = pixel % OUT_W
    src_images = src_ptr + image.to(tl.int64) * stride_sn
    # The source row/column of tap (0, 0); each tap adds (or, transposed, subtracts) r * dil.
    if TRANSPOSED:
        base_h = out_h + pad_h
        base_w = out_w + pad_w
    else:
        base_h = out_h * STRIDE_H - pad_h
        base_w = out_w * STRIDE_W - pad_w
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    # One flat loop over (live block, tap, k-chunk).
    K_STEPS: tl.constexpr = BLOCK_RED // BLOCK_K
    STEPS_PER_BLOCK: tl.constexpr = KH * KW * K_STEPS
    start = tl.load(block_ptr_ptr + block_col)
    end = tl.load(block_ptr_ptr + block_col + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(start * STEPS_PER_BLOCK, end * STEPS_PER_BLOCK):
        slot = tl.load(block_slots_ptr + step // STEPS_PER_BLOCK).to(tl.int64)
        block_row = tl.load(slot_block_idx_ptr + slot).to(tl.int64)
        tap = (step % STEPS_PER_BLOCK) // K_STEPS
        r = tap // KW
        t = tap % KW
        if TRANSPOSED:
            # Divide non-negative numerators only: the same in C and in the interpreter.
            num_h = base_h - r * dil_h
            num_w = base_w - t * dil_w
            num_h_pos = tl.maximum(num_h, 0)
            num_w_pos = tl.maximum(num_w, 0)
            src_h = num_h_pos // STRIDE_H
            src_w = num_w_pos // STRIDE_W
            valid = (num_h >= 0) & (num_w >= 0) & (num_h_pos % STRIDE_H == 0) & (num_w_pos % STRIDE_W == 0)
            valid = valid & (src_h < SRC_H) & (src_w < SRC_W)
        else:
            src_h = base_h + r * dil_h
            src_w = base_w + t * dil_w
            valid = (src_h >= 0) & (src_h < SRC_H) & (src_w >= 0) & (src_w < SRC_W)
        valid = valid & m_mask
        k_in_block = (step % K_STEPS) * BLOCK_K + offs_k
        channels = block_row * BLOCK_RED + k_in_block
        src_pixels = src_images + src_h.to(tl.int64) * stride_sh + src_w.to(tl.int64) * stride_sw
        a = tl.load(src_pixels[:, None] + channels[None, :] * stride_sc, mask=valid[:, None], other=0.0)
        b = tl.load(
            values_ptr + slot * stride_vs + r * stride_vr + t * stride_vt
            + k_in_block[:, None] * stride_vk + (n0 + offs_n)[None, :] * stride_vn
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    cols = block_col * BLOCK_OUT + n0 + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_pixels = (
        out_ptr + image.to(tl.int64) * stride_on
        + out_h.to(tl.int64) * stride_oh + out_w.to(tl.int64) * stride_ow
    )
    out_ptrs = out_pixels[:, None] + cols.to(tl.int64)[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.autotune(
    configs=autotune_configs([(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 3)]),
    key=["M_BUCKET", "NNZ_BUCKET", "BLOCK_OUT", "BLOCK_IN", "KH", "KW", "PRECISION"],
)
@triton.jit
def _bsr_conv2d_sdd_kernel(
    dy_ptr, x_ptr, partial_ptr, row_slots_ptr, row_idx_ptr, col_idx_ptr,
    M, M_BUCKET, NNZ_BUCKET, CHUNK,
    OUT_H, OUT_W, IN_H, IN_W,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_psplit, stride_pslot, stride_pr, stride_pt, stride_po, stride_pi,
    pad_h, pad_w, dil_h, dil_w,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
    TILE_O: tl.constexpr, TILE_I: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """partial[split, s, r, t] = sum over output pixels m in this split's chunk of
    dy[m, rows(s)].T @ x[shifted m by tap (r, t), cols(s)].

    dy: [N, R * BLOCK_OUT, OUT_H, OUT_W]; x: [N, C * BLOCK_IN, IN_H, IN_W];
    partial: fp32 [splits, nnz, KH, KW, BLOCK_OUT, BLOCK_IN]. Axis 0 of the grid runs
    over (slot in row-sorted order, tap, tile); axis 1 over chunks of ``CHUNK`` pixels.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    TILES_O: tl.constexpr = BLOCK_OUT // TILE_O
    TILES_I: tl.constexpr = BLOCK_IN // TILE_I
    PER_SLOT: tl.constexpr = KH * KW * TILES_O * TILES_I
    slot = tl.load(row_slots_ptr + pid // PER_SLOT).to(tl.int64)
    rest = pid % PER_SLOT
    tap = rest // (TILES_O * TILES_I)
    tile = rest % (TILES_O * TILES_I)
    r = tap // KW
    t = tap % KW
    o0 = (tile // TILES_I) * TILE_O
    i0 = (tile % TILES_I) * TILE_I

    block_row = tl.load(row_idx_ptr + slot).to(tl.int64)
    block_col = tl.load(col_idx_ptr + slot).to(tl.int64)
    out_channels = block_row * BLOCK_OUT + o0 + tl.arange(0, TILE_O)
    in_channels = block_col * BLOCK_IN + i0 + tl.arange(0, TILE_I)

    m_start = split * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    acc = tl.zeros((TILE_O, TILE_I), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        image = (offs_m // (OUT_H * OUT_W)).to(tl.int64)
        pixel = offs_m % (OUT_H * OUT_W)
        out_h = pixel // OUT_W
        out_w = pixel % OUT_W
        in_h = out_h * STRIDE_H + (r * dil_h - pad_h)
        in_w = out_w * STRIDE_W + (t * dil_w - pad_w)
        valid = m_mask & (in_h >= 0) & (in_h < IN_H) & (in_w >= 0) & (in_w < IN_W)
        dy_pixels = dy_ptr + image * stride_dyn + out_h.to(tl.int64) * stride_dyh + out_w.to(tl.int64) * stride_dyw
        x_pixels = x_ptr + image * stride_xn + in_h.to(tl.int64) * stride_xh + in_w.to(tl.int64) * stride_xw
        # dy tile read transposed: [TILE_O, BLOCK_M]
        a = tl.load(dy_pixels[None, :] + out_channels[:, None] * stride_dyc, mask=m_mask[None, :], other=0.0)
        b = tl.load(x_pixels[:, None] + in_channels[None, :] * stride_xc, mask=valid[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out_ptrs = (
        partial_ptr + split.to(tl.int64) * stride_psplit + slot * stride_pslot + r * stride_pr + t * stride_pt
        + (o0 + tl.arange(0, TILE_O))[:, None] * stride_po + (i0 + tl.arange(0, TILE_I))[None, :] * stride_pi
    )
    tl.store(out_ptrs, acc)


# --------------------------------------------------------------------------- launchers
def _tap_major(values: torch.Tensor) -> torch.Tensor:
    """``[nnz, bo, bi, kh, kw] -> [nnz, kh, kw, bo, bi]``, contiguous (a small copy)."""
    return values.permute(0, 3, 4, 1, 2).contiguous()


def _conv2d_dsd(
    name: str,
    src: torch.Tensor,
    values: torch.Tensor,
    block_ptr: torch.Tensor,
    block_slots: torch.Tensor,
    slot_block_idx: torch.Tensor,
    out_hw: Pair,
    transposed: bool,
    bias: Optional[torch.Tensor],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> torch.Tensor:
    """Launches ``_bsr_conv2d_dsd_kernel``; returns ``[N, Nb * block_out, *out_hw]`` channels-last."""
    check_operands(name, src, values.shape[1:3], values, block_ptr, block_slots, slot_block_idx, dense_dims=4)
    nnz, bo, bi, kh, kw = values.shape
    block_out, block_red = (bi, bo) if transposed else (bo, bi)
    num_block_cols = block_ptr.shape[0] - 1
    if src.shape[1] % block_red:
        raise ValueError(f"{name}: input of shape {tuple(src.shape)} is not a whole number of {block_red}-channel blocks")
    out_channels = num_block_cols * block_out
    bias = checked_bias(name, bias, out_channels, src.dtype)
    batch = src.shape[0]
    out = torch.empty(
        batch, out_channels, *out_hw, device=src.device, dtype=src.dtype, memory_format=torch.channels_last
    )
    M = batch * out_hw[0] * out_hw[1]
    if M == 0 or out_channels == 0:
        return out
    src = src.contiguous(memory_format=torch.channels_last)
    weights = _tap_major(values)  # [nnz, kh, kw, bo, bi]
    stride_vo, stride_vi = weights.stride(3), weights.stride(4)
    stride_vk, stride_vn = (stride_vo, stride_vi) if transposed else (stride_vi, stride_vo)
    block_n = min(block_out, 128)
    num_n_tiles = out_channels // block_n
    precision, upcast = precision_and_upcast(src.dtype, conv=True)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * num_n_tiles,)  # noqa: E731
    with on_device(src):
        _bsr_conv2d_dsd_kernel[grid](
            src, weights, bias if bias is not None else out, out,
            block_ptr, block_slots, slot_block_idx,
            M, triton.next_power_of_2(M), triton.next_power_of_2(values.shape[0]), num_n_tiles,
            out_hw[0], out_hw[1], src.shape[2], src.shape[3],
            *src.stride(),
            weights.stride(0), weights.stride(1), weights.stride(2), stride_vk, stride_vn,
            *out.stride(),
            *padding, *dilation,
            STRIDE_H=stride[0], STRIDE_W=stride[1],
            KH=kh, KW=kw, TRANSPOSED=transposed, HAS_BIAS=bias is not None,
            BLOCK_OUT=block_out, BLOCK_RED=block_red,
            BLOCK_N=block_n, BLOCK_K=min(block_red, 64),
            UPCAST=upcast, PRECISION=precision,
        )
    return out


def bsr_conv2d_fwd(
    x: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    row_slots: torch.Tensor,
    col_idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> torch.Tensor:
    """``y = conv2d(x, W) + bias`` through the row-sorted index.

    x: [N, C * bi, H, W]; values: [nnz, bo, bi, kh, kw]; bias: [R * bo] or None.
    Returns y: [N, R * bo, OH, OW], channels-last.
    """
    kh, kw = values.shape[3], values.shape[4]
    out_hw = (
        conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0]),
        conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1]),
    )
    return _conv2d_dsd(
        "bsr_conv2d_fwd", x, values, row_ptr, row_slots, col_idx, out_hw, False, bias, stride, padding, dilation
    )


def bsr_conv2d_grad_input(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    col_ptr: torch.Tensor,
    col_slots: torch.Tensor,
    row_idx: torch.Tensor,
    input_hw: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> torch.Tensor:
    """``dx``: the transposed convolution of ``dy`` over live blocks, column-sorted index.

    grad_out: [N, R * bo, OH, OW]; returns dx: [N, C * bi, *input_hw], channels-last.
    """
    return _conv2d_dsd(
        "bsr_conv2d_grad_input", grad_out, values, col_ptr, col_slots, row_idx,
        tuple(input_hw), True, None, stride, padding, dilation,
    )


def bsr_conv2d_grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    row_idx: torch.Tensor,
    col_idx: torch.Tensor,
    row_slots: torch.Tensor,
    block_shape: Sequence[int],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> torch.Tensor:
    """Weight gradient at live blocks: ``[nnz, bo, bi, kh, kw]`` in ``x.dtype``.

    grad_out: [N, R * bo, OH, OW]; x: [N, C * bi, H, W]; block_shape: (bo, bi, kh, kw).
    """
    bo, bi, kh, kw = block_shape
    nnz = row_idx.shape[0]
    check_operands("bsr_conv2d_grad_weight", x, (bo, bi), grad_out, row_idx, col_idx, row_slots, dense_dims=4)
    if grad_out.dim() != 4 or grad_out.shape[0] != x.shape[0]:
        raise ValueError(
            f"bsr_conv2d_grad_weight: grad_out {tuple(grad_out.shape)} does not match x {tuple(x.shape)}"
        )
    batch, _, out_h, out_w = grad_out.shape
    M = batch * out_h * out_w
    if nnz == 0 or M == 0:
        return x.new_zeros(nnz, bo, bi, kh, kw)
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    tile_o, tile_i = min(bo, 64), min(bi, 64)
    base_programs = nnz * kh * kw * (bo // tile_o) * (bi // tile_i)
    splits = reduction_splits(base_programs, M, x.device)
    chunk = triton.cdiv(triton.cdiv(M, splits), 256) * 256  # a multiple of every BLOCK_M
    splits = triton.cdiv(M, chunk)
    partial = torch.empty(splits, nnz, kh, kw, bo, bi, device=x.device, dtype=torch.float32)
    precision, upcast = precision_and_upcast(x.dtype, conv=True)
    with on_device(x):
        _bsr_conv2d_sdd_kernel[(base_programs, splits)](
            grad_out, x, partial, row_slots, row_idx, col_idx,
            M, triton.next_power_of_2(M), triton.next_power_of_2(nnz), chunk,
            out_h, out_w, x.shape[2], x.shape[3],
            *grad_out.stride(), *x.stride(), *partial.stride(),
            *padding, *dilation,
            STRIDE_H=stride[0], STRIDE_W=stride[1], KH=kh, KW=kw, BLOCK_OUT=bo, BLOCK_IN=bi, TILE_O=tile_o, TILE_I=tile_i,
            UPCAST=upcast, PRECISION=precision,
        )
    return partial.sum(0).permute(0, 3, 4, 1, 2).to(x.dtype).contiguous()
