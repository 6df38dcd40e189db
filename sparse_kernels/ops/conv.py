"""``bsr_conv2d``: the public op, its ``torch.library`` registration, autograd and dispatch.

Three custom ops, each with a fake implementation:

* ``sparse_kernels::bsr_conv2d``             y  = conv2d(x, W) + bias   (differentiable)
* ``sparse_kernels::bsr_conv2d_grad_input``  dx = conv_transpose2d(dy, W)
* ``sparse_kernels::bsr_conv2d_grad_weight`` dW = the weight gradient at live blocks

A weight ``[Cout, Cin, kh, kw]`` is block-sparse over channel blocks: the layout is
``[Cout / bo, Cin / bi]`` and a live block holds all taps, ``values [nnz, bo, bi, kh, kw]``.
1x1 convolutions with stride 1 and no padding run on the linear ops (on CPU, for channels-last
inputs only).

Outputs follow the memory format of the op's first input, as ``F.conv2d`` does: a
channels-last input gives a channels-last output (the fast path on a GPU), anything
else a contiguous one.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..layout import BlockSparseLayout, check_values
from ..reference import (
    bsr_conv2d_grad_input_reference,
    bsr_conv2d_grad_weight_reference,
    bsr_conv2d_reference,
)
from .common import (
    autocast_operands,
    backend_for,
    check_activation,
    check_bias,
    check_features,
    conv_output_size,
    launchers,
    layout_of,
)
from .linear import bsr_linear

IntPair = Union[int, Sequence[int]]


def _memory_format(t: Tensor) -> torch.memory_format:
    """channels-last if ``t`` is stored so (and not also plainly contiguous), else contiguous."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------- forward op
@torch.library.custom_op("sparse_kernels::bsr_conv2d", mutates_args=())
def _bsr_conv2d_op(
    x: Tensor,
    values: Tensor,
    bias: Optional[Tensor],
    index: List[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tensor:
    block_size = values.shape[1:3]
    check_features("bsr_conv2d", "x", x, index, block_size[1], "in")
    backend = backend_for(x, block_size)
    if backend != "reference":
        row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index
        y = launchers(backend, "conv").bsr_conv2d_fwd(x, values, row_ptr, row_slots, col_idx, bias, stride, padding,
                                                      dilation)
    else:
        y = bsr_conv2d_reference(x, values, layout_of(block_size, index), bias, stride, padding, dilation)
    return y.contiguous(memory_format=_memory_format(x))


@_bsr_conv2d_op.register_fake
def _(x, values, bias, index, stride, padding, dilation):
    kh, kw = values.shape[3], values.shape[4]
    out_h = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    out_channels = (index[2].shape[0] - 1) * values.shape[1]
    return x.new_empty(x.shape[0], out_channels, out_h, out_w).contiguous(memory_format=_memory_format(x))


# --------------------------------------------------------------------------- backward ops
@torch.library.custom_op("sparse_kernels::bsr_conv2d_grad_input", mutates_args=())
def _bsr_conv2d_grad_input_op(
    grad_out: Tensor,
    values: Tensor,
    index: List[Tensor],
    input_hw: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tensor:
    block_size = values.shape[1:3]
    check_features("bsr_conv2d_grad_input", "grad_out", grad_out, index, block_size[0], "out")
    backend = backend_for(grad_out, block_size)
    if backend != "reference":
        row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index
        dx = launchers(backend, "conv").bsr_conv2d_grad_input(
            grad_out, values, col_ptr, col_slots, row_idx, input_hw, stride, padding, dilation
        )
    else:
        layout = layout_of(block_size, index)
        input_shape = (grad_out.shape[0], layout.shape[1], *input_hw)
        dx = bsr_conv2d_grad_input_reference(grad_out, values, layout, input_shape, stride, padding, dilation)
    return dx.contiguous(memory_format=_memory_format(grad_out))


@_bsr_conv2d_grad_input_op.register_fake
def _(grad_out, values, index, input_hw, stride, padding, dilation):
    in_channels = (index[4].shape[0] - 1) * values.shape[2]
    dx = grad_out.new_empty(grad_out.shape[0], in_channels, *input_hw)
    return dx.contiguous(memory_format=_memory_format(grad_out))


@torch.library.custom_op("sparse_kernels::bsr_conv2d_grad_weight", mutates_args=())
def _bsr_conv2d_grad_weight_op(
    grad_out: Tensor,
    x: Tensor,
    index: List[Tensor],
    block_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tensor:
    block_size = block_shape[:2]
    check_features("bsr_conv2d_grad_weight", "grad_out", grad_out, index, block_size[0], "out")
    check_features("bsr_conv2d_grad_weight", "x", x, index, block_size[1], "in")
    backend = backend_for(x, block_size)
    if backend != "reference":
        row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index
        order = row_slots if backend == "triton" else col_slots  # as for linear
        return launchers(backend, "conv").bsr_conv2d_grad_weight(
            grad_out, x, row_idx, col_idx, order, block_shape, stride, padding, dilation
        )
    layout = layout_of(block_size, index)
    return bsr_conv2d_grad_weight_reference(
        grad_out, x, layout, block_shape[2:], stride, padding, dilation
    ).contiguous()


@_bsr_conv2d_grad_weight_op.register_fake
def _(grad_out, x, index, block_shape, stride, padding, dilation):
    return x.new_empty(index[0].shape[0], *block_shape)


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, values, bias, index, stride, padding, dilation = inputs
    ctx.save_for_backward(x, values, *index)
    ctx.has_bias = bias is not None
    ctx.conv = (stride, padding, dilation)


def _backward(ctx, grad_out):
    # grad_out arrives strided like y, i.e. in x's memory format (autograd restrides it).
    x, values, *index = ctx.saved_tensors
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _bsr_conv2d_grad_input_op(grad_out, values, index, list(x.shape[2:]), *ctx.conv)
    if ctx.needs_input_grad[1]:
        grad_values = _bsr_conv2d_grad_weight_op(grad_out, x, index, list(values.shape[1:]), *ctx.conv)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        accumulate = torch.promote_types(grad_out.dtype, torch.float32)
        grad_bias = grad_out.sum((0, 2, 3), dtype=accumulate).to(grad_out.dtype)
    return grad_x, grad_values, grad_bias, [None] * len(index), None, None, None


_bsr_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public op
def _pair(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if (
        pair is None or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)
    ):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair


def explicit_padding(padding, kernel: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int]:
    """Explicit ``(pad_h, pad_w)`` from an int, a pair, ``"valid"`` or ``"same"``."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(total % 2 for total in totals):
            raise ValueError(
                f"padding='same' with kernel {kernel} and dilation {dilation} needs uneven padding, "
                f"which bsr_conv2d does not do; pad the input with F.pad instead"
            )
        return (totals[0] // 2, totals[1] // 2)
    return _pair("padding", padding, 0)


def bsr_conv2d(
    x: Tensor,
    values: Tensor,
    layout: BlockSparseLayout,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: Union[IntPair, str] = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """Block-sparse conv2d: ``F.conv2d(x, to_dense(values, layout), bias, stride, padding, dilation)``.

    Args:
        x: ``[N, Cin, H, W]`` (or unbatched ``[Cin, H, W]``), ``Cin == layout.shape[1]``.
        values: ``[nnz, bo, bi, kh, kw]``, the live channel blocks with all their taps.
        layout: the :class:`BlockSparseLayout` over channel blocks ``[Cout / bo, Cin / bi]``.
        bias: ``[Cout]`` or ``None``.
        stride, dilation: int or pair, >= 1. padding: int or pair >= 0, ``"valid"``, or
            ``"same"`` (stride 1, even total padding only).
        groups: must be 1; grouped convolutions are refused.
    Returns:
        ``[N, Cout, OH, OW]`` (or ``[Cout, OH, OW]``), differentiable in ``x``, ``values``
        and ``bias``; channels-last when ``x`` is. Under ``torch.autocast`` the operands
        run in its dtype.
    """
    if groups != 1:
        raise ValueError(f"bsr_conv2d supports groups=1 only, got groups={groups!r}")
    x, values, bias = autocast_operands(x, values, bias)
    if isinstance(values, Tensor) and values.dim() != 5:
        raise ValueError(f"values must be [nnz, bo, bi, kh, kw], got shape {tuple(values.shape)}")
    check_values(values, layout, taps=2)
    check_activation("x", x, values)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    out_channels, in_channels = layout.shape
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"x has {x.shape[1]} channels but the layout covers {in_channels} "
            f"({layout.grid[1]} blocks of {layout.block_size[1]}); x has shape {tuple(x.shape)}"
        )
    kernel = (values.shape[3], values.shape[4])
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    padding = explicit_padding(padding, kernel, stride, dilation)
    out_hw = [conv_output_size(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(2)]
    if min(out_hw) <= 0:
        raise ValueError(
            f"input of spatial size {tuple(x.shape[2:])} is too small for kernel {kernel} with "
            f"padding {padding} and dilation {dilation}"
        )
    check_bias(bias, out_channels, x)
    # A 1x1 convolution is a linear layer over channels-last pixels. An NCHW input on CPU
    # stays on the conv ops instead: their tiled transposes beat torch's permuting copy.
    pointwise = kernel == (1, 1) and stride == (1, 1) and padding == (0, 0)
    if pointwise and (x.is_cuda or _memory_format(x) == torch.channels_last):
        y = _pointwise(x, values, layout, bias)
    else:
        y = _bsr_conv2d_op(x, values, bias, list(layout.tensors()), list(stride), list(padding), list(dilation))
    return y.squeeze(0) if unbatched else y


def _pointwise(x: Tensor, values: Tensor, layout: BlockSparseLayout, bias: Optional[Tensor]) -> Tensor:
    """A 1x1 convolution as a block-sparse linear over the pixels (channels-last rows)."""
    batch, channels, height, width = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, channels)
    y = bsr_linear(rows, values.reshape(values.shape[:3]), layout, bias)
    y = y.view(batch, height, width, -1).permute(0, 3, 1, 2)
    return y.contiguous(memory_format=_memory_format(x))
