"""Test helpers shared by the kernel and diffusion tests: the runners that check an op
against an fp64 truth built independently of the code under test (plain loops over slots),
and the switch between kernel paths."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import sparse_kernels as sk
from sparse_kernels.capability import triton_interpreting

# Largest error allowed, as a fraction of the largest magnitude of the fp64 truth. The
# kernels accumulate in fp32; these bound the rounding of inputs and outputs per dtype.
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

BACKENDS = ["reference", "triton", "compiled"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class BackendSwitch:
    """``switch(backend, device)`` runs the rest of a test on ``backend``'s kernels for tensors
    on ``device``: ``compiled`` (the C++ kernels, CPU's default), ``triton`` (CUDA's default;
    on CPU the interpreter, through :func:`sparse_kernels.testing.override`) or ``reference``.
    Skips Triton on CPU when not interpreting and the C++ kernels on CUDA. The ``use_backend``
    fixture (conftest) hands one out and restores the defaults after the test."""

    def __init__(self):
        self.stack = contextlib.ExitStack()

    def __call__(self, backend: str, device: str) -> None:
        if backend == "triton" and device == "cpu" and not triton_interpreting():
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest without CUDA)")
        if backend == "compiled" and device != "cpu":
            pytest.skip("the compiled kernels run on CPU tensors")
        if backend == "reference" or (backend == "triton" and device == "cpu"):
            self.stack.enter_context(sk.testing.override(backend))


def _isas():
    """Every instruction set the CPU kernels have, as parameters, skipped where this CPU (or the build) lacks it."""
    from sparse_kernels import extension

    params = []
    for name in ("generic", "avx2", "avx512"):
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("SPARSE_KERNELS_CPU_ISA", name)
                extension.cpu_isa()
            params.append(name)
        except (ValueError, RuntimeError, ImportError) as error:  # ImportError: no build
            params.append(pytest.param(name, marks=pytest.mark.skip(reason=str(error).splitlines()[0])))
    return params


ISAS = _isas()


def naive_dense_weight(values: torch.Tensor, row_idx, col_idx, grid) -> torch.Tensor:
    """Dense [R*bo, C*bi, ...] weight built slot by slot with a Python loop."""
    nnz, bo, bi = values.shape[:3]
    dense = values.new_zeros(grid[0] * bo, grid[1] * bi, *values.shape[3:])
    for slot in range(nnz):
        r, c = int(row_idx[slot]), int(col_idx[slot])
        dense[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = values[slot]
    return dense


def naive_blocks(dense: torch.Tensor, row_idx, col_idx, block_size) -> torch.Tensor:
    """The blocks of ``dense`` at the given slots, read with a Python loop."""
    bo, bi = block_size
    blocks = [
        dense[int(r) * bo:(int(r) + 1) * bo, int(c) * bi:(int(c) + 1) * bi]
        for r, c in zip(row_idx, col_idx)
    ]
    if not blocks:
        return dense.new_zeros(0, bo, bi, *dense.shape[2:])
    return torch.stack(blocks)


def assert_close_to_truth(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Max error over the truth's max magnitude within the dtype's tolerance."""
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = (actual.double() - truth.double()).abs().max().item() if truth.numel() else 0.0
    scale = max(truth.abs().max().item() if truth.numel() else 0.0, 1e-6)
    tolerance = RELATIVE_TOLERANCE[dtype]
    assert error <= tolerance * scale, f"{what}: max error {error:.3e} > {tolerance:.1e} x {scale:.3e}"


def random_block_mask(grid, kind: str) -> torch.Tensor:
    """``random`` (about half), ``empty``, ``full`` or ``one`` (a single live block)."""
    if kind == "random":
        mask = torch.rand(grid) < 0.5
        mask.view(-1)[0] = True  # never empty by chance
        return mask
    if kind == "empty":
        return torch.zeros(grid, dtype=torch.bool)
    if kind == "full":
        return torch.ones(grid, dtype=torch.bool)
    if kind == "one":
        mask = torch.zeros(grid, dtype=torch.bool)
        mask[grid[0] - 1, grid[1] // 2] = True
        return mask
    raise ValueError(kind)


# (leading shape of x, block size, block grid [R, C], mask kind, bias)
LINEAR_CASES = [
    ((7,), 16, (3, 2), "random", True),
    ((3, 5), 32, (2, 3), "random", False),
    ((1,), 64, (2, 1), "random", True),
    ((), 16, (2, 2), "random", True),
    ((2, 1, 3), (16, 32), (3, 2), "random", True),
    ((13,), (32, 16), (2, 3), "random", False),
    ((5,), (16, 64), (2, 2), "random", True),
    ((37,), 16, (4, 3), "random", True),
    ((6,), 32, (2, 3), "empty", True),
    ((6,), 32, (2, 3), "empty", False),
    ((9,), 16, (3, 4), "full", True),
    ((4,), 32, (3, 3), "one", False),
    ((3,), 128, (1, 2), "full", True),
    ((0,), 16, (2, 2), "random", True),
]


def linear_case_id(case):
    lead, block, grid, mask, bias = case
    return f"x{'x'.join(map(str, lead)) or 'scalar'}-b{block}-g{grid[0]}x{grid[1]}-{mask}-{'bias' if bias else 'nobias'}"


def run_case(case, dtype, device, make_x=None, mask=None):
    """Runs bsr_linear forward and backward; checks them against the fp64 truth. ``mask``,
    if given, replaces the case's mask kind."""
    lead, block, grid, mask_kind, has_bias = case
    mask = (random_block_mask(grid, mask_kind) if mask is None else mask).to(device)
    layout = sk.BlockSparseLayout.from_block_mask(mask, block)
    out_features, in_features = layout.shape
    weight = torch.randn(out_features, in_features, device=device)
    values = sk.from_dense(weight, layout).to(dtype).requires_grad_()
    x = (make_x(lead, in_features) if make_x else torch.randn(*lead, in_features, device=device)).to(dtype)
    x.requires_grad_()
    bias = torch.randn(out_features, device=device, dtype=dtype, requires_grad=True) if has_bias else None

    y = sk.bsr_linear(x, values, layout, bias)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    # Truth: fp64 masked dense weight built with a loop, from the same rounded inputs.
    w64 = naive_dense_weight(values.detach().double(), layout.row_idx, layout.col_idx, layout.grid)
    x64, g64 = x.detach().double(), grad_y.double()
    y64 = F.linear(x64, w64, bias.detach().double() if has_bias else None)
    assert y.dtype == dtype and y.shape == (*lead, out_features)
    assert_close_to_truth(y, y64, dtype, "forward")
    assert_close_to_truth(x.grad, g64 @ w64, dtype, "grad_input")
    dense_grad_w = g64.reshape(-1, out_features).T @ x64.reshape(-1, in_features)
    assert_close_to_truth(
        values.grad, naive_blocks(dense_grad_w, layout.row_idx, layout.col_idx, layout.block_size), dtype, "grad_weight"
    )
    if has_bias:
        assert_close_to_truth(bias.grad, g64.reshape(-1, out_features).sum(0), dtype, "grad_bias")


# (batch, Cin, Cout, (H, W), kernel, stride, padding, dilation, block, mask kind, bias)
CONV_CASES = [
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


def conv_case_id(case):
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


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor) -> None:
    """``torch.compile(fullgraph=True, backend="aot_eager")`` traces ``model`` without a
    graph break and gives the eager outputs and parameter gradients."""
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_eager = model(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for compiled_grad, p in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(compiled_grad, p.grad)
