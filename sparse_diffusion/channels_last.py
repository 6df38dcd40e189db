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

The UNets' self-attention breaks it a third way: diffusers' processor turns an ``[N, C, H, W]``
activation into tokens ``[N, HW, C]``, normalises them transposed back (a copy), projects a
transposed view (another copy per projection, forward and backward) and returns NCHW.
Channels-last, the activation already *is* its tokens in memory, so :class:`ChannelsLastAttention`
takes them as a view, normalises the 4-D activation, and returns a channels-last view of the
output projection: the same sums without the copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ChannelsLastAttention", "channels_last"]


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


class ChannelsLastAttention:
    """The attention processor of a diffusers ``Attention`` for channels-last activations.

    A self-attention over a channels-last 4-D input, without a mask or the rarer options (a
    spatial norm, query and key norms), computes what diffusers' ``AttnProcessor2_0`` does
    (``F.scaled_dot_product_attention`` at its default scale, as that processor calls it) with
    the tokens a view of the input and the output a channels-last view of the last projection.
    Anything else goes to ``fallback``, the processor it replaces.
    """

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        if (hidden_states.dim() != 4 or not hidden_states.is_contiguous(memory_format=torch.channels_last)
                or encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
                or attn.norm_q is not None or attn.norm_k is not None or args or kwargs):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        n, channels, height, width = hidden_states.shape
        x = hidden_states if attn.group_norm is None else attn.group_norm(hidden_states)
        tokens = x.permute(0, 2, 3, 1).reshape(n, height * width, channels)  # a view: x is channels-last
        query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(n, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(n, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.view(n, height, width, channels).permute(0, 3, 1, 2)  # channels-last [N, C, H, W]
        if attn.residual_connection:
            out = out + hidden_states
        return out if attn.rescale_output_factor == 1.0 else out / attn.rescale_output_factor


def channels_last(model: nn.Module) -> nn.Module:
    """Converts ``model`` to channels-last and keeps its activations so through diffusers'
    ``ResnetBlock2D`` shortcuts and its attention (:class:`ChannelsLastAttention`); returns
    ``model`` (in place, like ``Module.to``). Calling it again changes nothing more."""
    model.to(memory_format=torch.channels_last)
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if type(module).__name__ == "Attention" and processor is not None:
            if not isinstance(processor, ChannelsLastAttention):
                module.set_processor(ChannelsLastAttention(processor))
        if type(module).__name__ == "ResnetBlock2D" and getattr(module, "conv_shortcut", None) is not None:
            if getattr(module, "_channels_last_hooks", None) is None:
                module._channels_last_hooks = (
                    module.register_forward_pre_hook(_enter),
                    module.register_forward_hook(_exit, always_call=True),
                )
    return model
