"""The pure-torch reference of ``group_norm_silu``: torch's GroupNorm, then SiLU."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def shifted(x: Tensor, shift: Optional[Tensor]) -> Tensor:
    """``x + shift`` with a shift ``[N, C]`` broadcast over x's pixels (``x`` itself without one)."""
    return x if shift is None else x + shift.reshape(*shift.shape, *([1] * (x.dim() - 2)))


def group_norm_silu_reference(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float = 1e-5,
                              shift: Optional[Tensor] = None) -> Tensor:
    """``silu(group_norm(x + shift[:, :, None, None], groups, weight, bias, eps))`` (no shift: of x)."""
    return F.silu(F.group_norm(shifted(x, shift), groups, weight, bias, eps))
