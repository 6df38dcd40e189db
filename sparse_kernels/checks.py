"""Argument checks the ops share, and the helpers that give the pure-torch references and the
Triton launchers the ops' signatures (``layout_of``, ``memory_format``).

The checks raise ``TypeError`` / ``ValueError`` naming the bad shape, dtype or device. Dtypes
are checked by the kernels themselves, after ``torch.autocast`` has cast the operands.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .layout import BlockSparseLayout


def layout_of(block_size: Sequence[int], index: Sequence[Tensor]) -> BlockSparseLayout:
    """The layout object of an op's six index tensors (no copies, no checks)."""
    row_ptr, col_ptr = index[2], index[4]
    grid = (row_ptr.shape[0] - 1, col_ptr.shape[0] - 1)
    return BlockSparseLayout(grid, (int(block_size[0]), int(block_size[1])), *index)


def memory_format(t: Tensor) -> torch.memory_format:
    """channels-last if torch suggests it for ``t`` (strides ordered N, H, W, C: also a channel
    slice of a channels-last tensor) and ``t`` is not plainly contiguous, else contiguous: the
    rule of the C++ kernels."""
    if t.dim() == 4 and suggest_memory_format(t) == torch.channels_last and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def check_features(op: str, name: str, t: Tensor, features: int, dim: int = -1) -> None:
    """Refuses ``t`` unless its dimension ``dim`` holds ``features`` (the check of a direct
    ``torch.ops`` call on a kernel that does not make it itself)."""
    if t.dim() < 1 or t.shape[dim] != features:
        raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} must have {features} features in dim {dim}")


def check_activation(name: str, x: Tensor, values: Tensor) -> None:
    """Refuses an activation that is not a floating-point tensor on the values' device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.device != values.device:
        raise ValueError(f"{name} is on {x.device} but values are on {values.device}")


def check_bias(bias: Optional[Tensor], features: int, x: Tensor) -> None:
    """Refuses a bias that is not ``None`` or a ``[features]`` tensor on ``x``'s device."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (features,):
        raise ValueError(f"bias must have shape ({features},), got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")

