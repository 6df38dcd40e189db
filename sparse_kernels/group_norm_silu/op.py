"""``group_norm_silu``: ``silu(group_norm(x))`` in one op, and :class:`GroupNormSiLU`, the
``nn.GroupNorm`` whose output goes through SiLU.

diffusers' ``ResnetBlock2D`` runs GroupNorm and SiLU back to back, twice per block: with the
activations channels-last, torch's GroupNorm and SiLU, forward and backward, are about a fifth of
a dense CPU training step of the demo UNet. The compiled kernel (csrc/cpu/group_norm_silu.cpp)
does an image at a time, its second pass over x reading what the first left in cache, and
writes each output once (SiLU's derivative computed on the way, dz kept in dx between the
backward's passes): 0.4-0.7 of torch's time on the UNets' shapes
(``python -m benchmarks.group_norm_silu``). It takes fp32 4-D CPU tensors with the extension
built; everything else (CUDA, bf16, other ranks, no build) runs the reference, torch's own ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import extension
from ..registry import ops
from .reference import group_norm_silu_reference


def group_norm_silu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int,
                    eps: float = 1e-5, shift: Optional[Tensor] = None) -> Tensor:
    """``silu(group_norm(x + shift[:, :, None, None], groups, weight, bias, eps))``, differentiable
    in x, weight, bias and shift; ``x + shift`` is never formed.

    Args:
        x: ``[N, C, H, W]`` (any memory format; y is stored like x), C divisible by ``groups``.
        weight, bias: ``[C]``, or ``None`` (no affine: the reference path).
        shift: ``[N, C]`` added to every pixel of x before the norm (diffusers adds a block's
            time embedding so), or ``None``.
    """
    if (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu" and weight is not None
            and bias is not None and weight.dtype == torch.float32 and bias.dtype == torch.float32
            and (shift is None or (shift.dtype == torch.float32 and shift.device.type == "cpu"))
            and extension.library() is not None):
        return ops().group_norm_silu.default(x, weight, bias, groups, eps, shift)
    return group_norm_silu_reference(x, weight, bias, groups, eps, shift)


class GroupNormSiLU(nn.GroupNorm):
    """``nn.GroupNorm`` followed by SiLU, through :func:`group_norm_silu`: the same parameters
    and state_dict keys as the ``nn.GroupNorm`` it replaces (:meth:`from_group_norm`)."""

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm) -> "GroupNormSiLU":
        """A GroupNormSiLU holding ``norm``'s parameters (the same tensors, not copies)."""
        fused = cls.__new__(cls)
        fused.__dict__.update(norm.__dict__)
        return fused

    def forward(self, x: Tensor, shift: Optional[Tensor] = None) -> Tensor:
        """``silu(norm(x + shift[:, :, None, None]))``; see :func:`group_norm_silu`."""
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, shift)
