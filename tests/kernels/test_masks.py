"""The compiled mask ops (sparse_kernels._C) against their pure-torch references."""
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_kernels as sk
from sparse_kernels import extension
from sparse_kernels.layout import build_index_reference
from sparse_kernels.masks import LayerUpdate, block_norms_reference, prune_and_regrow_reference


def random_layer(grid, nnz, generator, device="cpu"):
    """A layout with ``nnz`` random live blocks in a random slot order."""
    flat = torch.randperm(grid[0] * grid[1], generator=generator)[:nnz]
    return sk.BlockSparseLayout.from_indices(flat // grid[1], flat % grid[1], grid, 4).to(device)


def random_scores(size, kind, generator):
    """``continuous`` scores, ``ties`` (four values), or ``special`` (ties, +-0, nan, +-inf)."""
    if kind == "continuous":
        return torch.randn(size, generator=generator)
    scores = torch.randint(0, 4, (size,), generator=generator).float()
    if kind == "special":
        specials = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0])
        pick = torch.randint(0, 3 * len(specials), (size,), generator=generator)
        scores = torch.where(pick < len(specials), specials[pick.clamp(max=len(specials) - 1)], scores)
    return scores


def make_updates(layer_specs, generator, device="cpu"):
    """LayerUpdates with values [nnz, 2, 3] fp32 and an optimizer state [nnz, 4] bf16."""
    updates = []
    for (grid, nnz, k, kind) in layer_specs:
        layout = random_layer(grid, nnz, generator, device)
        zero = [
            torch.randn(nnz, 2, 3, generator=generator).to(device),
            torch.randn(nnz, 4, generator=generator).to(device=device, dtype=torch.bfloat16),
        ]
        updates.append(LayerUpdate(
            layout,
            random_scores(nnz, kind, generator).to(device),
            random_scores(grid[0] * grid[1], kind, generator).reshape(grid).to(device),
            k,
            zero,
        ))
    return updates


def clone_updates(updates):
    return [
        LayerUpdate(
            sk.BlockSparseLayout(u.layout.grid, u.layout.block_size, *(t.clone() for t in u.layout.tensors())),
            u.drop_scores.clone(), u.grow_scores.clone(), u.k, [t.clone() for t in u.zero],
        )
        for u in updates
    ]


def assert_same_updates(a, b):
    for la, lb in zip(a, b):
        for ta, tb in zip(la.layout.tensors() + tuple(la.zero), lb.layout.tensors() + tuple(lb.zero)):
            assert torch.equal(ta.cpu(), tb.cpu())


@st.composite
def layer_specs(draw):
    specs = []
    for _ in range(draw(st.integers(1, 4))):
        grid = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
        nnz = draw(st.integers(1, grid[0] * grid[1]))
        k = draw(st.integers(0, nnz + 2))  # k above nnz is capped
        specs.append((grid, nnz, k, draw(st.sampled_from(["continuous", "ties", "special"]))))
    return specs


def update_by_definition(update, regrow_dropped):
    """The update as DESIGN.md words it, on Python sets and sorted keys: the live blocks after
    it, and how many blocks are new. Scores sort ascending for drops and descending for
    growth, non-finite last, ties by flat block index."""
    rows, cols = update.layout.grid
    live = [r * cols + c for r, c in zip(update.layout.row_idx.tolist(), update.layout.col_idx.tolist())]
    drop = dict(zip(live, update.drop_scores.flatten().tolist()))
    grow = update.grow_scores.flatten().tolist()
    dead = [b for b in range(rows * cols) if b not in drop and math.isfinite(grow[b])]
    k = min(update.k, len(live)) if regrow_dropped else min(update.k, len(live), len(dead))
    dropped = sorted(live, key=lambda b: ((0, drop[b]) if math.isfinite(drop[b]) else (1, 0), b))[:k]
    candidates = dead + (dropped if regrow_dropped else [])
    grown = sorted(candidates, key=lambda b: ((0, -grow[b]) if math.isfinite(grow[b]) else (1, 0), b))[:k]
    after = (set(live) - set(dropped)) | set(grown)
    return after, len(after - set(live))


# --------------------------------------------------------------------------- equality
@settings(max_examples=60, deadline=None)
@given(specs=layer_specs(), seed=st.integers(0, 2**31 - 1), regrow_dropped=st.booleans())
def test_compiled_prune_and_regrow_equals_reference(specs, seed, regrow_dropped):
    updates = make_updates(specs, torch.Generator().manual_seed(seed))
    reference = clone_updates(updates)
    moved = sk.prune_and_regrow(updates, regrow_dropped=regrow_dropped)
    expected = prune_and_regrow_reference(reference, regrow_dropped=regrow_dropped)
    assert moved.tolist() == expected.tolist()
    assert_same_updates(updates, reference)


@settings(max_examples=60, deadline=None)
@given(specs=layer_specs(), seed=st.integers(0, 2**31 - 1), regrow_dropped=st.booleans())
def test_prune_and_regrow_follows_its_definition(specs, seed, regrow_dropped):
    """The compiled op against the definition: the live set after the update, the net count,
    kept slots unchanged (a regrown block keeps its values) and the reused slots zeroed."""
    updates = make_updates(specs, torch.Generator().manual_seed(seed))
    before = clone_updates(updates)
    moved = sk.prune_and_regrow(updates, regrow_dropped=regrow_dropped).tolist()
    for update, old, count in zip(updates, before, moved):
        after, new = update_by_definition(old, regrow_dropped)
        cols = update.layout.grid[1]
        flat = (update.layout.row_idx.long() * cols + update.layout.col_idx.long()).tolist()
        old_flat = (old.layout.row_idx.long() * cols + old.layout.col_idx.long()).tolist()
        assert set(flat) == after and len(flat) == len(after) and count == new
        kept = torch.tensor([a == b for a, b in zip(flat, old_flat)])
        for t, t_old in zip(update.zero, old.zero):
            assert torch.equal(t[kept], t_old[kept]) and not t[~kept].any()


@settings(max_examples=60, deadline=None)
@given(grid=st.tuples(st.integers(0, 64), st.integers(0, 64)), density=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_compiled_build_index_equals_reference(grid, density, seed):
    nnz = round(density * grid[0] * grid[1])
    layout = random_layer(grid, nnz, torch.Generator().manual_seed(seed))
    compiled = sk.registry.ops().build_index(layout.row_idx, layout.col_idx, *grid)
    for got, expected in zip(compiled, build_index_reference(layout.row_idx, layout.col_idx, grid)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape, block", [((64, 96), (16, 32)), ((32, 48, 3, 3), (16, 16)), ((7, 5), (7, 1))])
def test_compiled_block_norms_equals_reference(shape, block, dtype):
    weight = torch.randn(shape).to(dtype)
    compiled = sk.block_norms(weight, block)
    expected = block_norms_reference(weight, block)
    assert compiled.dtype == torch.float32 and compiled.shape == expected.shape
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_a_dropped_block_with_a_top_grow_score_is_regrown_in_place(backend, use_backend):
    """The RigL paper's update (the default): growth competes among every block inactive after
    the drop, so a just-dropped block can come back; it keeps its slot and its values."""
    use_backend(backend, "cpu")
    # Grid 2 x 3; live blocks (0,0) (0,2) (1,1) in slots 0 1 2.
    layout = sk.BlockSparseLayout.from_indices(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), (2, 3), 4)
    values = torch.arange(1.0, 4.0).reshape(3, 1).repeat(1, 5)
    drop = torch.tensor([0.1, 0.2, 0.9])  # k = 2 drops (0,0) and (0,2)
    grow = torch.tensor([[8.0, 7.0, math.inf], [6.0, 0.0, 5.0]])  # (0,0) is the best; (0,2) not finite
    moved = sk.prune_and_regrow([LayerUpdate(layout, drop, grow, 2, [values])])
    # Grown: (0,0) again (8) and (0,1) (7). (0,0) keeps slot 0 and its values; (0,1) takes
    # the freed slot 1, zeroed: one block moved, two were dropped.
    assert moved.tolist() == [1]
    assert layout.row_idx.tolist() == [0, 0, 1] and layout.col_idx.tolist() == [0, 1, 1]
    assert values[:, 0].tolist() == [1.0, 0.0, 3.0]
    # A just-dropped block with a non-finite score ranks after every finite one: with no dead
    # block to grow, the dropped blocks come back and nothing moves.
    full = sk.BlockSparseLayout.from_indices(torch.tensor([0, 1]), torch.tensor([0, 0]), (2, 1), 4)
    moved = sk.prune_and_regrow([LayerUpdate(full, torch.zeros(2), torch.tensor([math.nan, 1.0]), 2, [])])
    assert moved.tolist() == [0] and full.row_idx.tolist() == [0, 1]
    # Growing only among blocks dead before the update, (0,0) cannot come back.
    layout = sk.BlockSparseLayout.from_indices(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), (2, 3), 4)
    moved = sk.prune_and_regrow([LayerUpdate(layout, drop, grow, 2, [])], regrow_dropped=False)
    assert moved.tolist() == [2]
    assert layout.row_idx.tolist() == [0, 1, 1] and layout.col_idx.tolist() == [1, 0, 1]


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_prune_and_regrow_picks_the_documented_blocks(backend, use_backend):
    """Growing only among the blocks dead before the update: exactly k move."""
    use_backend(backend, "cpu")
    # Grid 2 x 3; live blocks (0,0) (0,2) (1,1) in slots 0 1 2.
    layout = sk.BlockSparseLayout.from_indices(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), (2, 3), 4)
    values = torch.arange(1.0, 4.0).reshape(3, 1).repeat(1, 5)
    drop = torch.tensor([1.0, 1.0, 0.5])  # slot 2 first, then the tie: (0,0) before (0,2)
    grow = torch.tensor([[9.0, 7.0, 9.0], [7.0, 9.0, math.nan]])  # dead: (0,1)=7 (1,0)=7 (1,2)=nan
    moved = sk.prune_and_regrow([LayerUpdate(layout, drop, grow, 2, [values])], regrow_dropped=False)
    assert moved.tolist() == [2]
    # Dropped slots 0 and 2 (ascending) take grown blocks (0,1) and (1,0) (ascending flat).
    assert layout.row_idx.tolist() == [0, 0, 1] and layout.col_idx.tolist() == [1, 2, 0]
    assert values[:, 0].tolist() == [0.0, 2.0, 0.0]
    # k = 3 is capped at the two growable dead blocks (0,0) and (1,1); (1,2) has a nan score.
    # All drop scores tie: the lowest flat blocks (0,1) and (0,2), in slots 0 and 1, go.
    moved = sk.prune_and_regrow([LayerUpdate(layout, torch.zeros(3), grow, 3, [values])], regrow_dropped=False)
    assert moved.tolist() == [2]
    assert layout.row_idx.tolist() == [0, 1, 1] and layout.col_idx.tolist() == [0, 1, 0]


@pytest.mark.parametrize("regrow_dropped", [True, False])
def test_many_updates_keep_the_invariants(regrow_dropped):
    """1,000 random updates of three layers with the compiled op."""
    generator = torch.Generator().manual_seed(0)
    specs = [((8, 8), 16, 0, "continuous"), ((5, 7), 35, 0, "ties"), ((16, 4), 1, 0, "special")]
    updates = make_updates(specs, generator)
    for step in range(1000):
        before = [(u.layout.row_idx.clone(), u.layout.col_idx.clone(), [t.clone() for t in u.zero]) for u in updates]
        for (grid, nnz, _, kind), u in zip(specs, updates):
            u.k = int(torch.randint(0, nnz + 1, (1,), generator=generator))
            u.drop_scores = random_scores(nnz, kind, generator)
            u.grow_scores = random_scores(grid[0] * grid[1], kind, generator)
        moved = sk.prune_and_regrow(updates, regrow_dropped=regrow_dropped)
        for (grid, nnz, _, _), u, (rows, cols, tensors), m in zip(specs, updates, before, moved.tolist()):
            layout = u.layout
            assert layout.nnz == nnz
            flat = layout.row_idx.long() * grid[1] + layout.col_idx.long()
            assert flat.unique().numel() == nnz, f"step {step}: a block sits in two slots"
            for got, expected in zip(layout.tensors()[2:], build_index_reference(layout.row_idx, layout.col_idx, grid)):
                assert torch.equal(got, expected), f"step {step}: index out of date"
            changed = (layout.row_idx != rows) | (layout.col_idx != cols)
            assert int(changed.sum()) == m <= u.k
            for t, old in zip(u.zero, tensors):
                reused = t[changed]
                assert torch.equal(reused, torch.zeros_like(reused)), f"step {step}: a reused slot is not zero"
                assert torch.equal(t[~changed], old[~changed]), f"step {step}: an untouched slot changed"
                t[changed] = torch.randn(t[changed].shape, generator=generator).to(t.dtype)  # non-zero again


def test_index_of_a_module_follows_an_update():
    layer = sk.BlockSparseLinear(64, 64, block_size=16, density=0.5)
    layout = layer.layout
    sk.prune_and_regrow([LayerUpdate(layout, torch.rand(layer.nnz), torch.rand(4, 4), 3, [layer.values])])
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    assert torch.equal(layer.row_idx, layout.row_idx)  # the module's buffers were updated in place


# --------------------------------------------------------------------------- registration
def test_opcheck():
    generator = torch.Generator().manual_seed(0)
    layout = random_layer((6, 5), 12, generator)
    torch.library.opcheck(sk.registry.ops().build_index.default, (layout.row_idx, layout.col_idx, 6, 5))
    torch.library.opcheck(sk.registry.ops().block_norms.default, (torch.randn(12, 10, 3, 3), 4, 2))
    (u,) = make_updates([((6, 5), 12, 3, "ties")], generator)
    index = [[t] for t in u.layout.tensors()]
    torch.library.opcheck(
        sk.registry.ops().prune_and_regrow.default,
        (*index, [u.drop_scores], [u.grow_scores.reshape(-1)], [6], [5], [3], list(u.zero), [0, 0]),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    torch.library.opcheck(
        sk.registry.ops().prune_and_regrow.default,
        (*index, [u.drop_scores], [u.grow_scores.reshape(-1)], [6], [5], [3], list(u.zero), [0, 0], False),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_a_cuda_build_registers_every_op_for_cuda():
    """A CUDA build of torch with nvcc present must not silently build CPU-only kernels."""
    if torch.version.cuda is None or os.environ.get("SPARSE_KERNELS_NO_CUDA") == "1":
        pytest.skip("torch is a CPU build (or CUDA was switched off)")
    for op in extension.MASK_OPS:
        assert extension.has_compiled_kernel(op, "cuda"), f"{op} has no compiled CUDA kernel"
    assert extension.build_info()["devices"] == "cpu,cuda"
    sk.registry.ops()  # with every Python registration made, the CUDA kernels are still the C++ ones
    for op in extension.MASK_OPS:
        dump = torch._C._dispatch_dump(f"sparse_kernels::{op}")
        cuda_lines = [line for line in dump.splitlines() if line.startswith("CUDA:")]
        assert cuda_lines and "python" not in cuda_lines[0].lower() and ".cu:" in cuda_lines[0], dump


def test_a_missing_extension_is_refused_with_the_fix():
    """The ops live in the compiled extension: without it the package still imports, and the
    first op call says so, and how to build it, in one line (not a missing-op error later)."""
    code = (
        "import sys, torch\n"
        "sys.modules['sparse_kernels._C'] = None\n"
        "import sparse_kernels as sk\n"
        "layout = sk.BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), 16)\n"
        "try:\n"
        "    sk.bsr_linear(torch.randn(2, 16), torch.randn(1, 16, 16), layout)\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error, sep=': ')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("ExtensionNotBuiltError: sparse_kernels: the compiled extension sparse_kernels._C")
    assert "pip install --no-build-isolation" in line


# --------------------------------------------------------------------------- bad input
def _one_update(**changes):
    layout = sk.BlockSparseLayout.from_block_mask(torch.eye(3, dtype=torch.bool), 4)
    fields = {"layout": layout, "drop_scores": torch.zeros(3), "grow_scores": torch.ones(3, 3), "k": 1, "zero": []}
    fields.update(changes)
    return LayerUpdate(**fields)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"drop_scores": torch.zeros(4)}, ValueError, r"drop_scores must have 3 elements, got shape \(4,\)"),
        ({"grow_scores": torch.ones(3, 4)}, ValueError, r"grow_scores must have 9 elements"),
        ({"drop_scores": torch.zeros(3, dtype=torch.long)}, TypeError, "drop_scores"),
        ({"k": -1}, ValueError, "k must be a non-negative int"),
        ({"zero": [torch.zeros(2, 5)]}, ValueError, r"zero\[0\] must be a contiguous \[3, \.\.\.\]"),
        ({"zero": [torch.zeros(5, 3).T]}, ValueError, r"contiguous: False"),
        ({"grow_scores": torch.ones(3, 3, device="meta")}, ValueError, "meta"),
    ],
)
def test_bad_updates_are_refused(changes, error, match):
    with pytest.raises(error, match=match):
        sk.prune_and_regrow([_one_update(**changes)])


def test_the_compiled_op_checks_its_lists():
    ops = sk.registry.ops()
    empty = [[] for _ in range(6)]
    with pytest.raises(ValueError, match="no layers"):  # once a segfault (zero_layer out of range)
        ops.prune_and_regrow(*empty, [], [], [], [], [], [torch.zeros(2)], [1000])
    layout = sk.BlockSparseLayout.from_block_mask(torch.eye(2, dtype=torch.bool), 4)
    index = [[t] for t in layout.tensors()]
    with pytest.raises(ValueError, match="not a layer index"):
        ops.prune_and_regrow(*index, [torch.zeros(2)], [torch.zeros(4)], [2], [2], [1], [torch.zeros(2)], [3])
    with pytest.raises(ValueError, match="every per-layer list"):
        ops.prune_and_regrow(*index, [torch.zeros(2)], [], [2], [2], [1], [], [])


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("regrow_dropped", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_cuda_equals_cpu_bit_for_bit(seed, regrow_dropped):
    generator = torch.Generator().manual_seed(seed)
    specs = [((64, 64), 1024, 300, "continuous"), ((32, 16), 128, 60, "ties"), ((7, 9), 20, 25, "special"),
             ((128, 128), 4096, 1200, "ties"), ((1, 1), 1, 1, "continuous")]
    cpu = make_updates(specs, generator)
    cuda = [LayerUpdate(sk.BlockSparseLayout(u.layout.grid, u.layout.block_size, *(t.cuda() for t in u.layout.tensors())),
                        u.drop_scores.cuda(), u.grow_scores.cuda(), u.k, [t.cuda() for t in u.zero]) for u in cpu]
    assert (sk.prune_and_regrow(cuda, regrow_dropped).tolist()
            == sk.prune_and_regrow(cpu, regrow_dropped).tolist())
    assert_same_updates(cuda, cpu)
    for u in cuda:
        rebuilt = sk.registry.ops().build_index(u.layout.row_idx, u.layout.col_idx, *u.layout.grid)
        for got, expected in zip(rebuilt, build_index_reference(u.layout.row_idx.cpu(), u.layout.col_idx.cpu(), u.layout.grid)):
            assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
def test_cuda_block_norms():
    weight = torch.randn(256, 128, 3, 3, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(sk.block_norms(weight, (32, 32)).cpu(), block_norms_reference(weight.cpu(), (32, 32)),
                               rtol=1e-4, atol=1e-4)
