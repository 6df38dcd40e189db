"""BlockSparseLinear: construction, from_dense, forward against dense, state_dict."""
import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, naive_blocks

import sparse_kernels as sk


def test_parameters_are_values_and_bias_only():
    layer = sk.BlockSparseLinear(64, 96, block_size=16, density=0.25)
    assert dict(layer.named_parameters()).keys() == {"values", "bias"}
    assert layer.nnz == round(0.25 * 6 * 4) == layer.values.shape[0]
    assert layer.values.shape[1:] == (16, 16)
    assert layer.density == layer.nnz / 24
    assert layer.layout.shape == (96, 64)
    assert "6/24 blocks" in repr(layer)


def test_initial_scale_is_nn_linear_scale():
    layer = sk.BlockSparseLinear(256, 64, block_size=32, density=0.5)
    bound = 1 / 256 ** 0.5
    assert layer.values.abs().max() <= bound and layer.values.abs().max() > 0.9 * bound
    assert layer.bias.abs().max() <= bound


def test_density_rounding_and_limits():
    assert sk.BlockSparseLinear(64, 64, block_size=16, density=0.0).nnz == 0
    assert sk.BlockSparseLinear(64, 64, block_size=16, density=1.0).nnz == 16
    assert sk.BlockSparseLinear(64, 64, block_size=16, density=0.01).nnz == 1
    with pytest.raises(ValueError, match="1.5"):
        sk.BlockSparseLinear(64, 64, block_size=16, density=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_equals_dense_linear_of_to_dense(backend, use_backend):
    use_backend(backend, "cpu")
    layer = sk.BlockSparseLinear(48, 32, block_size=16, density=0.5)
    x = torch.randn(2, 3, 48)
    torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense(), layer.bias), rtol=1e-5, atol=1e-5)


def test_from_dense_keeps_the_largest_blocks():
    linear = torch.nn.Linear(32, 48)  # grid 3 x 2 of 16 x 16 blocks
    with torch.no_grad():
        for r in range(3):
            for c in range(2):
                linear.weight[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] *= 1 + 10 * (r * 2 + c)
    layer = sk.BlockSparseLinear.from_dense(linear, block_size=16, density=0.5)
    expected = torch.tensor([[False, False], [False, True], [True, True]])
    assert torch.equal(layer.layout.block_mask(), expected)
    assert torch.equal(layer.values, naive_blocks(linear.weight, layer.row_idx, layer.col_idx, (16, 16)))
    assert torch.equal(layer.bias, linear.bias)
    x = torch.randn(5, 32)
    mask = expected.repeat_interleave(16, 0).repeat_interleave(16, 1)
    torch.testing.assert_close(layer(x), F.linear(x, linear.weight * mask, linear.bias))


def test_from_dense_ties_go_to_the_lower_block_index():
    linear = torch.nn.Linear(32, 32, bias=False)
    torch.nn.init.ones_(linear.weight)
    layer = sk.BlockSparseLinear.from_dense(linear, block_size=16, density=0.5)
    assert layer.bias is None
    assert torch.equal(layer.layout.block_mask(), torch.tensor([[True, True], [False, False]]))


def test_from_dense_rectangular_block_and_dtype():
    linear = torch.nn.Linear(64, 32).to(torch.float16)
    layer = sk.BlockSparseLinear.from_dense(linear, block_size=(16, 32), density=1.0)
    assert layer.values.dtype == torch.float16 and layer.grid == (2, 2)
    assert torch.equal(layer.to_dense(), linear.weight)


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match=r"block size \(16, 16\).*\(64, 40\)"):
        sk.BlockSparseLinear(40, 64, block_size=16)
    with pytest.raises(ValueError, match=r"\(32, 24\)"):
        sk.BlockSparseLinear.from_dense(torch.nn.Linear(24, 32), block_size=16)
    with pytest.raises(TypeError, match="Conv2d"):
        sk.BlockSparseLinear.from_dense(torch.nn.Conv2d(16, 16, 3), block_size=16)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 2\)"):
        sk.BlockSparseLinear(32, 32, block_size=16, block_mask=torch.ones(3, 2, dtype=torch.bool))


def test_state_dict_round_trip_restores_the_layout():
    torch.manual_seed(1)
    source = sk.BlockSparseLinear(64, 48, block_size=16, density=0.5)
    torch.manual_seed(2)
    target = sk.BlockSparseLinear(64, 48, block_size=16, density=0.5)
    assert not torch.equal(source.layout.block_mask(), target.layout.block_mask())
    state = source.state_dict()
    assert set(state) == {"values", "bias", "row_idx", "col_idx"}
    target.load_state_dict(state)
    for a, b in zip(source.layout.tensors(), target.layout.tensors()):
        assert torch.equal(a, b)
    x = torch.randn(3, 64)
    assert torch.equal(source(x), target(x))


def test_load_state_dict_with_another_block_count():
    source = sk.BlockSparseLinear(64, 48, block_size=16, density=0.75)
    target = sk.BlockSparseLinear(64, 48, block_size=16, density=0.25)
    target.load_state_dict(source.state_dict())
    assert target.nnz == source.nnz
    assert torch.equal(target.layout.block_mask(), source.layout.block_mask())
    x = torch.randn(3, 64)
    assert torch.equal(source(x), target(x))


def test_load_state_dict_refuses_a_corrupt_mask():
    layer = sk.BlockSparseLinear(32, 32, block_size=16, density=0.5)
    state = layer.state_dict()
    state["row_idx"] = torch.zeros_like(state["row_idx"])
    state["col_idx"] = torch.zeros_like(state["col_idx"])
    with pytest.raises(ValueError, match="same block"):
        layer.load_state_dict(state)


def test_module_to_dtype_moves_values_not_index():
    layer = sk.BlockSparseLinear(32, 32, block_size=16, density=0.5).to(torch.float16)
    assert layer.values.dtype == torch.float16 and layer.row_idx.dtype == torch.int32
    assert layer(torch.randn(2, 32, dtype=torch.float16)).dtype == torch.float16


# --------------------------------------------------------------------------- BlockSparseConv2d
def test_conv_module_parameters_and_attributes():
    conv = sk.BlockSparseConv2d(32, 64, 3, stride=2, padding=1, block_size=16, density=0.5)
    assert dict(conv.named_parameters()).keys() == {"values", "bias"}
    assert conv.values.shape == (4, 16, 16, 3, 3) and conv.grid == (4, 2)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 3), (2, 2), (1, 1), (1, 1))
    assert conv.to_dense().shape == (64, 32, 3, 3)
    bound = 1 / (32 * 9) ** 0.5
    assert conv.values.abs().max() <= bound and conv.bias.abs().max() <= bound
    assert "4/8 blocks" in repr(conv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_from_dense_keeps_the_largest_blocks(backend, use_backend):
    use_backend(backend, "cpu")
    dense = torch.nn.Conv2d(32, 32, 3, padding=1, dilation=1)
    with torch.no_grad():
        dense.weight[16:, :16] *= 100  # block (1, 0) is the largest
        dense.weight[:16, 16:] *= 10  # then block (0, 1)
    conv = sk.BlockSparseConv2d.from_dense(dense, block_size=16, density=0.5)
    assert torch.equal(conv.layout.block_mask(), torch.tensor([[False, True], [True, False]]))
    assert torch.equal(conv.values, naive_blocks(dense.weight, conv.row_idx, conv.col_idx, (16, 16)))
    mask = conv.layout.block_mask().repeat_interleave(16, 0).repeat_interleave(16, 1)[:, :, None, None]
    x = torch.randn(2, 32, 6, 5)
    expected = F.conv2d(x, dense.weight * mask, dense.bias, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-4)


def test_conv_from_dense_copies_the_geometry():
    dense = torch.nn.Conv2d(16, 16, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False)
    conv = sk.BlockSparseConv2d.from_dense(dense, block_size=16, density=1.0)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 1), (2, 1), (1, 0), (1, 2))
    assert conv.bias is None
    x = torch.randn(1, 16, 9, 7)
    torch.testing.assert_close(conv(x), dense(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "dense, match",
    [
        (torch.nn.Conv2d(32, 32, 3, groups=2), "groups=2"),
        (torch.nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"), "reflect"),
        (torch.nn.Conv2d(3, 32, 3), r"\(32, 3\)"),
        (torch.nn.Conv2d(32, 40, 3), r"\(40, 32\)"),
    ],
)
def test_conv_from_dense_refuses_what_the_kernels_cannot_take(dense, match):
    with pytest.raises(ValueError, match=match):
        sk.BlockSparseConv2d.from_dense(dense, block_size=16)


def test_conv_constructor_refuses_groups_and_padding_modes():
    with pytest.raises(ValueError, match="groups=4"):
        sk.BlockSparseConv2d(32, 32, 3, groups=4, block_size=16)
    with pytest.raises(ValueError, match="circular"):
        sk.BlockSparseConv2d(32, 32, 3, padding_mode="circular", block_size=16)
    with pytest.raises(TypeError, match="Linear"):
        sk.BlockSparseConv2d.from_dense(torch.nn.Linear(32, 32), block_size=16)


def test_conv_state_dict_round_trip():
    torch.manual_seed(1)
    source = sk.BlockSparseConv2d(32, 32, 3, padding=1, block_size=16, density=0.5)
    torch.manual_seed(2)
    target = sk.BlockSparseConv2d(32, 32, 3, padding=1, block_size=16, density=0.25)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.layout.block_mask(), source.layout.block_mask())
    x = torch.randn(1, 32, 5, 5)
    assert torch.equal(source(x), target(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_follow_autocast(backend, use_backend):
    """Under autocast, fp32 modules run in bf16 and their fp32 parameters get fp32 grads."""
    use_backend(backend, "cpu")
    torch.manual_seed(0)
    linear = sk.BlockSparseLinear(64, 32, block_size=16, density=0.5)
    conv = sk.BlockSparseConv2d(16, 16, 3, padding=1, block_size=16, density=1.0)
    x = torch.randn(4, 64)
    image = torch.randn(1, 16, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x.bfloat16())
        z = conv(image)
    assert y.dtype == z.dtype == torch.bfloat16
    (y.float().sum() + z.float().sum()).backward()
    assert linear.values.grad.dtype == conv.values.grad.dtype == torch.float32
    expected = x @ linear.to_dense().detach().T + linear.bias.detach()
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)


def test_channels_last_model_conversion_keeps_values():
    """model.to(memory_format=torch.channels_last) converts 4-D and 5-D tensors; the 5-D conv
    values have no channels-last form and must come through unchanged (and still train)."""
    model = torch.nn.Sequential(sk.BlockSparseConv2d(32, 32, 3, padding=1, block_size=16, density=0.5))
    before = model[0].values.detach().clone()
    model.to(memory_format=torch.channels_last)
    assert torch.equal(model[0].values, before) and model[0].values.shape == before.shape
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert model[0].values.grad.shape == before.shape


def test_channels_last_conversion_makes_the_conv_return_channels_last():
    """As nn.Conv2d with a channels-last weight: after model.to(channels_last) an NCHW input
    gives a channels-last output; converting back, or moving device/dtype, keeps the rule in step."""
    conv = sk.BlockSparseConv2d(32, 32, 3, padding=1, block_size=16, density=0.5)
    x = torch.randn(2, 32, 6, 6)
    assert conv(x).is_contiguous() and not conv.channels_last
    conv.to(memory_format=torch.channels_last)
    y = conv(x)
    assert conv.channels_last and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    conv.to(torch.float64).to(torch.float32)  # dtype moves preserve the format
    assert conv.channels_last
    conv.to(memory_format=torch.contiguous_format)
    assert not conv.channels_last and conv(x).is_contiguous()
    torch.testing.assert_close(y, conv(x))


@pytest.mark.parametrize("kind", ["linear", "conv", "strided conv"])
def test_masked_dense_path_equals_the_kernels(kind):
    """masked_dense runs dense ops on the scattered weight: same outputs, same gradients, same
    storage (values stay [nnz, ...], slot for slot)."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = sk.BlockSparseLinear(48, 32, block_size=16, density=0.5)
        x = torch.randn(5, 7, 48, requires_grad=True)
    else:
        stride = 2 if kind == "strided conv" else 1
        layer = sk.BlockSparseConv2d(32, 48, 3, stride=stride, padding=1, block_size=16, density=0.5)
        layer.to(memory_format=torch.channels_last)
        x = torch.randn(2, 32, 9, 8, requires_grad=True)
    outputs = []
    for masked in (False, True):
        layer.masked_dense = masked
        x.grad = layer.values.grad = layer.bias.grad = None
        y = layer(x)
        y.square().sum().backward()
        outputs.append((y.detach(), x.grad, layer.values.grad, layer.bias.grad))
    for kernels, masked in zip(*outputs):
        torch.testing.assert_close(masked, kernels, rtol=1e-4, atol=1e-4)
    assert "masked_dense=True" in repr(layer)
    if kind != "linear":
        assert outputs[1][0].is_contiguous(memory_format=torch.channels_last)


def test_a_layer_call_runs_no_python_below_the_module():
    """forward and backward of a module reach the C++ kernels through the dispatcher (one op
    call each way): no Python kernel or autograd.Function on the path."""
    layer = sk.BlockSparseLinear(64, 64, block_size=16, density=0.5)
    x = torch.randn(8, 64, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        layer(x).sum().backward()
    names = [event.name for event in profile.events()]
    assert names.count("sparse_kernels::bsr_linear") == 1
    # The backward node is the C++ autograd function (a Python one would be a PyNode or a
    # GeneratedBackwardFor_... node).
    assert any(name.startswith("torch::autograd::CppNode<sparse_kernels::") for name in names), names
    assert not [name for name in names if "PyNode" in name or "GeneratedBackwardFor" in name], names


def test_a_masked_dense_1x1_conv_gives_its_values_a_gradient_with_their_own_strides():
    """DDP copies gradients into buckets laid out like the parameters and warns when the
    strides differ: a channels-last 1x1 convolution's weight gradient must not leak its
    strides (on the size-1 taps) into the values' gradient."""
    torch.manual_seed(0)
    conv = sk.BlockSparseConv2d(32, 32, 1, block_size=16, density=0.5)
    conv.masked_dense = True
    conv.to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    conv(x).square().sum().backward()
    assert conv.values.grad.stride() == conv.values.stride() == (256, 16, 1, 1, 1)
    values = conv.values.detach().clone().requires_grad_()
    weight = sk.to_dense(values, conv.layout)
    torch.nn.functional.conv2d(x, weight, conv.bias.detach()).square().sum().backward()
    torch.testing.assert_close(conv.values.grad, values.grad)
