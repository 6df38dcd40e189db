"""Channels-last training of diffusers models, end to end.

``model.to(memory_format=torch.channels_last)`` is the generic lever for convolution models on
CPUs and GPUs, and the block-sparse kernels are fastest channels-last too. Two things break it
in diffusers models: convolutions fed a plain NCHW tensor return NCHW (the block-sparse ones
follow ``F.conv2d``'s rule for a channels-last weight once the model is converted, see
:class:`sparse_kernels.BlockSparseConv2d`), and ``ResnetBlock2D`` calls
``input_tensor.contiguous()`` before its shortcut convolution in training, which copies every
channels-last activation it sees into NCHW (and back, in the backward). :func:`channels_last`
converts a model and makes that ``.contiguous()`` keep a channels-last tensor as it is, with a
torch function mode active only inside those blocks: diffusers' source is untouched.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["channels_last"]


class _KeepChannelsLast(TorchFunctionMode):
    """``t.contiguous()`` returns ``t`` itself when ``t`` is a channels-last 4-D tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.contiguous and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
                return tensor
        return func(*args, **(kwargs or {}))


def _enter(module, args):
    module._keep_channels_last = _KeepChannelsLast()
    module._keep_channels_last.__enter__()


def _exit(module, args, output):
    mode = module.__dict__.pop("_keep_channels_last", None)
    if mode is not None:
        mode.__exit__(None, None, None)


def channels_last(model: nn.Module) -> nn.Module:
    """Converts ``model`` to channels-last and keeps its activations so through diffusers'
    ``ResnetBlock2D`` shortcuts; returns ``model`` (in place, like ``Module.to``). Calling it
    again does not add a second set of hooks."""
    model.to(memory_format=torch.channels_last)
    for module in model.modules():
        if type(module).__name__ == "ResnetBlock2D" and getattr(module, "conv_shortcut", None) is not None:
            if getattr(module, "_channels_last_hooks", None) is None:
                module._channels_last_hooks = (
                    module.register_forward_pre_hook(_enter),
                    module.register_forward_hook(_exit, always_call=True),
                )
    return model
