"""``bsr_linear``: the public op, its ``torch.library`` registration, autograd and dispatch.

Three custom ops, opaque to ``torch.compile`` and each with a fake (meta) implementation:

* ``sparse_kernels::bsr_linear``             y  = x @ W.T + bias      (differentiable)
* ``sparse_kernels::bsr_linear_grad_input``  dx = dy @ W
* ``sparse_kernels::bsr_linear_grad_weight`` dW = (dy.T @ x) at live blocks

They take 2-D activations and the layout as the list of its six index tensors; each
picks the Triton kernels or the reference at call time (see :mod:`sparse_kernels.backend`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..layout import BlockSparseLayout, check_values
from .common import (
    autocast_operands,
    backend_for,
    check_activation,
    check_bias,
    check_features,
    launchers,
    layout_of,
)
from ..reference import (
    bsr_linear_grad_input_reference,
    bsr_linear_grad_weight_reference,
    bsr_linear_reference,
)


# The ops take the layout as ``index = layout.tensors()``:
# [row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots].

# --------------------------------------------------------------------------- forward op
@torch.library.custom_op("sparse_kernels::bsr_linear", mutates_args=())
def _bsr_linear_op(x: Tensor, values: Tensor, bias: Optional[Tensor], index: List[Tensor]) -> Tensor:
    block_size = values.shape[1:3]
    check_features("bsr_linear", "x", x, index, block_size[1], "in")
    backend = backend_for(x, block_size)
    if backend != "reference":
        kernels = launchers(backend, "linear")
        row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index
        return kernels.bsr_linear_fwd(x, values, row_ptr, row_slots, col_idx, bias)
    return bsr_linear_reference(x, values, layout_of(block_size, index), bias)


@_bsr_linear_op.register_fake
def _(x, values, bias, index):
    return x.new_empty(x.shape[0], (index[2].shape[0] - 1) * values.shape[1])


# --------------------------------------------------------------------------- backward ops
@torch.library.custom_op("sparse_kernels::bsr_linear_grad_input", mutates_args=())
def _bsr_linear_grad_input_op(grad_out: Tensor, values: Tensor, index: List[Tensor]) -> Tensor:
    block_size = values.shape[1:3]
    check_features("bsr_linear_grad_input", "grad_out", grad_out, index, block_size[0], "out")
    backend = backend_for(grad_out, block_size)
    if backend != "reference":
        kernels = launchers(backend, "linear")
        row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index
        return kernels.bsr_linear_grad_input(grad_out, values, col_ptr, col_slots, row_idx)
    return bsr_linear_grad_input_reference(grad_out, values, layout_of(block_size, index))


@_bsr_linear_grad_input_op.register_fake
def _(grad_out, values, index):
    return grad_out.new_empty(grad_out.shape[0], (index[4].shape[0] - 1) * values.shape[2])


@torch.library.custom_op("sparse_kernels::bsr_linear_grad_weight", mutates_args=())
def _bsr_linear_grad_weight_op(
    grad_out: Tensor, x: Tensor, block_out: int, block_in: int, index: List[Tensor]
) -> Tensor:
    block_size = (block_out, block_in)
    check_features("bsr_linear_grad_weight", "grad_out", grad_out, index, block_out, "out")
    check_features("bsr_linear_grad_weight", "x", x, index, block_in, "in")
    backend = backend_for(x, block_size)
    if backend != "reference":
        kernels = launchers(backend, "linear")
        row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index
        # Triton walks the slots in row order; the CPU kernel shares them among threads in
        # column order (neighbours reread the same input columns).
        order = row_slots if backend == "triton" else col_slots
        return kernels.bsr_linear_grad_weight(grad_out, x, row_idx, col_idx, order, block_size)
    return bsr_linear_grad_weight_reference(grad_out, x, layout_of(block_size, index))


@_bsr_linear_grad_weight_op.register_fake
def _(grad_out, x, block_out, block_in, index):
    return x.new_empty(index[0].shape[0], block_out, block_in)


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, values, bias, index = inputs
    ctx.save_for_backward(x, values, *index)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, values, *index = ctx.saved_tensors
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _bsr_linear_grad_input_op(grad_out, values, index)
    if ctx.needs_input_grad[1]:
        grad_values = _bsr_linear_grad_weight_op(grad_out, x, values.shape[1], values.shape[2], index)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        # Accumulate in at least fp32, as the kernels do.
        accumulate = torch.promote_types(grad_out.dtype, torch.float32)
        grad_bias = grad_out.sum(0, dtype=accumulate).to(grad_out.dtype)
    return grad_x, grad_values, grad_bias, [None] * len(index)


_bsr_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public op
def bsr_linear(
    x: Tensor, values: Tensor, layout: BlockSparseLayout, bias: Optional[Tensor] = None
) -> Tensor:
    """Block-sparse linear: ``y = x @ to_dense(values, layout).T + bias``.

    Args:
        x: ``[..., in]`` with ``in == layout.shape[1]``; fp32, fp16 or bf16 (fp64 runs on
            the reference path).
        values: ``[nnz, bo, bi]``, the live blocks, same dtype and device as ``x``.
        layout: the :class:`BlockSparseLayout` of the weight ``[out, in]``.
        bias: ``[out]`` or ``None``.
    Returns:
        ``y: [..., out]``, differentiable in ``x``, ``values`` and ``bias``. Kernels
        accumulate in fp32. Under ``torch.autocast`` the operands run in its dtype.
    """
    x, values, bias = autocast_operands(x, values, bias)
    check_values(values, layout)
    check_activation("x", x, values)
    out_features, in_features = layout.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}], got {tuple(x.shape)}")
    check_bias(bias, out_features, x)
    x_2d = x.reshape(-1, in_features)
    y = _bsr_linear_op(x_2d, values, bias, list(layout.tensors()))
    return y.reshape(*x.shape[:-1], out_features)
