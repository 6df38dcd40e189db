"""``bsr_linear``: the public block-sparse linear op, its checks, and the call into the dispatcher.

The op ``sparse_kernels::bsr_linear`` (schema in csrc/ops.cpp) is differentiable: its Autograd
and Autocast kernels are C++ (csrc/autograd.cpp), and its backward calls the ops
``bsr_linear_grad_input`` and ``bsr_linear_grad_weight`` through the dispatcher, which picks
the kernel of the tensors' device (:mod:`sparse_kernels.linear.kernels`).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..checks import check_activation, check_bias
from ..layout import BlockSparseLayout, check_values
from ..registry import ops


def bsr_linear(x: Tensor, values: Tensor, layout: BlockSparseLayout, bias: Optional[Tensor] = None) -> Tensor:
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
    Raises:
        ``TypeError`` / ``ValueError`` naming a bad shape, dtype or device;
        :class:`~sparse_kernels.extension.ExtensionNotBuiltError` without the compiled extension.
    """
    check_values(values, layout)
    check_activation("x", x, values)
    out_features, in_features = layout.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}], got {tuple(x.shape)}")
    check_bias(bias, out_features, x)
    return ops().bsr_linear.default(x, values, bias, *layout.tensors())
