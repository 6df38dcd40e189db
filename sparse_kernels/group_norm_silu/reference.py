"""The pure-torch reference of ``group_norm_silu``: torch's GroupNorm, then SiLU."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def group_norm_silu_reference(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    """``silu(group_norm(x, groups, weight, bias, eps))``."""
    return F.silu(F.group_norm(x, groups, weight, bias, eps))
