"""The compiled CPU kernels (csrc/cpu): every instruction set against the fp64 truth, larger
random cases (hypothesis), thread counts, the tiling paths, dispatch and refusals.

The case grids of test_linear.py and test_conv2d.py run them too (backend ``compiled``)."""
import pytest
import torch
import torch.nn.functional as F
from helpers import CONV_CASES, ISAS, LINEAR_CASES, random_block_mask, run_case, run_conv_case
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_kernels as sk
from sparse_kernels import extension

ops = sk.registry.ops()


@pytest.fixture
def isa(request, monkeypatch, use_backend):
    monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", request.param)
    use_backend("compiled", "cpu")
    assert extension.cpu_isa() == request.param
    return request.param


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_on_every_isa(isa, case):
    run_case(case, torch.float32, "cpu")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_on_every_isa(isa, case):
    run_conv_case(case, torch.float32, "cpu")


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 150),
    grid=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    block=st.tuples(st.sampled_from([16, 32, 48, 64]), st.sampled_from([16, 32, 48, 64])),
    density=st.floats(0.0, 1.0),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_random_cases(rows, grid, block, density, bias, seed):
    torch.manual_seed(seed)
    mask = torch.rand(grid) < density
    run_case(((rows,), block, grid, "given", bias), torch.float32, "cpu", mask=mask)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    hw=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    grid=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_conv_random_cases(batch, hw, grid, kernel, stride, padding, dilation, density, seed):
    extent = [dilation * (k - 1) + 1 for k in kernel]
    if any(size + 2 * padding < e for size, e in zip(hw, extent)):
        return  # no output pixel
    torch.manual_seed(seed)
    mask = torch.rand(grid) < density
    case = (batch, 16 * grid[1], 16 * grid[0], hw, kernel, stride, padding, dilation, 16, "given", True)
    run_conv_case(case, torch.float32, "cpu", mask=mask)


@pytest.mark.parametrize("width", [12, 25, 30, 49])
@pytest.mark.parametrize("transposed_stride", [1, 2])
def test_row_segments_and_gathered_tiles(width, transposed_stride):
    """Stride-1 widths of at least 12 pixels run in segments of image rows, narrower ones
    gather every tap, strided grad-inputs gather phase by phase; with padding, dilation and
    several segments per row."""
    for kernel, padding, dilation in ((3, 1, 1), (3, 2, 2), ((1, 3), (0, 1), 1), (5, 2, 1)):
        case = (2, 32, 48, (5, width), kernel, transposed_stride, padding, dilation, 16, "random", True)
        run_conv_case(case, torch.float32, "cpu")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    (3, 2, 1, 1),  # the UNets' downsampling: 1, 2, 2 and 4 taps in the four phases
    (3, 3, 2, 2),  # the dilated taps fall into phases out of order
    ((2, 3), (1, 2), (0, 1), 1),  # strided along one axis only
    (1, 2, 0, 1),  # three of the four phases have no tap: zeros
    (5, 4, 1, 1),  # a stride larger than half the kernel
])
def test_strided_grad_input_phase_by_phase(use_backend, channels_last, kernel, stride, padding, dilation):
    use_backend("compiled", "cpu")
    case = (2, 32, 48, (13, 30), kernel, stride, padding, dilation, 16, "random", True)
    run_conv_case(case, torch.float32, "cpu", channels_last=channels_last)


@pytest.mark.parametrize("size", [(10, 11), (1, 1), (1, 7)], ids=str)  # axes of one pixel: no stride to read
@pytest.mark.parametrize("block_size", [16, (16, 1)], ids=["16x16", "16x1"])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_channel_slice_gradient_is_read_in_place(use_backend, stride, block_size, size):
    """torch.cat's backward hands a convolution a channel slice of a channels-last gradient (here
    from the middle of three, so its pixels are further apart than its channels and it does not
    start at the storage's start): the grad-input and grad-weight kernels read it in place, with no
    copy anywhere; the gradients are those of the fp64 reference."""
    use_backend("compiled", "cpu")
    torch.manual_seed(0)
    layer = sk.BlockSparseConv2d(32, 32, 3, stride=stride, padding=1, block_size=block_size, density=0.5)
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, *size).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    before, after = (torch.randn(2, c, *y.shape[2:]).contiguous(memory_format=torch.channels_last) for c in (16, 8))
    out = torch.cat([before, y, after], 1)
    grad = torch.randn_like(out)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        out.backward(grad)
    copies = [event.name for event in profile.events()
              if event.name in ("aten::copy_", "aten::clone") and event.input_shapes
              and event.input_shapes[0] == list(y.shape)]
    assert not copies, copies
    w64 = layer.to_dense().detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    F.conv2d(x64, w64, layer.bias.detach().double(), stride=stride, padding=1).backward(grad[:, 16:48].double())
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.values.grad, sk.from_dense(w64.grad.float(), layer.layout), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, grad[:, 16:48].sum((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_non_contiguous_conv_input(use_backend):
    use_backend("compiled", "cpu")
    wide = torch.randn(2, 64, 9, 20)
    case = (2, 32, 32, (9, 10), 3, 1, 1, 1, 16, "random", True)
    run_conv_case(case, torch.float32, "cpu", make_x=lambda: wide[:, ::2, :, ::2])


def test_thread_count_does_not_change_results(use_backend):
    use_backend("compiled", "cpu")
    layer = sk.BlockSparseConv2d(64, 64, 3, padding=1, block_size=16, density=0.5)
    x = torch.randn(4, 64, 12, 12, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x.grad = layer.values.grad = None
            y = layer(x)
            y.square().sum().backward()
            results.append((y.detach(), x.grad, layer.values.grad))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)  # each output is summed in one fixed order


def test_the_compiled_kernels_really_run():
    """Guards the suite's premise: a layer's forward and backward on CPU tensors run the C++
    kernels (the profiler sees the ops and no Python kernel underneath)."""
    layer = sk.BlockSparseLinear(32, 32, block_size=16, density=1.0)
    x = torch.randn(3, 32, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        layer(x).sum().backward()
    names = {event.name for event in profile.events()}
    for op in ("bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_weight"):
        assert f"sparse_kernels::{op}" in names, names
    assert all(extension.has_compiled_kernel(op, "cpu") for op in extension.KERNEL_OPS)


def _linear_operands(block=16):
    layout = sk.BlockSparseLayout.from_block_mask(random_block_mask((2, 3), "random"), block)
    values = torch.randn(layout.nnz, block, block)
    return layout, values, torch.randn(5, layout.shape[1])


def test_refusals_name_the_problem():
    layout, values, x = _linear_operands()
    index = layout.tensors()
    row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = index
    with pytest.raises(TypeError, match="x has dtype torch.float64, values torch.float32"):
        ops.bsr_linear(x.double(), values, None, *index)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        ops.bsr_linear(x, values, torch.randn(7), *index)
    bad = col_idx.clone()
    bad[0] = 99
    with pytest.raises(ValueError, match=r"other index\[0\] = 99"):
        ops.bsr_linear(x, values, None, row_idx, bad, row_ptr, row_slots, col_ptr, col_slots)
    twice = col_slots.clone()
    twice[-1] = twice[0]
    if layout.nnz > 1:
        with pytest.raises(ValueError, match="twice"):
            ops.bsr_linear_grad_weight(torch.randn(5, 32), x, row_idx, col_idx, row_ptr, row_slots, col_ptr, twice,
                                       16, 16)
    with pytest.raises(TypeError, match="row_ptr must be int32"):
        ops.bsr_linear(x, values, None, row_idx, col_idx, row_ptr.long(), row_slots, col_ptr, col_slots)
    with pytest.raises(ValueError, match="must have 1 entries"):  # fewer blocks in values than the index lists
        ops.bsr_linear(x, values[:1], None, *index)
    one = sk.BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), 16).tensors()
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        ops.bsr_conv2d(torch.randn(1, 16, 2, 2), torch.randn(1, 16, 16, 3, 3), None, *one, [2, 2], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        ops.bsr_conv2d(torch.randn(1, 16, 5, 5), torch.randn(1, 16, 16, 0, 3), None, *one, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="does not fit input size"):
        ops.bsr_conv2d_grad_input(torch.randn(1, 16, 5, 5), torch.randn(1, 16, 16, 3, 3), *one, [9, 9], [1, 1],
                                  [1, 1], [1, 1])


def test_fp16_and_bf16_are_widened_in_cpp():
    """The CPU kernels take fp16/bf16 operands and return their dtype (computed in fp32)."""
    layout, values, x = _linear_operands()
    for dtype in (torch.float16, torch.bfloat16):
        y = ops.bsr_linear(x.to(dtype), values.to(dtype), None, *layout.tensors())
        expected = x.to(dtype).float() @ sk.to_dense(values.to(dtype).float(), layout).T
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


def test_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SPARSE_KERNELS_CPU_ISA must be"):
        extension.cpu_isa()
