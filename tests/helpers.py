"""Test helpers written independently of the code under test (plain loops over slots)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparse_kernels as sk
from sparse_kernels.backend import triton_interpreting

# Largest error allowed, as a fraction of the largest magnitude of the fp64 truth. The
# kernels accumulate in fp32; these bound the rounding of inputs and outputs per dtype.
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

BACKENDS = ["reference", "triton", "compiled"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def use_backend(monkeypatch, backend: str, device: str) -> None:
    """Forces ``backend`` for the test; skips Triton on CPU when not interpreting and the
    compiled CPU kernels on CUDA. (A build without the CPU kernels fails the compiled
    cases: CI must never skip them silently.)"""
    if backend == "triton" and device == "cpu" and not triton_interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest without CUDA)")
    if backend == "compiled" and device != "cpu":
        pytest.skip("the compiled kernels run on CPU tensors")
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", backend)


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
