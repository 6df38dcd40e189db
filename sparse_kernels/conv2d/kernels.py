"""The kernels of the conv2d ops that Python registers: fake, Triton (CUDA) and reference kernels,
each with its op's signature, and :func:`cuda_kernels`; :mod:`sparse_kernels.registry` registers them.

The ops (schemas in csrc/ops.cpp, routed by torch's dispatcher):

* ``sparse_kernels::bsr_conv2d``             y  = conv2d(x, W) + bias   (differentiable:
  Autograd and Autocast kernels in csrc/autograd.cpp)
* ``sparse_kernels::bsr_conv2d_grad_input``  dx = conv_transpose2d(dy, W)
* ``sparse_kernels::bsr_conv2d_grad_weight`` dW = the weight gradient at live blocks

A weight ``[Cout, Cin, kh, kw]`` is block-sparse over channel blocks: the layout is
``[Cout / bo, Cin / bi]`` and a live block holds all taps, ``values [nnz, bo, bi, kh, kw]``.
Outputs are channels-last when the input is (or, for the forward, when ``channels_last`` is
set, as ``F.conv2d`` gives for a channels-last weight), contiguous otherwise. Kernels: C++ for
CPU (csrc/cpu/conv2d.cpp); here: Triton for CUDA (1x1 convolutions on the linear kernels; the
reference where Triton cannot take a case), the fake kernels, and the pure-torch references by
name (:data:`REFERENCE_KERNELS`, for the reference override).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor

from ..capability import is_vector_block, triton_takes
from ..checks import check_features, layout_of, memory_format
from ..shapes import conv_output_size
from .reference import bsr_conv2d_grad_input_reference, bsr_conv2d_grad_weight_reference, bsr_conv2d_reference


# --------------------------------------------------------------------------- fake kernels
def _output_format(x: Tensor, channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else memory_format(x)


def _forward_fake(x, values, bias, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, stride, padding,
                  dilation, channels_last=False):
    kh, kw = values.shape[3], values.shape[4]
    out_h = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    out_channels = (row_ptr.shape[0] - 1) * values.shape[1]
    return x.new_empty(x.shape[0], out_channels, out_h, out_w).contiguous(memory_format=_output_format(x, channels_last))


def _grad_input_fake(grad_out, values, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, input_size, stride,
                     padding, dilation):
    in_channels = (col_ptr.shape[0] - 1) * values.shape[2]
    dx = grad_out.new_empty(grad_out.shape[0], in_channels, *input_size)
    return dx.contiguous(memory_format=memory_format(grad_out))


def _grad_weight_fake(grad_out, x, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, block_shape, stride,
                      padding, dilation):
    return x.new_empty(row_idx.shape[0], *block_shape)


FAKE_KERNELS: Dict[str, Callable] = {
    "bsr_conv2d": _forward_fake,
    "bsr_conv2d_grad_input": _grad_input_fake,
    "bsr_conv2d_grad_weight": _grad_weight_fake,
}


# --------------------------------------------------------------------------- reference kernels
def _forward_reference(x, values, bias, *index_and_conv):
    *index, stride, padding, dilation = index_and_conv[:9]
    channels_last = bool(index_and_conv[9]) if len(index_and_conv) > 9 else False
    layout = layout_of(values.shape[1:3], index)
    check_features("bsr_conv2d", "x", x, layout.shape[1], dim=1)
    y = bsr_conv2d_reference(x, values, layout, bias, stride, padding, dilation)
    return y.contiguous(memory_format=_output_format(x, channels_last))


def _grad_input_reference(grad_out, values, *index_and_conv):
    *index, input_size, stride, padding, dilation = index_and_conv
    layout = layout_of(values.shape[1:3], index)
    check_features("bsr_conv2d_grad_input", "grad_out", grad_out, layout.shape[0], dim=1)
    input_shape = (grad_out.shape[0], layout.shape[1], *input_size)
    dx = bsr_conv2d_grad_input_reference(grad_out, values, layout, input_shape, stride, padding, dilation)
    return dx.contiguous(memory_format=memory_format(grad_out))


def _grad_weight_reference(grad_out, x, *index_and_conv):
    *index, block_shape, stride, padding, dilation = index_and_conv
    layout = layout_of(block_shape[:2], index)
    check_features("bsr_conv2d_grad_weight", "grad_out", grad_out, layout.shape[0], dim=1)
    check_features("bsr_conv2d_grad_weight", "x", x, layout.shape[1], dim=1)
    return bsr_conv2d_grad_weight_reference(grad_out, x, layout, block_shape[2:], stride, padding, dilation).contiguous()


REFERENCE_KERNELS: Dict[str, Callable] = {
    "bsr_conv2d": _forward_reference,
    "bsr_conv2d_grad_input": _grad_input_reference,
    "bsr_conv2d_grad_weight": _grad_weight_reference,
}


# --------------------------------------------------------------------------- Triton kernels
def _pointwise(kernel, stride, padding) -> bool:
    """A 1x1 convolution without stride or padding: a linear layer over the pixels."""
    return tuple(kernel) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def _pixels(t: Tensor) -> Tensor:
    """``[N, C, H, W] -> [N * H * W, C]`` (a view of a channels-last tensor)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _image(rows: Tensor, like: Tensor) -> Tensor:
    """``[N * H * W, C] -> [N, C, H, W]``, channels-last, with ``like``'s batch and size."""
    return rows.view(like.shape[0], like.shape[2], like.shape[3], -1).permute(0, 3, 1, 2)


def triton_op_kernels(strict: bool) -> Dict[str, Callable]:
    """The Triton kernels of the three ops with the ops' signatures, by name: adapters over the
    launchers of :mod:`.triton_kernels`, and of :mod:`.triton_vector_kernels` for vector blocks
    ``(bo, 1)`` (1x1 convolutions without stride or padding over those of
    :mod:`sparse_kernels.linear.triton_kernels` / ``triton_vector_kernels``), imported on first
    call. Cases Triton cannot take (:func:`~sparse_kernels.capability.triton_unsupported_reason`:
    fp64, other block shapes) run on the references, or raise if ``strict``."""

    def takes(op: str, t: Tensor, block_size) -> bool:
        return triton_takes(op, t, block_size, strict=strict)

    def forward(x, values, bias, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, stride, padding,
                dilation, channels_last=False):
        index = (row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots)
        check_features("bsr_conv2d", "x", x, (col_ptr.shape[0] - 1) * values.shape[2], dim=1)
        if not takes("bsr_conv2d", x, values.shape[1:3]):
            return _forward_reference(x, values, bias, *index, stride, padding, dilation, channels_last)
        from ..linear import triton_kernels as linear
        from ..linear import triton_vector_kernels as linear_vector
        from . import triton_kernels as conv2d
        from . import triton_vector_kernels as conv2d_vector

        vector = is_vector_block(values.shape[1:3])
        if _pointwise(values.shape[3:], stride, padding):
            launch = linear_vector.bsr_linear_vector_fwd if vector else linear.bsr_linear_fwd
            y = _image(launch(_pixels(x), values.reshape(values.shape[:3]), row_ptr, row_slots, col_idx, bias), x)
        else:
            launch = conv2d_vector.bsr_conv2d_vector_fwd if vector else conv2d.bsr_conv2d_fwd
            y = launch(x, values, row_ptr, row_slots, col_idx, bias, stride, padding, dilation)
        return y.contiguous(memory_format=_output_format(x, channels_last))

    def grad_input(grad_out, values, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, input_size, stride,
                   padding, dilation):
        index = (row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots)
        check_features("bsr_conv2d_grad_input", "grad_out", grad_out, (row_ptr.shape[0] - 1) * values.shape[1], dim=1)
        if not takes("bsr_conv2d_grad_input", grad_out, values.shape[1:3]):
            return _grad_input_reference(grad_out, values, *index, input_size, stride, padding, dilation)
        from ..linear import triton_kernels as linear
        from ..linear import triton_vector_kernels as linear_vector
        from . import triton_kernels as conv2d
        from . import triton_vector_kernels as conv2d_vector

        vector = is_vector_block(values.shape[1:3])
        if _pointwise(values.shape[3:], stride, padding):
            rows, weights = _pixels(grad_out), values.reshape(values.shape[:3])
            if vector:
                dx_rows = linear_vector.bsr_linear_vector_grad_input(rows, weights, col_ptr, col_slots, row_idx,
                                                                     col_idx)
            else:
                dx_rows = linear.bsr_linear_grad_input(rows, weights, col_ptr, col_slots, row_idx)
            dx = _image(dx_rows, grad_out)
        elif vector:
            dx = conv2d_vector.bsr_conv2d_vector_grad_input(grad_out, values, col_ptr, col_slots, row_idx, col_idx,
                                                            input_size, stride, padding, dilation)
        else:
            dx = conv2d.bsr_conv2d_grad_input(grad_out, values, col_ptr, col_slots, row_idx, input_size, stride, padding,
                                            dilation)
        return dx.contiguous(memory_format=memory_format(grad_out))

    def grad_weight(grad_out, x, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, block_shape, stride,
                    padding, dilation):
        index = (row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots)
        check_features("bsr_conv2d_grad_weight", "grad_out", grad_out, (row_ptr.shape[0] - 1) * block_shape[0], dim=1)
        check_features("bsr_conv2d_grad_weight", "x", x, (col_ptr.shape[0] - 1) * block_shape[1], dim=1)
        if not takes("bsr_conv2d_grad_weight", x, block_shape[:2]):
            return _grad_weight_reference(grad_out, x, *index, block_shape, stride, padding, dilation)
        from ..linear import triton_kernels as linear
        from ..linear import triton_vector_kernels as linear_vector
        from . import triton_kernels as conv2d
        from . import triton_vector_kernels as conv2d_vector

        vector = is_vector_block(block_shape[:2])
        if _pointwise(block_shape[2:], stride, padding):
            block = tuple(block_shape[:2])
            if vector:
                dw = linear_vector.bsr_linear_vector_grad_weight(_pixels(grad_out), _pixels(x), row_ptr, row_slots,
                                                                 col_idx, block)
            else:
                dw = linear.bsr_linear_grad_weight(_pixels(grad_out), _pixels(x), row_idx, col_idx, row_slots, block)
            return dw.reshape(*dw.shape, 1, 1)
        if vector:
            return conv2d_vector.bsr_conv2d_vector_grad_weight(grad_out, x, row_ptr, row_slots, col_idx, block_shape,
                                                               stride, padding, dilation)
        return conv2d.bsr_conv2d_grad_weight(grad_out, x, row_idx, col_idx, row_slots, block_shape, stride, padding,
                                           dilation)

    return {"bsr_conv2d": forward, "bsr_conv2d_grad_input": grad_input, "bsr_conv2d_grad_weight": grad_weight}


# --------------------------------------------------------------------------- what CUDA runs
def cuda_kernels() -> Dict[str, Callable]:
    """What CUDA tensors run, by op: the Triton kernels (the references where Triton cannot take a case)."""
    return triton_op_kernels(strict=False)
