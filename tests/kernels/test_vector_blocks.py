"""Vector blocks, (16, 1) first (also (8, 1) and (32, 1)): bo output channels x one input channel
(x every tap of a convolution). The same contract as square blocks on every kernel path:
forward and both gradients against the fp64 truth, opcheck, torch.compile(fullgraph=True), the
mask ops bit-identical to their references."""
import pytest
import torch
from helpers import (
    BACKENDS,
    DEVICES,
    assert_compiled_matches_eager,
    conv_case_id,
    linear_case_id,
    random_block_mask,
    run_case,
    run_conv_case,
)

import sparse_kernels as sk
from sparse_kernels.masks import LayerUpdate, block_norms_reference, prune_and_regrow_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading dims of x, (bo, bi), grid (R, C), mask kind, bias): grids of many input channels, as
# vector blocks have (a 64-channel layer is 4 x 64 blocks of (16, 1)).
VECTOR_LINEAR_CASES = [
    ((7,), (16, 1), (3, 20), "random", True),
    ((2, 5), (16, 1), (2, 33), "random", False),
    ((37,), (8, 1), (4, 24), "random", True),
    ((5,), (32, 1), (2, 17), "random", True),
    ((6,), (16, 1), (2, 16), "empty", True),
    ((9,), (16, 1), (2, 16), "full", False),
    ((4,), (16, 1), (3, 16), "one", True),
    ((0,), (16, 1), (2, 8), "random", True),
]
# (batch, Cin, Cout, (H, W), kernel, stride, padding, dilation, (bo, bi), mask kind, bias)
VECTOR_CONV_CASES = [
    (3, 24, 32, (7, 9), 3, 1, 1, 1, (16, 1), "random", True),
    (1, 20, 32, (10, 11), 3, 2, 1, 1, (16, 1), "random", False),
    (2, 16, 16, (7, 9), 3, 1, 2, 2, (16, 1), "random", True),
    (3, 24, 32, (7, 9), 1, 1, 0, 1, (16, 1), "random", True),  # pointwise
    (1, 24, 32, (10, 11), 1, 2, 0, 1, (16, 1), "random", True),  # 1x1 strided
    (2, 12, 16, (6, 5), 3, 1, 1, 1, (8, 1), "random", True),
    (2, 10, 32, (6, 5), 3, 1, 1, 1, (32, 1), "full", False),
    (2, 16, 32, (7, 9), 3, 1, 1, 1, (16, 1), "empty", True),
    (3, 16, 32, (10, 11), 3, 2, 2, 1, (16, 1), "one", False),
]


@pytest.fixture
def vector_backend(use_backend):
    """``vector_backend(backend, device)``: as ``use_backend``; Triton skips while its kernels do
    not take vector blocks (they then run on the reference, which the reference backend tests)."""

    def switch(backend, device):
        if backend == "triton" and sk.capability.triton_unsupported_reason(
                torch.device("cuda"), torch.float32, (16, 1)) is not None:
            pytest.skip("the Triton kernels do not take vector blocks yet")
        use_backend(backend, device)

    return switch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VECTOR_LINEAR_CASES, ids=linear_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bsr_linear_with_vector_blocks(backend, case, dtype, device, vector_backend):
    vector_backend(backend, device)
    run_case(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", VECTOR_CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bsr_conv2d_with_vector_blocks(backend, case, dtype, channels_last, device, vector_backend):
    vector_backend(backend, device)
    run_conv_case(case, dtype, device, channels_last=channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_vector_blocks(backend, vector_backend):
    vector_backend(backend, "cpu")
    ops = sk.registry.ops()
    layout = sk.BlockSparseLayout.from_block_mask(random_block_mask((2, 12), "random"), (16, 1))
    index = layout.tensors()
    x = torch.randn(5, 12, requires_grad=True)
    values = torch.randn(layout.nnz, 16, 1, requires_grad=True)
    torch.library.opcheck(ops.bsr_linear.default, (x, values, torch.randn(32), *index))
    conv_values = torch.randn(layout.nnz, 16, 1, 3, 3, requires_grad=True)
    images = torch.randn(2, 12, 6, 5, requires_grad=True)
    conv = ([1, 1], [1, 1], [1, 1])
    torch.library.opcheck(ops.bsr_conv2d.default, (images, conv_values, None, *index, *conv))
    grad_out = torch.randn(2, 32, 6, 5)
    torch.library.opcheck(ops.bsr_conv2d_grad_input.default, (grad_out, conv_values.detach(), *index, [6, 5], *conv))
    torch.library.opcheck(ops.bsr_conv2d_grad_weight.default, (grad_out, images.detach(), *index, [16, 1, 3, 3], *conv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_vector_blocks(backend, vector_backend):
    vector_backend(backend, "cpu")
    model = torch.nn.Sequential(
        sk.BlockSparseConv2d(12, 32, 3, padding=1, block_size=(16, 1), density=0.5),
        torch.nn.SiLU(),
        sk.BlockSparseConv2d(32, 16, 1, block_size=(16, 1), density=0.5),
    )
    assert_compiled_matches_eager(model, torch.randn(2, 12, 6, 5))
    linear = sk.BlockSparseLinear(24, 32, block_size=(16, 1), density=0.25)
    assert_compiled_matches_eager(linear, torch.randn(3, 24))


@pytest.mark.parametrize("block", [(16, 1), (8, 1), (32, 1)], ids=str)
def test_layout_round_trip_and_state_dict_with_vector_blocks(block):
    weight = torch.randn(64, 12, 3, 3)
    conv = sk.BlockSparseConv2d.from_dense(torch.nn.Conv2d(12, 64, 3, bias=False), block_size=block, density=0.4)
    assert conv.values.shape[1:3] == block and conv.layout.grid == (64 // block[0], 12)
    dense = conv.to_dense()
    assert torch.equal(sk.from_dense(dense, conv.layout), conv.values.detach())
    copy = sk.BlockSparseConv2d(12, 64, 3, bias=False, block_size=block, density=0.9)
    copy.load_state_dict(conv.state_dict())
    assert torch.equal(copy.to_dense(), dense) and torch.equal(copy.layout.block_mask(), conv.layout.block_mask())
    norms = sk.block_norms(weight, block)
    assert torch.allclose(norms, block_norms_reference(weight, block), rtol=1e-6, atol=0)


@pytest.mark.parametrize("regrow_dropped", [True, False])
def test_prune_and_regrow_with_vector_blocks_equals_its_reference(regrow_dropped):
    """The compiled mask update, bit for bit the pure-torch one, on layouts of (16, 1) blocks."""
    results = []
    for update in (sk.prune_and_regrow, prune_and_regrow_reference):
        torch.manual_seed(3)
        layers = [sk.BlockSparseLinear(40, 64, block_size=(16, 1), density=0.3),
                  sk.BlockSparseConv2d(24, 32, 3, block_size=(16, 1), density=0.5)]
        updates = []
        for layer in layers:
            drop = layer.values.detach().flatten(1).norm(dim=1)
            grow = torch.rand(layer.layout.grid)
            updates.append(LayerUpdate(layer.layout, drop, grow, 5, [layer.values.data]))
        moved = update(updates, regrow_dropped=regrow_dropped)
        results.append((moved.tolist(), [(layer.row_idx.clone(), layer.col_idx.clone(), layer.values.detach().clone(),
                                          layer.row_ptr.clone(), layer.col_slots.clone()) for layer in layers]))
    (moved, layers), (moved_reference, layers_reference) = results
    assert moved == moved_reference and sum(moved) > 0
    for ours, reference in zip(layers, layers_reference):
        assert all(torch.equal(a, b) for a, b in zip(ours, reference))
