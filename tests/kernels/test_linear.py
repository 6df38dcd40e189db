"""bsr_linear on every kernel path against an fp64 masked-dense truth: forward and gradients.

The Triton kernels run under the interpreter on CPU (conftest sets TRITON_INTERPRET=1
without CUDA). bf16 tiles are upcast before ``tl.dot`` there, so bf16 is tested too.
"""
import pytest
import torch
from helpers import (
    BACKENDS,
    DEVICES,
    LINEAR_CASES,
    assert_close_to_truth,
    assert_compiled_matches_eager,
    linear_case_id,
    naive_blocks,
    run_case,
)

import sparse_kernels as sk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=linear_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bsr_linear_matches_masked_dense(backend, case, dtype, device, use_backend):
    use_backend(backend, device)
    run_case(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, device, use_backend):
    use_backend(backend, device)
    # x is a transposed view: strides (1, 5) in its 2-D form.
    run_case(((5,), 16, (2, 3), "random", True), torch.float32, device,
             make_x=lambda lead, k: torch.randn(k, *lead, device=device).T)


def test_reference_float64():
    run_case(((4,), 8, (2, 3), "random", True), torch.float64, "cpu")


def test_interpreter_runs_the_triton_kernels(monkeypatch, use_backend):
    """Guards the suite's premise: on CPU the Triton backend really is taken."""
    use_backend("triton", "cpu")
    import sparse_kernels.linear.triton_kernels as kernels

    calls = []
    original = kernels.bsr_linear_fwd
    monkeypatch.setattr(kernels, "bsr_linear_fwd", lambda *a, **k: calls.append(1) or original(*a, **k))
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), 16)
    sk.bsr_linear(torch.randn(2, 16), torch.randn(1, 16, 16), layout)
    assert calls == [1]


def test_backend_selection_describes_the_dispatcher():
    """What select_backend reports, on any host (with or without CUDA, interpreting or not)."""
    assert sk.testing.active_override() is None
    assert sk.select_backend(torch.device("cpu"), torch.float32, (32, 32)) == "compiled"
    assert sk.select_backend(torch.device("cpu"), torch.bfloat16, (16, 64)) == "compiled"
    assert sk.select_backend(torch.device("cpu"), torch.float64, (32, 32)) == "reference"
    assert sk.select_backend(torch.device("cpu"), torch.float32, (24, 32)) == "reference"
    assert sk.select_backend(torch.device("cuda"), torch.float16, (32, 32)) == "triton"
    assert sk.select_backend(torch.device("cuda"), torch.float16, (48, 32)) == "reference"
    with sk.testing.override("reference"):
        assert sk.select_backend(torch.device("cuda"), torch.float16, (32, 32)) == "reference"
        assert sk.select_backend(torch.device("cpu"), torch.float32, (32, 32)) == "reference"
    assert sk.select_backend(torch.device("cpu"), torch.float32, (32, 32)) == "compiled"


def test_the_cpu_kernels_are_compiled_and_routed_by_the_dispatcher():
    """One schema per op, a C++ kernel for CPU and the autograd kernel in C++: no Python
    kernel or routing on the CPU path."""
    for op in ("bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_weight"):
        assert sk.extension.has_compiled_kernel(op, "cpu")
        dump = torch._C._dispatch_dump(f"sparse_kernels::{op}")
        cpu_lines = [line for line in dump.splitlines() if line.startswith("CPU:")]
        # A kernel registered from Python reads "registered at <file>.py:<line>" (or torch's library.py).
        assert cpu_lines and "python" not in cpu_lines[0].lower() and ".cpp:" in cpu_lines[0], dump
    dump = torch._C._dispatch_dump("sparse_kernels::bsr_linear")
    assert any(line.startswith("Autograd[alias]:") and "python" not in line.lower() and ".cpp:" in line
               for line in dump.splitlines()), dump


def test_unsupported_block_falls_back_to_reference():
    run_case(((3,), (8, 24), (2, 2), "random", True), torch.float32, "cpu")


def test_the_reference_override_comes_and_goes(monkeypatch):
    import sparse_kernels.linear.kernels as linear

    calls = []
    original = linear.REFERENCE_KERNELS["bsr_linear"]
    monkeypatch.setitem(linear.REFERENCE_KERNELS, "bsr_linear", lambda *a: calls.append(1) or original(*a))
    x, values, layout = _operands()
    with sk.testing.override("reference"):
        sk.bsr_linear(x, values, layout)
    sk.bsr_linear(x, values, layout)
    assert calls == [1]


# --------------------------------------------------------------------------- bad input
def _operands(block=16, grid=(2, 3)):
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(grid, dtype=torch.bool), block)
    values = torch.randn(layout.nnz, block, block)
    x = torch.randn(4, layout.shape[1])
    return x, values, layout


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda x, v, l, b: (x[:, :-1], v, l, b), ValueError, r"x must have shape \[\.\.\., 48\], got \(4, 47\)"),
        (lambda x, v, l, b: (x, v[:-1], l, b), ValueError, r"\(5, 16, 16\)"),
        (lambda x, v, l, b: (x, v[:, :, :8], l, b), ValueError, r"\(6, 16, 8\)"),
        (lambda x, v, l, b: (x.long(), v, l, b), TypeError, "int64"),
        (lambda x, v, l, b: (x, v.int(), l, b), TypeError, "int32"),
        (lambda x, v, l, b: (x.half(), v, l, b), TypeError, "float16.*float32"),
        (lambda x, v, l, b: (x.to("meta"), v, l, b), ValueError, "meta"),
        (lambda x, v, l, b: (x, v.to("meta"), l, b), ValueError, "meta"),
        (lambda x, v, l, b: (x, v, l, torch.randn(31)), ValueError, r"\(32,\).*\(31,\)"),
        (lambda x, v, l, b: (x, v, l, torch.randn(32).half()), TypeError, "float16"),
        (lambda x, v, l, b: (x, v, l, torch.randn(32, device="meta")), ValueError, "meta"),
        (lambda x, v, l, b: (x, v, "layout", b), TypeError, "BlockSparseLayout"),
        (lambda x, v, l, b: (x.numpy(), v, l, b), TypeError, "ndarray"),
    ],
)
def test_bad_input_is_refused(mutate, error, match):
    x, values, layout = _operands()
    args = mutate(x, values, layout, None)
    with pytest.raises(error, match=match):
        sk.bsr_linear(*args)


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="cutlass"):
        sk.capability.requested_backend()
    with pytest.raises(ValueError, match="cutlass"), sk.testing.override("cutlass"):
        pass


def test_forced_triton_refuses_what_it_cannot_run(use_backend):
    use_backend("triton", "cpu")
    x, values, layout = _operands(block=8)
    with pytest.raises(ValueError, match=r"\(8, 8\).*power of two"):
        sk.bsr_linear(x, values, layout)
    x, values, layout = _operands()
    with pytest.raises(ValueError, match="float64"):
        sk.bsr_linear(x.double(), values.double(), layout)


# --------------------------------------------------------------------------- registration
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device, use_backend):
    use_backend(backend, device)
    layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), 16).to(device)
    index = layout.tensors()
    x = torch.randn(5, 32, device=device, requires_grad=True)
    values = torch.randn(3, 16, 16, device=device, requires_grad=True)
    bias = torch.randn(32, device=device, requires_grad=True)
    grad_out = torch.randn(5, 32, device=device)
    ops = sk.registry.ops()
    torch.library.opcheck(ops.bsr_linear.default, (x, values, bias, *index))
    torch.library.opcheck(ops.bsr_linear.default, (x, values, None, *index))
    torch.library.opcheck(ops.bsr_linear.default, (x.detach().reshape(5, 1, 32), values, None, *index))
    torch.library.opcheck(ops.bsr_linear_grad_input.default, (grad_out, values.detach(), *index))
    torch.library.opcheck(ops.bsr_linear_grad_weight.default, (grad_out, x.detach(), *index, 16, 16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device, use_backend):
    use_backend(backend, device)
    model = torch.nn.Sequential(
        sk.BlockSparseLinear(32, 64, block_size=16, density=0.5),
        torch.nn.GELU(),
        sk.BlockSparseLinear(64, 16, block_size=16, density=0.5),
    ).to(device)
    x = torch.randn(3, 7, 32, device=device)
    assert_compiled_matches_eager(model, x)


# --------------------------------------------------------------------------- strides and flags
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bias_and_values(backend, device, use_backend):
    """The kernels read bias with unit stride and values through their strides."""
    use_backend(backend, device)
    layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), 16).to(device)
    values = torch.randn(3, 16, 16, device=device).transpose(1, 2).contiguous().transpose(1, 2)
    bias = torch.randn(64, device=device)[::2]
    assert not values.is_contiguous() and bias.stride() == (2,)
    x = torch.randn(6, 32, device=device)
    expected = x.double() @ sk.to_dense(values, layout).double().T + bias.double()
    torch.testing.assert_close(sk.bsr_linear(x, values, layout, bias).double(), expected, rtol=1e-5, atol=1e-5)


def test_new_tf32_api_does_not_break_fp32(use_backend):
    """torch >= 2.9 raises on reading ``allow_tf32`` once ``fp32_precision`` was set."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    use_backend("triton", "cpu")
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        layout = sk.BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), 16)
        y = sk.bsr_linear(torch.randn(2, 16), torch.randn(1, 16, 16), layout)
        assert torch.isfinite(y).all()
    finally:
        matmul.fp32_precision = previous


@pytest.mark.gpu
def test_runs_on_a_second_gpu(use_backend):
    """Triton launches on the current device; the launchers must switch to the tensors'."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    use_backend("triton", "cuda")
    run_case(((64,), 32, (4, 4), "random", True), torch.float16, "cuda:1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_refuse_mismatched_features_when_called_directly(backend, use_backend):
    """The ops check their operands against the index (no host sync needed)."""
    use_backend(backend, "cpu")
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(2, 3, dtype=torch.bool), 16)
    index = layout.tensors()
    values = torch.randn(6, 16, 16)
    ops = sk.registry.ops()
    with pytest.raises(ValueError, match=r"x (?=.*4, 32)(?=.*48)"):
        ops.bsr_linear(torch.randn(4, 32), values, None, *index)
    with pytest.raises(ValueError, match=r"grad_out (?=.*4, 48)(?=.*32)"):
        ops.bsr_linear_grad_input(torch.randn(4, 48), values, *index)
    with pytest.raises(ValueError, match=r"x (?=.*4, 32)(?=.*48)"):
        ops.bsr_linear_grad_weight(torch.randn(4, 32), torch.randn(4, 32), *index, 16, 16)


@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_grad_weight_split_over_row_chunks(splits, monkeypatch, use_backend):
    """The Triton grad-weight with its reduction over rows split into chunks (fp32 partial sums
    added in a fixed order) against the fp64 truth, and bit-identical when run again."""
    use_backend("triton", "cpu")
    import sparse_kernels.linear.triton_kernels as linear_kernels

    monkeypatch.setattr(linear_kernels, "reduction_splits", lambda *args: splits)
    torch.manual_seed(3)
    layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False, True], [False, True, True]]), 16)
    x = torch.randn(1100, 48)  # 1100 rows: up to 5 chunks of 256, the last one partial
    grad_out = torch.randn(1100, 32)
    index = (layout.row_idx, layout.col_idx, layout.row_slots)
    first = linear_kernels.bsr_linear_grad_weight(grad_out, x, *index, layout.block_size)
    again = linear_kernels.bsr_linear_grad_weight(grad_out, x, *index, layout.block_size)
    truth = naive_blocks(grad_out.double().T @ x.double(), layout.row_idx, layout.col_idx, layout.block_size)
    assert_close_to_truth(first, truth, torch.float32, f"grad_weight in {splits} chunks")
    assert torch.equal(first, again)


@pytest.mark.parametrize("block", [(16, 16), (16, 1)])
def test_triton_launchers_refuse_a_bad_bias(block):
    """Called directly (as gpu-check does), the launchers check the bias themselves."""
    from sparse_kernels.linear import triton_kernels, triton_vector_kernels

    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(2, 3, dtype=torch.bool), block)
    values, x = torch.randn(layout.nnz, *block), torch.randn(4, layout.shape[1])
    index = (layout.row_ptr, layout.row_slots, layout.col_idx)
    launch = triton_vector_kernels.bsr_linear_vector_fwd if block[1] == 1 else triton_kernels.bsr_linear_fwd
    for bias, match in ((torch.randn(31), r"bias must be \[32\] torch.float32, got \(31,\)"),
                        (torch.randn(32).double(), r"bias must be \[32\] torch.float32, got \(32,\) torch.float64")):
        with pytest.raises(ValueError, match=match):
            launch(x, values, *index, bias)
