"""The compiled CPU kernels (csrc/cpu): every instruction set against the fp64 truth, larger
random cases (hypothesis), thread counts, dispatch and refusals.

The case grids of test_linear.py and test_conv.py run them too (backend ``compiled``)."""
import pytest
import torch
from helpers import random_block_mask, run_case, use_backend
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conv import CASES as CONV_CASES
from test_conv import run_conv_case
from test_linear import CASES as LINEAR_CASES

import sparse_kernels as sk
from sparse_kernels import compiled, extension

ops = torch.ops.sparse_kernels


def _isas():
    """Every instruction set the kernels have, skipped where this CPU lacks it."""
    params = []
    for name in ("generic", "avx2", "avx512"):
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("SPARSE_KERNELS_CPU_ISA", name)
                compiled.isa()
            params.append(name)
        except (ValueError, RuntimeError) as error:
            params.append(pytest.param(name, marks=pytest.mark.skip(reason=str(error).splitlines()[0])))
    return params


ISAS = _isas()


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", request.param)
    use_backend(monkeypatch, "compiled", "cpu")
    assert compiled.isa() == request.param
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
    with pytest.MonkeyPatch.context() as patch:
        use_backend(patch, "compiled", "cpu")
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
    with pytest.MonkeyPatch.context() as patch:
        use_backend(patch, "compiled", "cpu")
        mask = torch.rand(grid) < density
        case = (batch, 16 * grid[1], 16 * grid[0], hw, kernel, stride, padding, dilation, 16, "given", True)
        run_conv_case(case, torch.float32, "cpu", mask=mask)


def test_non_contiguous_conv_input(monkeypatch):
    use_backend(monkeypatch, "compiled", "cpu")
    wide = torch.randn(2, 64, 9, 20)
    case = (2, 32, 32, (9, 10), 3, 1, 1, 1, 16, "random", True)
    run_conv_case(case, torch.float32, "cpu", make_x=lambda: wide[:, ::2, :, ::2])


def test_thread_count_does_not_change_results(monkeypatch):
    use_backend(monkeypatch, "compiled", "cpu")
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


def test_compiled_backend_is_the_cpu_default(monkeypatch):
    monkeypatch.delenv("SPARSE_KERNELS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert sk.select_backend(torch.device("cpu"), torch.float32, (32, 32)) == "compiled"
    assert sk.select_backend(torch.device("cpu"), torch.bfloat16, (16, 64)) == "compiled"
    assert sk.select_backend(torch.device("cpu"), torch.float32, (8, 32)) == "reference"
    assert sk.select_backend(torch.device("cpu"), torch.float64, (32, 32)) == "reference"
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "reference")
    assert sk.select_backend(torch.device("cpu"), torch.float32, (32, 32)) == "reference"
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "compiled")
    with pytest.raises(ValueError, match="multiple of 16"):
        sk.select_backend(torch.device("cpu"), torch.float32, (24, 32))
    with pytest.raises(ValueError, match="CPU tensors"):
        sk.select_backend(torch.device("cuda"), torch.float32, (32, 32))


def test_the_compiled_kernels_really_run(monkeypatch):
    """Guards the suite's premise: the compiled backend calls the compiled ops."""
    use_backend(monkeypatch, "compiled", "cpu")
    calls = []
    for name in ("bsr_linear_fwd", "bsr_linear_grad_input", "bsr_linear_grad_weight"):
        original = getattr(compiled, name)
        monkeypatch.setattr(compiled, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    layer = sk.BlockSparseLinear(32, 32, block_size=16, density=1.0)
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    assert sorted(calls) == ["bsr_linear_fwd", "bsr_linear_grad_input", "bsr_linear_grad_weight"]
    assert extension.has_kernel("bsr_conv2d_cpu", "cpu")


def _linear_operands(block=16):
    layout = sk.BlockSparseLayout.from_block_mask(random_block_mask((2, 3), "random"), block)
    values = torch.randn(layout.nnz, block, block)
    return layout, values, torch.randn(5, layout.shape[1])


def test_refusals_name_the_problem():
    layout, values, x = _linear_operands()
    row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots = layout.tensors()
    with pytest.raises(TypeError, match="x must be float32"):
        ops.bsr_linear_cpu(x.double(), values, None, row_ptr, row_slots, col_idx)
    with pytest.raises(ValueError, match="multiples of 16"):
        ops.bsr_linear_cpu(x[:, :40], values[:, :, :8], None, row_ptr, row_slots, col_idx)
    with pytest.raises(ValueError, match="bias must have 32 entries"):
        ops.bsr_linear_cpu(x, values, torch.randn(7), row_ptr, row_slots, col_idx)
    bad = col_idx.clone()
    bad[0] = 99
    with pytest.raises(ValueError, match=r"other index\[0\] = 99"):
        ops.bsr_linear_cpu(x, values, None, row_ptr, row_slots, bad)
    twice = col_slots.clone()
    twice[-1] = twice[0]
    if layout.nnz > 1:
        with pytest.raises(ValueError, match="twice"):
            ops.bsr_linear_grad_weight_cpu(torch.randn(5, 32), x, row_idx, col_idx, twice, 16, 16)
    with pytest.raises(TypeError, match="ptr must be int32"):
        ops.bsr_linear_cpu(x, values, None, row_ptr.long(), row_slots, col_idx)
    with pytest.raises(ValueError, match="holds 1"):  # fewer blocks in values than the index lists
        ops.bsr_linear_cpu(x, values[:1], None, row_ptr, row_slots, col_idx)
    one = sk.BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), 16).tensors()
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        ops.bsr_conv2d_cpu(torch.randn(1, 16, 2, 2), torch.randn(1, 16, 16, 3, 3), None, one[2], one[3], one[1],
                           [2, 2], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="empty kernel"):
        ops.bsr_conv2d_cpu(torch.randn(1, 16, 5, 5), torch.randn(1, 16, 16, 0, 3), None, one[2], one[3], one[1],
                           [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="does not fit input size"):
        conv_layout = sk.BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), 16)
        r, c, rp, rs, cp, cs = conv_layout.tensors()
        ops.bsr_conv2d_grad_input_cpu(torch.randn(1, 16, 5, 5), torch.randn(1, 16, 16, 3, 3), cp, cs, r,
                                      [9, 9], [1, 1], [1, 1], [1, 1])


def test_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SPARSE_KERNELS_CPU_ISA must be"):
        compiled.isa()
