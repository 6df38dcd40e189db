"""GroupNorm and SiLU as one op in diffusers UNets, for dense and sparse models alike.

diffusers' ``ResnetBlock2D`` runs ``norm1`` then ``nonlinearity``, and ``norm2`` then
``nonlinearity`` again; ``UNet2DModel`` ends with ``conv_norm_out`` then ``conv_act``. On a CPU
torch's GroupNorms and SiLUs are about a fifth of a dense training step of the demo UNet
(:mod:`sparse_kernels.group_norm_silu.op` says why one op is cheaper). :func:`fuse_group_norm_silu`
makes each such norm a :class:`sparse_kernels.GroupNormSiLU` (the same parameters, the same
state_dict keys) and the SiLU after it an identity. A block's ``nonlinearity`` also activates the
time embedding before ``time_emb_proj``: a block without up- or down-sampling (every block of
this project's UNets) then runs :func:`_fused_forward`, which also adds the time embedding inside
``norm2`` (a whole pass over the activation saved, and its gradient's sum over the pixels made
as the norm's backward writes it) and skips the division of the residual sum by an
``output_scale_factor`` of 1.0 (another pass, forward and backward, for nothing); in the others
that SiLU moves to a forward pre-hook. Either way the block computes what it did, to fp32
rounding. diffusers' source is untouched, and a block it does not know (another
``time_embedding_norm``, another activation) is left as it is.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from sparse_kernels import GroupNormSiLU

__all__ = ["fuse_group_norm_silu"]


def _add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, in place where both have one dtype (under autocast a bf16 output plus an
    fp32 shortcut is fp32, as diffusers computes it). Compared directly: ``torch.result_type``
    would break a compiled graph."""
    return fresh.add_(other) if other.dtype == fresh.dtype else fresh + other


def _fused_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``ResnetBlock2D.forward`` of a fused block without up- or down-sampling: the same sums,
    with the SiLUs inside the norms, the time embedding added inside ``norm2`` (its ``shift``),
    the shortcut added in place into the last convolution's fresh output (which no backward
    reads), and no division by a scale of 1.0."""
    hidden = self.conv1(self.norm1(input_tensor))
    if self.time_emb_proj is not None and temb is not None:
        # the projected time embedding [N, C] is added to every pixel inside norm2, never formed
        hidden = self.norm2(hidden, self.time_emb_proj(temb if self.skip_time_act else F.silu(temb)))
    else:
        hidden = self.norm2(hidden if temb is None else _add_into(hidden, temb))
    hidden = self.conv2(self.dropout(hidden))
    shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
    output = _add_into(hidden, shortcut)
    return output if self.output_scale_factor == 1.0 else output / self.output_scale_factor


def _silu_temb(module, args, kwargs):
    """The block's SiLU of the time embedding, before its forward: ``forward(input_tensor, temb)``."""
    if len(args) >= 2 and args[1] is not None:
        return (args[0], F.silu(args[1]), *args[2:]), kwargs
    if kwargs.get("temb") is not None:
        return args, {**kwargs, "temb": F.silu(kwargs["temb"])}
    return args, kwargs


def _plain(norm) -> bool:
    return type(norm) is nn.GroupNorm and norm.affine


def _fuse_block(block: nn.Module) -> bool:
    """Fuses a ``ResnetBlock2D``'s two norms with its SiLU; returns whether it did."""
    if not (isinstance(block.nonlinearity, nn.SiLU) and block.time_embedding_norm == "default"
            and _plain(block.norm1) and _plain(block.norm2)):
        return False
    block.norm1 = GroupNormSiLU.from_group_norm(block.norm1)
    block.norm2 = GroupNormSiLU.from_group_norm(block.norm2)
    block.nonlinearity = nn.Identity()
    if block.upsample is None and block.downsample is None:
        block.forward = types.MethodType(_fused_forward, block)
    elif block.time_emb_proj is not None and not block.skip_time_act:
        block._silu_temb_hook = block.register_forward_pre_hook(_silu_temb, with_kwargs=True)
    return True


def fuse_group_norm_silu(model: nn.Module) -> int:
    """Makes every GroupNorm of ``model`` that a SiLU follows (diffusers' ``ResnetBlock2D`` and
    the UNets' output norm) a :class:`~sparse_kernels.GroupNormSiLU`, in place; returns how many
    norms were fused. Calling it again fuses nothing more. The outputs are those of the model
    before, to fp32 rounding."""
    fused = 0
    for module in list(model.modules()):
        name = type(module).__name__
        if name == "ResnetBlock2D" and _fuse_block(module):
            fused += 2
        elif (name in ("UNet2DModel", "UNet2DConditionModel") and _plain(getattr(module, "conv_norm_out", None))
              and isinstance(getattr(module, "conv_act", None), nn.SiLU)):
            module.conv_norm_out = GroupNormSiLU.from_group_norm(module.conv_norm_out)
            module.conv_act = nn.Identity()
            fused += 1
    return fused
