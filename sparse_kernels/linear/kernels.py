"""The kernels of the linear ops that Python registers: fake, Triton (CUDA) and reference kernels,
each with its op's signature, and :func:`cuda_kernels`; :mod:`sparse_kernels.registry` registers them.

The ops (schemas in csrc/ops.cpp, routed by torch's dispatcher):

* ``sparse_kernels::bsr_linear``             y  = x @ W.T + bias   (differentiable: Autograd
  and Autocast kernels in csrc/autograd.cpp)
* ``sparse_kernels::bsr_linear_grad_input``  dx = dy @ W
* ``sparse_kernels::bsr_linear_grad_weight`` dW = (dy.T @ x) at live blocks

each taking the layout as its six index tensors (``layout.tensors()``). Kernels: C++ for CPU
(csrc/cpu/linear.cpp); here: Triton for CUDA (the reference where Triton cannot take a case),
the fake kernels for ``torch.compile``, and the pure-torch references by name
(:data:`REFERENCE_KERNELS`, for the reference override).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor

from ..capability import is_vector_block, triton_takes
from ..checks import check_features, layout_of
from .reference import bsr_linear_grad_input_reference, bsr_linear_grad_weight_reference, bsr_linear_reference


# --------------------------------------------------------------------------- fake kernels
def _forward_fake(x, values, bias, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots):
    return x.new_empty(*x.shape[:-1], (row_ptr.shape[0] - 1) * values.shape[1])


def _grad_input_fake(grad_out, values, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots):
    return grad_out.new_empty(*grad_out.shape[:-1], (col_ptr.shape[0] - 1) * values.shape[2])


def _grad_weight_fake(grad_out, x, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, block_out, block_in):
    return x.new_empty(row_idx.shape[0], block_out, block_in)


FAKE_KERNELS: Dict[str, Callable] = {
    "bsr_linear": _forward_fake,
    "bsr_linear_grad_input": _grad_input_fake,
    "bsr_linear_grad_weight": _grad_weight_fake,
}


# --------------------------------------------------------------------------- reference kernels
def _forward_reference(x, values, bias, *index):
    layout = layout_of(values.shape[1:3], index)
    check_features("bsr_linear", "x", x, layout.shape[1])
    return bsr_linear_reference(x, values, layout, bias)


def _grad_input_reference(grad_out, values, *index):
    layout = layout_of(values.shape[1:3], index)
    check_features("bsr_linear_grad_input", "grad_out", grad_out, layout.shape[0])
    return bsr_linear_grad_input_reference(grad_out, values, layout)


def _grad_weight_reference(grad_out, x, *index_and_block):
    *index, block_out, block_in = index_and_block
    layout = layout_of((block_out, block_in), index)
    check_features("bsr_linear_grad_weight", "grad_out", grad_out, layout.shape[0])
    check_features("bsr_linear_grad_weight", "x", x, layout.shape[1])
    return bsr_linear_grad_weight_reference(grad_out, x, layout)


REFERENCE_KERNELS: Dict[str, Callable] = {
    "bsr_linear": _forward_reference,
    "bsr_linear_grad_input": _grad_input_reference,
    "bsr_linear_grad_weight": _grad_weight_reference,
}


# --------------------------------------------------------------------------- Triton kernels
def triton_op_kernels(strict: bool) -> Dict[str, Callable]:
    """The Triton kernels of the three ops with the ops' signatures, by name: adapters over the
    launchers of :mod:`.triton_kernels`, and of :mod:`.triton_vector_kernels` for vector blocks
    ``(bo, 1)`` (imported on first call: triton loads only when a Triton kernel runs). Cases Triton
    cannot take (:func:`~sparse_kernels.capability.triton_unsupported_reason`: fp64, other block
    shapes) run on the references, or raise if ``strict``."""

    def takes(op: str, t: Tensor, block_size) -> bool:
        return triton_takes(op, t, block_size, strict=strict)

    def forward(x, values, bias, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots):
        check_features("bsr_linear", "x", x, (col_ptr.shape[0] - 1) * values.shape[2])
        if not takes("bsr_linear", x, values.shape[1:3]):
            return _forward_reference(x, values, bias, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots)
        from . import triton_kernels as kernels
        from . import triton_vector_kernels as vector

        launch = vector.bsr_linear_vector_fwd if is_vector_block(values.shape[1:3]) else kernels.bsr_linear_fwd
        y = launch(x.reshape(-1, x.shape[-1]), values, row_ptr, row_slots, col_idx, bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def grad_input(grad_out, values, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots):
        check_features("bsr_linear_grad_input", "grad_out", grad_out, (row_ptr.shape[0] - 1) * values.shape[1])
        if not takes("bsr_linear_grad_input", grad_out, values.shape[1:3]):
            return _grad_input_reference(grad_out, values, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots)
        from . import triton_kernels as kernels
        from . import triton_vector_kernels as vector

        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if is_vector_block(values.shape[1:3]):
            dx = vector.bsr_linear_vector_grad_input(rows, values, col_ptr, col_slots, row_idx, col_idx)
        else:
            dx = kernels.bsr_linear_grad_input(rows, values, col_ptr, col_slots, row_idx)
        return dx.view(*grad_out.shape[:-1], dx.shape[-1])

    def grad_weight(grad_out, x, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, block_out, block_in):
        check_features("bsr_linear_grad_weight", "grad_out", grad_out, (row_ptr.shape[0] - 1) * block_out)
        check_features("bsr_linear_grad_weight", "x", x, (col_ptr.shape[0] - 1) * block_in)
        if not takes("bsr_linear_grad_weight", x, (block_out, block_in)):
            return _grad_weight_reference(grad_out, x, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots,
                                          block_out, block_in)
        from . import triton_kernels as kernels
        from . import triton_vector_kernels as vector

        dy_rows, x_rows = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if is_vector_block((block_out, block_in)):
            return vector.bsr_linear_vector_grad_weight(dy_rows, x_rows, row_ptr, row_slots, col_idx,
                                                        (block_out, block_in))
        return kernels.bsr_linear_grad_weight(dy_rows, x_rows, row_idx, col_idx, row_slots, (block_out, block_in))

    return {"bsr_linear": forward, "bsr_linear_grad_input": grad_input, "bsr_linear_grad_weight": grad_weight}


# --------------------------------------------------------------------------- what CUDA runs
def cuda_kernels() -> Dict[str, Callable]:
    """What CUDA tensors run, by op: the Triton kernels (the references where Triton cannot take a case)."""
    return triton_op_kernels(strict=False)
