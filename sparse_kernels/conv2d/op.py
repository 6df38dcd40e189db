"""``bsr_conv2d``: the public block-sparse conv2d op, its checks, and the call into the dispatcher.

The op ``sparse_kernels::bsr_conv2d`` (schema in csrc/ops.cpp) is differentiable: its Autograd
and Autocast kernels are C++ (csrc/autograd.cpp), and its backward calls the ops
``bsr_conv2d_grad_input`` and ``bsr_conv2d_grad_weight`` through the dispatcher, which picks
the kernel of the tensors' device (:mod:`sparse_kernels.conv2d.kernels`).
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from ..checks import check_activation, check_bias
from ..layout import BlockSparseLayout, check_values
from ..registry import ops
from ..shapes import IntPair, conv_output_size, explicit_padding, int_pair


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
    Raises:
        ``TypeError`` / ``ValueError`` naming a bad shape, dtype, device or option;
        :class:`~sparse_kernels.extension.ExtensionNotBuiltError` without the compiled extension.
    """
    if groups != 1:
        raise ValueError(f"bsr_conv2d supports groups=1 only, got groups={groups!r}")
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
    stride = int_pair("stride", stride, 1)
    dilation = int_pair("dilation", dilation, 1)
    padding = explicit_padding(padding, kernel, stride, dilation)
    out_hw = [conv_output_size(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(2)]
    if min(out_hw) <= 0:
        raise ValueError(
            f"input of spatial size {tuple(x.shape[2:])} is too small for kernel {kernel} with "
            f"padding {padding} and dilation {dilation}"
        )
    check_bias(bias, out_channels, x)
    y = ops().bsr_conv2d.default(x, values, bias, *layout.tensors(), stride, padding, dilation)
    return y.squeeze(0) if unbatched else y
