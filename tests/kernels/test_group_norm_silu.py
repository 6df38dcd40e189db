"""group_norm_silu: the compiled CPU kernel (every instruction set) against the fp64 reference,
forward and the gradients of x, weight, bias and the optional shift; memory formats, opcheck,
torch.compile, the reference path for what the kernel does not take, and refusals."""
import pytest
import torch
from helpers import ISAS

import sparse_kernels as sk

ops = sk.registry.ops()

# (N, C, H, W, groups): channels a multiple of every vector width, and not (a tail of lanes);
# one group; a group per channel; one pixel; more pixels than a chunk (64) and a partial chunk.
CASES = [(2, 32, 5, 7, 8), (3, 24, 9, 9, 4), (1, 20, 4, 4, 1), (2, 16, 3, 3, 16), (4, 48, 1, 1, 6),
         (2, 64, 11, 13, 32)]


def _operands(case, channels_last, seed=0):
    n, c, h, w, groups = case
    generator = torch.Generator().manual_seed(seed)
    # An offset and a spread per channel, as activations have: the moments are not 0 and 1.
    x = torch.randn(n, c, h, w, generator=generator) * (0.5 + torch.rand(c, 1, 1, generator=generator)) \
        + torch.randn(c, 1, 1, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = 1 + 0.5 * torch.randn(c, generator=generator)
    bias = 0.5 * torch.randn(c, generator=generator)
    grad = torch.randn(n, c, h, w, generator=generator)
    return x, weight, bias, grad, groups


def _shift(x, seed=1):
    """A shift [N, C] as large as x's spread: the time embedding a block adds before its norm."""
    return 2 * torch.randn(x.shape[0], x.shape[1], generator=torch.Generator().manual_seed(seed))


def _forward_backward(fn, x, weight, bias, grad, groups, shift=None):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    if shift is None:
        y = fn(x, weight, bias, groups, 1e-5)
        y.backward(grad.to(y.dtype))
        return y, x.grad, weight.grad, bias.grad
    shift = shift.detach().clone().requires_grad_()
    y = fn(x, weight, bias, groups, 1e-5, shift)
    y.backward(grad.to(y.dtype))
    return y, x.grad, weight.grad, bias.grad, shift.grad


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shifted", [False, True], ids=["no_shift", "shift"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients_against_fp64(case, channels_last, shifted, isa, monkeypatch):
    monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", isa)
    x, weight, bias, grad, groups = _operands(case, channels_last)
    shift = _shift(x) if shifted else None
    ours = _forward_backward(ops.group_norm_silu.default, x, weight, bias, grad, groups, shift)
    truth = _forward_backward(sk.group_norm_silu_reference, *(t.double() for t in (x, weight, bias, grad)), groups,
                              None if shift is None else shift.double())
    assert len(ours) == (5 if shifted else 4)
    for name, got, want in zip(("y", "dx", "dweight", "dbias", "dshift"), ours, truth):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert ours[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert ours[1].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_mean_and_rstd_are_torchs():
    x, weight, bias, _, groups = _operands((2, 32, 6, 6, 8), True)
    y, mean, rstd = ops.group_norm_silu_forward.default(x, weight, bias, groups, 1e-5)
    want_y, want_mean, want_rstd = torch.ops.aten.native_group_norm(x, weight, bias, 2, 32, 36, groups, 1e-5)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(rstd, want_rstd)
    torch.testing.assert_close(y, torch.nn.functional.silu(want_y))


@pytest.mark.parametrize("shifted", [False, True], ids=["no_shift", "shift"])
def test_opcheck(shifted):
    x, weight, bias, grad, groups = _operands((2, 16, 4, 5, 4), True)
    shift = _shift(x).requires_grad_() if shifted else None
    torch.library.opcheck(ops.group_norm_silu.default,
                          (x, weight.requires_grad_(), bias.requires_grad_(), groups, 1e-5, shift))
    with torch.no_grad():
        _, mean, rstd = ops.group_norm_silu_forward.default(x, weight, bias, groups, 1e-5, shift)
    torch.library.opcheck(ops.group_norm_silu_backward.default,
                          (grad.contiguous(memory_format=torch.channels_last), x, weight.detach(), bias.detach(), mean,
                           rstd, groups, None if shift is None else shift.detach()))


def test_module_under_torch_compile_fullgraph():
    norm = torch.nn.GroupNorm(4, 16)
    fused = sk.GroupNormSiLU.from_group_norm(norm)
    assert fused.weight is norm.weight and list(fused.state_dict()) == list(norm.state_dict())
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), torch.nn.functional.silu(norm(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_what_the_kernel_does_not_take_runs_the_reference(dtype):
    x, weight, bias, _, groups = _operands((2, 16, 3, 3, 4), True)
    x, weight, bias = (t.to(dtype) for t in (x, weight, bias))
    torch.testing.assert_close(sk.group_norm_silu(x, weight, bias, groups), sk.group_norm_silu_reference(x, weight, bias, groups))
    flat = torch.randn(2, 16, 9, dtype=dtype)  # not 4-D
    torch.testing.assert_close(sk.group_norm_silu(flat, weight, bias, groups),
                               sk.group_norm_silu_reference(flat, weight, bias, groups))
    shift = _shift(x).to(dtype)
    torch.testing.assert_close(sk.group_norm_silu(x, weight, bias, groups, shift=shift),
                               torch.nn.functional.silu(torch.nn.functional.group_norm(
                                   x + shift[:, :, None, None], groups, weight, bias)))


def test_refusals_name_the_argument():
    x, weight, bias, _, _ = _operands((2, 16, 3, 3, 4), True)
    with pytest.raises(ValueError, match="group_norm_silu: groups must divide the 16 channels, got 5"):
        ops.group_norm_silu.default(x, weight, bias, 5, 1e-5)
    with pytest.raises(ValueError, match=r"weight and bias must have shape \[16\]"):
        ops.group_norm_silu.default(x, weight[:8], bias, 4, 1e-5)
    with pytest.raises(TypeError, match="x must be float32, got Half"):
        ops.group_norm_silu.default(x.half(), weight, bias, 4, 1e-5)
    with pytest.raises(ValueError, match=r"shift must have shape \[2, 16\], got \[2, 16, 1, 1\]"):
        ops.group_norm_silu.default(x, weight, bias, 4, 1e-5, torch.zeros(2, 16, 1, 1))


def test_a_mean_far_larger_than_the_spread_does_not_cancel():
    """Values around 1000 with a spread of 1: sums of squares in fp32 would lose the variance."""
    x, weight, bias, grad, groups = _operands((2, 32, 9, 9, 8), True)
    x = x + 1000
    ours = _forward_backward(ops.group_norm_silu.default, x, weight, bias, grad, groups)
    truth = _forward_backward(sk.group_norm_silu_reference, *(t.double() for t in (x, weight, bias, grad)), groups)
    _, mean, rstd = ops.group_norm_silu_forward.default(x, weight, bias, groups, 1e-5)
    var, want_mean = torch.var_mean(x.double().reshape(2, groups, -1), dim=2, unbiased=False)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var + 1e-5), rtol=1e-4, atol=0)
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), ours, truth):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=2e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shifted", [False, True], ids=["no_shift", "shift"])
def test_the_reference_kernels_are_the_compiled_ops(shifted):
    """What a CUDA tensor runs (the ops' pure-torch kernels, cuda_kernels()) gives what the CPU
    kernels give: y, mean, rstd and every gradient, with and without a shift."""
    from sparse_kernels.group_norm_silu import kernels

    x, weight, bias, grad, groups = _operands((2, 32, 6, 5, 8), True)
    shift = _shift(x) if shifted else None
    reference = kernels.cuda_kernels()
    ours = ops.group_norm_silu_forward.default(x, weight, bias, groups, 1e-5, shift)
    theirs = reference["group_norm_silu_forward"](x, weight, bias, groups, 1e-5, shift)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _, mean, rstd = ours
    ours = ops.group_norm_silu_backward.default(grad, x, weight, bias, mean, rstd, groups, shift)
    theirs = reference["group_norm_silu_backward"](grad, x, weight, bias, mean, rstd, groups, shift)
    assert len(ours) == len(theirs) == 4 and ours[3].shape == theirs[3].shape == ((2, 32) if shifted else (0,))
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
