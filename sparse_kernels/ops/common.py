"""Helpers shared by the op families: layout rebuilding, backend choice, input checks.

The input checks raise ``TypeError`` / ``ValueError`` naming the bad shape, dtype or device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..backend import select_backend
from ..layout import BlockSparseLayout


def layout_of(block_size: Sequence[int], index: Sequence[Tensor]) -> BlockSparseLayout:
    """Rebuilds the layout object from its six index tensors (no copies, no checks)."""
    row_ptr, col_ptr = index[2], index[4]
    grid = (row_ptr.shape[0] - 1, col_ptr.shape[0] - 1)
    return BlockSparseLayout(grid, (int(block_size[0]), int(block_size[1])), *index)


def backend_for(t: Tensor, block_size: Sequence[int]) -> str:
    """``"triton"``, ``"compiled"`` or ``"reference"`` for an op on ``t``'s device and dtype."""
    return select_backend(t.device, t.dtype, (int(block_size[0]), int(block_size[1])))


def launchers(backend: str, family: str):
    """The module of launchers of ``backend`` (``"triton"`` or ``"compiled"``) for the op
    ``family`` (``"linear"`` or ``"conv"``): both name and call them alike. Imported on
    first use, so that CPU-only code never imports triton."""
    if backend == "compiled":
        from .. import compiled

        return compiled
    if family == "linear":
        from ..triton import linear

        return linear
    from ..triton import conv

    return conv


def check_features(op: str, name: str, t: Tensor, index: Sequence[Tensor], block: int, side: str) -> None:
    """Refuses ``t`` unless its dim 1 spans the layout's block-rows (``side="out"``) or
    block-columns (``side="in"``) times ``block``: the check of a direct ``torch.ops`` call."""
    blocks = index[2].shape[0] - 1 if side == "out" else index[4].shape[0] - 1
    if t.dim() < 2 or t.shape[1] != blocks * block:
        raise ValueError(
            f"{op}: {name} of shape {tuple(t.shape)} must have {blocks * block} features in dim 1 "
            f"({blocks} blocks of {block})"
        )


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of one spatial axis of a convolution, as ``F.conv2d`` computes it."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def autocast_operands(x: Tensor, values: Tensor, bias: Optional[Tensor]):
    """Under an enabled ``torch.autocast`` for ``x``'s device, the floating operands in its
    dtype (as torch's own matmuls and convolutions run); otherwise unchanged. The casts are
    differentiable: fp32 ``values`` get fp32 gradients."""
    if not (isinstance(x, Tensor) and isinstance(values, Tensor)):
        return x, values, bias
    device_type = x.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return x, values, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

    return cast(x), cast(values), cast(bias)


def check_activation(name: str, x: Tensor, values: Tensor) -> None:
    """Refuses an activation whose type, dtype or device does not fit ``values``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != values.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but values have {values.dtype}")
    if x.device != values.device:
        raise ValueError(f"{name} is on {x.device} but values are on {values.device}")


def check_bias(bias: Optional[Tensor], features: int, x: Tensor) -> None:
    """Refuses a bias that is not ``None`` or a ``[features]`` tensor like ``x``."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (features,):
        raise ValueError(f"bias must have shape ({features},), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
