"""bsr_conv2d on both backends against an fp64 masked-dense F.conv2d: forward and gradients."""
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    CONV_CASES,
    DEVICES,
    assert_close_to_truth,
    conv_case_id,
    assert_compiled_matches_eager,
    naive_blocks,
    naive_dense_weight,
    random_block_mask,
    run_conv_case,
)

import sparse_kernels as sk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bsr_conv2d_matches_masked_dense(backend, case, dtype, device, use_backend):
    use_backend(backend, device)
    run_conv_case(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_in_channels_last_out(backend, device, use_backend):
    use_backend(backend, device)
    for case in (CONV_CASES[0], CONV_CASES[7]):  # 3x3 and pointwise
        y = run_conv_case(case, torch.float32, device, channels_last=True)
        assert y.is_contiguous(memory_format=torch.channels_last)
    y = run_conv_case(CONV_CASES[0], torch.float32, device)
    assert y.is_contiguous()


def test_grad_weight_split_over_pixel_chunks(monkeypatch, use_backend):
    """The split grad-weight (fp32 partial sums per pixel chunk) against the truth."""
    use_backend("triton", "cpu")
    import sparse_kernels.conv2d.triton_kernels as conv2d_kernels

    monkeypatch.setattr(conv2d_kernels, "reduction_splits", lambda *args: 3)
    run_conv_case((3, 16, 16, (15, 15), 3, 1, 1, 1, 16, "full", False), torch.float32, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input_and_string_padding(backend, use_backend):
    use_backend(backend, "cpu")
    layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), 16)
    values = torch.randn(3, 16, 16, 3, 3)
    x = torch.randn(32, 7, 9)
    dense = sk.to_dense(values, layout)
    y = sk.bsr_conv2d(x, values, layout, padding="same")
    torch.testing.assert_close(y, F.conv2d(x, dense, padding="same"), rtol=1e-4, atol=1e-4)
    assert y.shape == (32, 7, 9)
    torch.testing.assert_close(
        sk.bsr_conv2d(x, values, layout, padding="valid", dilation=2), F.conv2d(x, dense, dilation=2), rtol=1e-4, atol=1e-4
    )


# --------------------------------------------------------------------------- bad input
def _operands():
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(2, 2, dtype=torch.bool), 16)
    return torch.randn(2, 32, 8, 8), torch.randn(4, 16, 16, 3, 3), layout


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"groups": 2}, ValueError, "groups=2"),
        ({"x": torch.randn(2, 30, 8, 8)}, ValueError, "30 channels.*32"),
        ({"x": torch.randn(32, 8)}, ValueError, r"\[N, C, H, W\].*\(32, 8\)"),
        ({"x": torch.randn(2, 32, 8, 8).long()}, TypeError, "int64"),
        ({"x": torch.randn(2, 32, 8, 8).half()}, TypeError, "float16"),
        ({"x": torch.randn(2, 32, 8, 8, device="meta")}, ValueError, "meta"),
        ({"values": torch.randn(4, 16, 16)}, ValueError, r"\[nnz, bo, bi, kh, kw\].*\(4, 16, 16\)"),
        ({"values": torch.randn(3, 16, 16, 3, 3)}, ValueError, r"\(3, 16, 16, 3, 3\)"),
        ({"stride": 0}, ValueError, "stride"),
        ({"dilation": (1, 2, 3)}, ValueError, "dilation"),
        ({"padding": -1}, ValueError, "padding"),
        ({"padding": "same", "stride": 2}, ValueError, "stride 1"),
        ({"x": torch.randn(2, 32, 2, 2)}, ValueError, r"\(2, 2\) is too small"),
        ({"bias": torch.randn(31)}, ValueError, r"\(32,\).*\(31,\)"),
    ],
)
def test_bad_input_is_refused(kwargs, error, match):
    x, values, layout = _operands()
    args = {"x": x, "values": values, "layout": layout, **kwargs}
    with pytest.raises(error, match=match):
        sk.bsr_conv2d(**args)


def test_same_padding_that_needs_uneven_padding_is_refused():
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="uneven"):
        sk.bsr_conv2d(torch.randn(1, 16, 5, 5), torch.randn(1, 16, 16, 2, 2), layout, padding="same")


# --------------------------------------------------------------------------- registration
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device, use_backend):
    use_backend(backend, device)
    layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), 16).to(device)
    index = layout.tensors()
    x = torch.randn(2, 32, 5, 6, device=device, requires_grad=True)
    values = torch.randn(3, 16, 16, 3, 3, device=device, requires_grad=True)
    bias = torch.randn(32, device=device, requires_grad=True)
    conv = ([2, 1], [1, 1], [1, 2])
    grad_out = torch.randn(2, 32, 3, 4, device=device)
    ops = sk.registry.ops()
    torch.library.opcheck(ops.bsr_conv2d.default, (x, values, bias, *index, *conv))
    torch.library.opcheck(ops.bsr_conv2d.default, (x, values, bias, *index, *conv, True))
    torch.library.opcheck(ops.bsr_conv2d.default, (x.contiguous(memory_format=torch.channels_last), values, None, *index, *conv))
    torch.library.opcheck(ops.bsr_conv2d_grad_input.default, (grad_out, values.detach(), *index, [5, 6], *conv))
    torch.library.opcheck(ops.bsr_conv2d_grad_weight.default, (grad_out, x.detach(), *index, [16, 16, 3, 3], *conv))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device, use_backend):
    use_backend(backend, device)
    model = torch.nn.Sequential(
        sk.BlockSparseConv2d(16, 32, 3, padding=1, block_size=16, density=0.5),
        torch.nn.SiLU(),
        sk.BlockSparseConv2d(32, 16, 1, block_size=16, density=0.5),
    ).to(device)
    x = torch.randn(2, 16, 6, 7, device=device)
    assert_compiled_matches_eager(model, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_refuse_mismatched_channels_when_called_directly(backend, use_backend):
    use_backend(backend, "cpu")
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(2, 3, dtype=torch.bool), 16)
    index = layout.tensors()
    values = torch.randn(6, 16, 16, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1])
    ops = sk.registry.ops()
    with pytest.raises(ValueError, match=r"x (?=.*1, 32, 5, 5)(?=.*48)"):
        ops.bsr_conv2d(torch.randn(1, 32, 5, 5), values, None, *index, *conv)
    with pytest.raises(ValueError, match=r"grad_out (?=.*1, 48, 5, 5)(?=.*32)"):
        ops.bsr_conv2d_grad_input(torch.randn(1, 48, 5, 5), values, *index, [5, 5], *conv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", [3, 1])
def test_channels_last_flag_gives_channels_last_outputs(backend, kernel, use_backend):
    """As F.conv2d with a channels-last weight: an NCHW input gives a channels-last output
    (diffusers' ResnetBlock2D feeds its shortcut a .contiguous() input)."""
    use_backend(backend, "cpu")
    layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), 16)
    values = torch.randn(3, 16, 16, kernel, kernel, requires_grad=True)
    x = torch.randn(2, 32, 5, 6, requires_grad=True)
    conv = ([1, 1], [kernel // 2] * 2, [1, 1])
    y = sk.registry.ops().bsr_conv2d(x, values, None, *layout.tensors(), *conv, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    expected = F.conv2d(x, sk.to_dense(values, layout), None, *conv)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(expected)
    dx, dv = torch.autograd.grad(y, (x, values), grad)
    dx_ref, dv_ref = torch.autograd.grad(expected, (x, values), grad)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dv, dv_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_input_follows_the_input_memory_format(backend, use_backend):
    """Channels-last x gets a channels-last dx, whatever layout the upstream grad has."""
    use_backend(backend, "cpu")
    conv = sk.BlockSparseConv2d(16, 16, 3, padding=1, block_size=16, density=1.0)
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_y = torch.randn(2, 16, 5, 5)  # NCHW-contiguous
    conv(x).backward(grad_y)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    expected = torch.nn.grad.conv2d_input(x.shape, conv.to_dense().detach(), grad_y, padding=1)
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)
