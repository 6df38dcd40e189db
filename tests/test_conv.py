"""bsr_conv2d on both backends against an fp64 masked-dense F.conv2d: forward and gradients."""
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    DEVICES,
    assert_close_to_truth,
    assert_compiled_matches_eager,
    naive_blocks,
    naive_dense_weight,
    random_block_mask,
    use_backend,
)

import sparse_kernels as sk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (batch, Cin, Cout, (H, W), kernel, stride, padding, dilation, block, mask kind, bias)
CASES = [
    (3, 32, 48, (7, 9), 3, 1, 1, 1, 16, "random", True),
    (1, 32, 32, (10, 11), 3, 2, 1, 1, 16, "random", False),
    (3, 32, 32, (7, 9), 3, 1, 2, 2, 16, "random", True),
    (1, 16, 32, (10, 11), 3, 2, 0, 2, 16, "random", True),
    (3, 32, 64, (7, 9), 3, 1, 1, 1, (32, 16), "random", True),
    (1, 64, 64, (6, 5), 3, 1, 1, 1, 32, "random", True),
    (3, 16, 16, (9, 7), (3, 1), (2, 1), (1, 0), (1, 2), 16, "full", True),
    (3, 32, 32, (7, 9), 1, 1, 0, 1, 16, "random", True),  # pointwise: the linear kernels
    (1, 32, 32, (10, 11), 1, 2, 0, 1, 16, "random", True),  # 1x1 strided: the conv kernels
    (3, 32, 32, (10, 11), 1, 1, 1, 1, 16, "one", True),  # 468 pixels, one block: split grad-weight
    (3, 32, 32, (7, 9), 3, 1, 1, 1, 16, "empty", True),
    (1, 32, 48, (7, 9), 3, 1, 1, 1, 16, "full", False),
    (3, 32, 48, (10, 11), 3, 2, 2, 1, 16, "one", False),
]


def _case_id(case):
    batch, cin, cout, hw, k, s, p, d, block, mask, bias = case
    return f"n{batch}-{cin}to{cout}-{hw[0]}x{hw[1]}-k{k}-s{s}-p{p}-d{d}-b{block}-{mask}-{'bias' if bias else 'nobias'}"


def run_conv_case(case, dtype, device, channels_last=False, mask=None, make_x=None):
    """bsr_conv2d forward and backward against fp64 F.conv2d on the masked dense weight.
    ``mask`` replaces the case's mask kind; ``make_x()`` makes the fp32 input."""
    batch, cin, cout, hw, kernel, stride, padding, dilation, block, mask_kind, has_bias = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    bo, bi = (block, block) if isinstance(block, int) else block
    mask = (random_block_mask((cout // bo, cin // bi), mask_kind) if mask is None else mask).to(device)
    layout = sk.BlockSparseLayout.from_block_mask(mask, (bo, bi))
    weight = torch.randn(cout, cin, kh, kw, device=device) / (cin * kh * kw) ** 0.5
    values = sk.from_dense(weight, layout).to(dtype).requires_grad_()
    x = (make_x() if make_x else torch.randn(batch, cin, *hw, device=device)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    bias = torch.randn(cout, device=device, dtype=dtype, requires_grad=True) if has_bias else None

    y = sk.bsr_conv2d(x, values, layout, bias, stride, padding, dilation)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    w64 = naive_dense_weight(values.detach().double(), layout.row_idx, layout.col_idx, layout.grid).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if has_bias else None
    y64 = F.conv2d(x64, w64, b64, stride, padding, dilation)
    y64.backward(grad_y.double())
    assert y.dtype == dtype
    assert_close_to_truth(y, y64, dtype, "forward")
    assert_close_to_truth(x.grad, x64.grad, dtype, "grad_input")
    assert_close_to_truth(values.grad, naive_blocks(w64.grad, layout.row_idx, layout.col_idx, (bo, bi)), dtype, "grad_weight")
    if has_bias:
        assert_close_to_truth(bias.grad, b64.grad, dtype, "grad_bias")
    return y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bsr_conv2d_matches_masked_dense(backend, case, dtype, device, monkeypatch):
    use_backend(monkeypatch, backend, device)
    run_conv_case(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_in_channels_last_out(backend, device, monkeypatch):
    use_backend(monkeypatch, backend, device)
    for case in (CASES[0], CASES[7]):  # 3x3 and pointwise
        y = run_conv_case(case, torch.float32, device, channels_last=True)
        assert y.is_contiguous(memory_format=torch.channels_last)
    y = run_conv_case(CASES[0], torch.float32, device)
    assert y.is_contiguous()


def test_grad_weight_split_over_pixel_chunks(monkeypatch):
    """The split grad-weight (fp32 partial sums per pixel chunk) against the truth."""
    use_backend(monkeypatch, "triton", "cpu")
    import sparse_kernels.triton.conv as conv_kernels

    monkeypatch.setattr(conv_kernels, "_pixel_splits", lambda *args: 3)
    run_conv_case((3, 16, 16, (15, 15), 3, 1, 1, 1, 16, "full", False), torch.float32, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input_and_string_padding(backend, monkeypatch):
    use_backend(monkeypatch, backend, "cpu")
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
def test_opcheck(backend, device, monkeypatch):
    use_backend(monkeypatch, backend, device)
    layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), 16).to(device)
    index = list(layout.tensors())
    x = torch.randn(2, 32, 5, 6, device=device, requires_grad=True)
    values = torch.randn(3, 16, 16, 3, 3, device=device, requires_grad=True)
    bias = torch.randn(32, device=device, requires_grad=True)
    conv = ([2, 1], [1, 1], [1, 2])
    grad_out = torch.randn(2, 32, 3, 4, device=device)
    ops = torch.ops.sparse_kernels
    torch.library.opcheck(ops.bsr_conv2d.default, (x, values, bias, index, *conv))
    torch.library.opcheck(ops.bsr_conv2d.default, (x.contiguous(memory_format=torch.channels_last), values, None, index, *conv))
    torch.library.opcheck(ops.bsr_conv2d_grad_input.default, (grad_out, values.detach(), index, [5, 6], *conv))
    torch.library.opcheck(ops.bsr_conv2d_grad_weight.default, (grad_out, x.detach(), index, [16, 16, 3, 3], *conv))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device, monkeypatch):
    use_backend(monkeypatch, backend, device)
    model = torch.nn.Sequential(
        sk.BlockSparseConv2d(16, 32, 3, padding=1, block_size=16, density=0.5),
        torch.nn.SiLU(),
        sk.BlockSparseConv2d(32, 16, 1, block_size=16, density=0.5),
    ).to(device)
    x = torch.randn(2, 16, 6, 7, device=device)
    assert_compiled_matches_eager(model, x)


def test_ops_refuse_mismatched_channels_when_called_directly():
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(2, 3, dtype=torch.bool), 16)
    index = list(layout.tensors())
    values = torch.randn(6, 16, 16, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1])
    ops = torch.ops.sparse_kernels
    with pytest.raises(ValueError, match=r"x of shape \(1, 32, 5, 5\) must have 48"):
        ops.bsr_conv2d(torch.randn(1, 32, 5, 5), values, None, index, *conv)
    with pytest.raises(ValueError, match=r"grad_out of shape \(1, 48, 5, 5\) must have 32"):
        ops.bsr_conv2d_grad_input(torch.randn(1, 48, 5, 5), values, index, [5, 5], *conv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_input_follows_the_input_memory_format(backend, monkeypatch):
    """Channels-last x gets a channels-last dx, whatever layout the upstream grad has."""
    use_backend(monkeypatch, backend, "cpu")
    conv = sk.BlockSparseConv2d(16, 16, 3, padding=1, block_size=16, density=1.0)
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_y = torch.randn(2, 16, 5, 5)  # NCHW-contiguous
    conv(x).backward(grad_y)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    expected = torch.nn.grad.conv2d_input(x.shape, conv.to_dense().detach(), grad_y, padding=1)
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)
