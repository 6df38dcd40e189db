"""BlockSparseLayout, from_dense and to_dense against loops written here."""
import pytest
import torch
from helpers import naive_blocks, naive_dense_weight
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_kernels as sk
from sparse_kernels.layout import build_index


@st.composite
def masks(draw):
    rows = draw(st.integers(0, 7))
    cols = draw(st.integers(0, 7))
    bits = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(bits, dtype=torch.bool).reshape(rows, cols)


@settings(max_examples=60, deadline=None)
@given(mask=masks(), bo=st.sampled_from([1, 2, 16]), bi=st.sampled_from([1, 3, 32]))
def test_index_structures_walk_the_mask(mask, bo, bi):
    layout = sk.BlockSparseLayout.from_block_mask(mask, (bo, bi))
    rows, cols = mask.shape
    assert layout.shape == (rows * bo, cols * bi)
    assert layout.nnz == int(mask.sum())
    assert torch.equal(layout.block_mask(), mask)
    for t in layout.tensors():
        assert t.dtype == torch.int32
    # Row-sorted: block-row r owns exactly its live blocks, in column order.
    for r in range(rows):
        slots = layout.row_slots[layout.row_ptr[r]:layout.row_ptr[r + 1]].long()
        assert layout.row_idx[slots].eq(r).all()
        assert layout.col_idx[slots].tolist() == torch.nonzero(mask[r]).flatten().tolist()
    # Column-sorted: block-column c owns exactly its live blocks, in row order.
    for c in range(cols):
        slots = layout.col_slots[layout.col_ptr[c]:layout.col_ptr[c + 1]].long()
        assert layout.col_idx[slots].eq(c).all()
        assert layout.row_idx[slots].tolist() == torch.nonzero(mask[:, c]).flatten().tolist()


def test_from_indices_keeps_the_given_slot_order():
    rows = torch.tensor([2, 0, 1, 0])
    cols = torch.tensor([1, 1, 0, 0])
    layout = sk.BlockSparseLayout.from_indices(rows, cols, (3, 2), 16)
    assert layout.row_idx.tolist() == [2, 0, 1, 0]
    assert layout.col_idx.tolist() == [1, 1, 0, 0]
    assert layout.row_slots.tolist() == [3, 1, 2, 0]  # (0,0) (0,1) (1,0) (2,1)
    assert layout.row_ptr.tolist() == [0, 2, 3, 4]
    assert layout.col_slots.tolist() == [3, 2, 1, 0]  # (0,0) (1,0) (0,1) (2,1)
    assert layout.col_ptr.tolist() == [0, 2, 4]


def test_build_index_matches_layout():
    layout = sk.BlockSparseLayout.from_block_mask(torch.rand(5, 4) < 0.5, 8)
    for built, stored in zip(build_index(layout.row_idx, layout.col_idx, layout.grid), layout.tensors()[2:]):
        assert torch.equal(built, stored)


@pytest.mark.parametrize("taps", [(), (3, 3), (1, 2)])
@pytest.mark.parametrize("block_size", [(2, 3), (4, 4)])
def test_to_dense_and_from_dense_against_loops(taps, block_size):
    mask = torch.rand(3, 4) < 0.5
    layout = sk.BlockSparseLayout.from_block_mask(mask, block_size)
    values = torch.randn(layout.nnz, *block_size, *taps)
    dense = sk.to_dense(values, layout)
    expected = naive_dense_weight(values, layout.row_idx, layout.col_idx, layout.grid)
    assert torch.equal(dense, expected)
    weight = torch.randn(*layout.shape, *taps)
    assert torch.equal(sk.from_dense(weight, layout), naive_blocks(weight, layout.row_idx, layout.col_idx, block_size))
    assert torch.equal(sk.from_dense(dense, layout), values)


def test_to_dense_is_differentiable():
    layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), 2)
    values = torch.randn(3, 2, 2, requires_grad=True)
    weights = torch.randn(4, 4)
    (sk.to_dense(values, layout) * weights).sum().backward()
    assert torch.equal(values.grad, naive_blocks(weights, layout.row_idx, layout.col_idx, (2, 2)))


def test_to_moves_every_index_tensor():
    layout = sk.BlockSparseLayout.from_block_mask(torch.rand(3, 3) < 0.5, 4)
    moved = layout.to("meta")
    assert all(t.device.type == "meta" for t in moved.tensors())
    assert moved.shape == layout.shape and moved.block_size == layout.block_size


def test_density_and_repr():
    layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False, False, False]]), (16, 8))
    assert layout.density == 0.25
    assert "nnz=1/4" in repr(layout) and "(16, 32)" in repr(layout)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: sk.BlockSparseLayout.from_block_mask(torch.ones(2, 2), 4), TypeError, "bool"),
        (lambda: sk.BlockSparseLayout.from_block_mask(torch.ones(2, 2, 2, dtype=torch.bool), 4), ValueError, r"\(2, 2, 2\)"),
        (lambda: sk.BlockSparseLayout.from_block_mask(torch.ones(2, 2, dtype=torch.bool), 0), ValueError, "positive"),
        (lambda: sk.BlockSparseLayout.from_block_mask(torch.ones(2, 2, dtype=torch.bool), (4, 4, 4)), TypeError, "pair"),
        (lambda: sk.BlockSparseLayout.from_indices(torch.tensor([0, 3]), torch.tensor([0, 0]), (3, 1), 4), ValueError, r"row_idx must lie in \[0, 3\)"),
        (lambda: sk.BlockSparseLayout.from_indices(torch.tensor([0, 0]), torch.tensor([1, 1]), (3, 2), 4), ValueError, "same block"),
        (lambda: sk.BlockSparseLayout.from_indices(torch.tensor([0.0]), torch.tensor([0]), (3, 2), 4), TypeError, "float32"),
        (lambda: sk.BlockSparseLayout.from_indices(torch.tensor([0, 1]), torch.tensor([0]), (3, 2), 4), ValueError, "differ in shape"),
    ],
)
def test_bad_layouts_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_from_dense_and_to_dense_refuse_mismatches():
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(2, 3, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match=r"\(8, 11\).*\(8, 12\)"):
        sk.from_dense(torch.randn(8, 11), layout)
    with pytest.raises(ValueError, match=r"\(6, 4, 4\)"):
        sk.to_dense(torch.randn(5, 4, 4), layout)
    with pytest.raises(TypeError, match="int64"):
        sk.to_dense(torch.zeros(6, 4, 4, dtype=torch.long), layout)
    with pytest.raises(ValueError, match="meta"):
        sk.to_dense(torch.zeros(6, 4, 4, device="meta"), layout)
    with pytest.raises(TypeError, match="list"):
        sk.to_dense([[0.0]], layout)
    with pytest.raises(ValueError, match=r"\(6, 16\)"):
        sk.to_dense(torch.zeros(6, 16), layout)
