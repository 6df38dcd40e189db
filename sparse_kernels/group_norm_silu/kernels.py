"""The kernels of the GroupNorm + SiLU ops that Python registers: fake kernels, the references
with the ops' signatures, and :func:`cuda_kernels`; :mod:`sparse_kernels.registry` registers them.

The ops (schemas in csrc/ops.cpp): ``group_norm_silu`` (differentiable; its Autograd kernel in
csrc/autograd.cpp calls the other two), ``group_norm_silu_forward`` (y, mean, rstd) and
``group_norm_silu_backward`` (the gradients of x, weight, bias and the optional shift). Their
compiled kernels are for fp32 CPU tensors (csrc/cpu/group_norm_silu.cpp); CUDA tensors run the
references (torch's own GroupNorm and SiLU).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .reference import group_norm_silu_reference, shifted


# --------------------------------------------------------------------------- fake kernels
def _like(x):
    return torch.empty_like(x)


def _forward_fake(x, weight, bias, groups, eps, shift=None):
    return _like(x), x.new_empty(x.shape[0], groups), x.new_empty(x.shape[0], groups)


def _backward_fake(grad_y, x, weight, bias, mean, rstd, groups, shift=None):
    return _like(x), torch.empty_like(weight), torch.empty_like(bias), _shift_grad_like(x, shift)


def _shift_grad_like(x, shift):
    return x.new_empty(0) if shift is None else torch.empty_like(shift)


FAKE_KERNELS: Dict[str, Callable] = {
    "group_norm_silu": lambda x, weight, bias, groups, eps, shift=None: _like(x),
    "group_norm_silu_forward": _forward_fake,
    "group_norm_silu_backward": _backward_fake,
}


# --------------------------------------------------------------------------- reference kernels
def _moments(x, groups, eps):
    """mean and rstd [N, groups] of x [N, C, ...], as torch's GroupNorm computes them."""
    var, mean = torch.var_mean(x.reshape(x.shape[0], groups, -1).float(), dim=2, unbiased=False)
    return mean.to(x.dtype), torch.rsqrt(var + eps).to(x.dtype)


def forward_op_reference(x, weight, bias, groups, eps, shift=None):
    """``group_norm_silu_forward`` in pure torch: y, mean, rstd."""
    mean, rstd = _moments(shifted(x, shift), groups, eps)
    return group_norm_silu_reference(x, weight, bias, groups, eps, shift), mean, rstd


def backward_op_reference(grad_y, x, weight, bias, mean, rstd, groups, shift=None):
    """``group_norm_silu_backward`` in pure torch: the gradients of the reference, through its
    moments (the mean recomputed, the same value as ``mean``). ``rstd`` carries eps, which is not
    an argument here: the normalisation uses it as a value, with ``-rstd^3 / 2`` times the
    variance's gradient as its gradient, which is rstd's."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (x, weight, bias)]
        if shift is not None:
            inputs.append(shift.detach().requires_grad_())
        h = shifted(inputs[0], inputs[3] if shift is not None else None)
        values = h.reshape(x.shape[0], groups, -1)
        var = values.var(dim=2, unbiased=False)
        r = rstd + (var - var.detach()) * (-0.5 * rstd ** 3)  # rstd's value, its gradient
        normalised = ((values - values.mean(dim=2, keepdim=True)) * r[..., None]).reshape(x.shape)
        affine = [1, -1] + [1] * (x.dim() - 2)
        y = torch.nn.functional.silu(normalised * inputs[1].reshape(affine) + inputs[2].reshape(affine))
        grads = torch.autograd.grad(y, inputs, grad_y)
        return (*grads, x.new_empty(0)) if shift is None else grads


REFERENCE_KERNELS: Dict[str, Callable] = {
    "group_norm_silu": group_norm_silu_reference,
    "group_norm_silu_forward": forward_op_reference,
    "group_norm_silu_backward": backward_op_reference,
}


# --------------------------------------------------------------------------- what CUDA runs
def cuda_kernels() -> Dict[str, Callable]:
    """What CUDA tensors run, by op: the references (no CUDA kernel is compiled for these ops)."""
    return dict(REFERENCE_KERNELS)
