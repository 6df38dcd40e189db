"""Mask updates on the device: the Python face of the compiled mask ops, and their references.

* :func:`prune_and_regrow`: RigL/SET's update for many layers in one call: each layer
  drops its ``k`` live blocks with the smallest drop score, grows the ``k`` blocks with the
  largest grow score among those inactive after the drop (the RigL paper's algorithm: a
  block just dropped may be regrown and keeps its slot; or, as an option, only among the
  blocks dead before), puts the new ones in the freed slots, zeroes those slots in the
  given tensors (values, optimizer state) and rebuilds its index;
* :func:`block_norms`: the Frobenius norm of every block of a dense weight;
* the index build itself is the layout's: :func:`sparse_kernels.layout.build_index`.

The ops are compiled (csrc/cpu/masks.cpp, csrc/cuda/masks.cu) and routed by torch's
dispatcher; each has a pure-torch reference here, the test oracle, which also serves a CUDA
tensor where the extension was built without CUDA. Both give identical results: selections
compare unique keys (score, then flat block index ``row * C + col``), so ties go to the lower
block index; non-finite drop scores are dropped last and a dead block with a non-finite grow
score never grows (a just-dropped one ranks after every finite score). ``k`` is capped at the
live blocks (and, growing only dead blocks, at the dead blocks with a finite score), so nnz
never changes. Freed slots (ascending) take the newly grown blocks (ascending).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from . import extension
from .layout import INDEX_DTYPE, BlockSparseLayout, build_index_reference

_INDEX_NAMES = ("row_idx", "col_idx", "row_ptr", "row_slots", "col_ptr", "col_slots")


# --------------------------------------------------------------------------- prune and regrow
@dataclass
class LayerUpdate:
    """One layer's part of a :func:`prune_and_regrow` call.

    Attributes:
        layout: the layer's layout; its ``row_idx``, ``col_idx`` and index tensors are
            rewritten in place (a module's ``layout`` shares the module's buffers).
        drop_scores: ``[nnz]``, one per slot: the smallest are dropped (e.g. block norms of
            the weight).
        grow_scores: ``[R, C]`` (or ``[R * C]``): the largest dead blocks grow (e.g. block
            norms of the dense gradient). Scores at live blocks are ignored.
        k: how many blocks to move (capped as the module docstring says).
        zero: tensors with one row per slot (``[nnz, ...]``, contiguous): values and
            optimizer state; the rows of the reused slots are set to zero.
    """

    layout: BlockSparseLayout
    drop_scores: Tensor
    grow_scores: Tensor
    k: int
    zero: Sequence[Tensor] = field(default_factory=list)


def _check_update(i: int, update: LayerUpdate) -> Tuple[Tensor, Tensor]:
    """Validates one layer's update; returns its scores as contiguous fp32."""
    layout = update.layout
    nnz, (rows, cols) = layout.nnz, layout.grid
    device = layout.device
    if not isinstance(update.k, int) or update.k < 0:
        raise ValueError(f"layer {i}: k must be a non-negative int, got {update.k!r}")
    scores = []
    for name, t, size in (("drop_scores", update.drop_scores, nnz), ("grow_scores", update.grow_scores, rows * cols)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"layer {i}: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if t.numel() != size:
            raise ValueError(f"layer {i}: {name} must have {size} elements, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"layer {i}: {name} is on {t.device} but the layout is on {device}")
        scores.append(t.detach().reshape(-1).float().contiguous())
    for j, t in enumerate(update.zero):
        if t.dim() < 1 or t.shape[0] != nnz or not t.is_contiguous() or t.device != device:
            raise ValueError(
                f"layer {i}: zero[{j}] must be a contiguous [{nnz}, ...] tensor on {device}, "
                f"got {tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})"
            )
    return scores[0], scores[1]


def prune_and_regrow(updates: Sequence[LayerUpdate], regrow_dropped: bool = True) -> Tensor:
    """Drops and regrows blocks in every layer of ``updates``, in place, in one call.

    Args:
        updates: one per layer.
        regrow_dropped: grow among every block inactive after the drop, the blocks just
            dropped included (the RigL paper's algorithm: a dropped block that is regrown
            keeps its slot, values and state, so fewer than ``k`` may move); ``False``: grow
            only among the blocks dead before the update, so exactly ``k`` move (fewer only
            when fewer dead blocks have a finite grow score).

    Returns:
        int64 ``[len(updates)]``: how many blocks moved in each layer (net: a block dropped
        and regrown did not move), on the layers' device (reading it synchronises; the
        update itself does not). Each layer dropped ``min(k, nnz)`` blocks with
        ``regrow_dropped`` and exactly the moved count without.
    """
    if not updates:
        return torch.zeros(0, dtype=torch.int64)
    device = updates[0].layout.device
    for i, update in enumerate(updates):
        if update.layout.device != device:
            raise ValueError(f"layer {i} is on {update.layout.device}, layer 0 on {device}")
    scores = [_check_update(i, update) for i, update in enumerate(updates)]
    zero = [t for update in updates for t in update.zero]
    zero_layer = [i for i, update in enumerate(updates) for _ in update.zero]
    layouts = [update.layout for update in updates]
    return torch.ops.sparse_kernels.prune_and_regrow(
        *([getattr(layout, name) for layout in layouts] for name in _INDEX_NAMES),
        [drop for drop, _ in scores],
        [grow for _, grow in scores],
        [layout.grid[0] for layout in layouts],
        [layout.grid[1] for layout in layouts],
        [update.k for update in updates],
        zero,
        zero_layer,
        regrow_dropped,
    )


def prune_and_regrow_reference(updates: Sequence[LayerUpdate], regrow_dropped: bool = True) -> Tensor:
    """Pure-torch :func:`prune_and_regrow`: one layer after another, with host syncs."""
    moved = [_update_layer_reference(update, regrow_dropped) for update in updates]
    device = updates[0].layout.device if updates else "cpu"
    return torch.tensor(moved, dtype=torch.int64, device=device)


def _update_layer_reference(update: LayerUpdate, regrow_dropped: bool) -> int:
    layout = update.layout
    (rows, cols), nnz = layout.grid, layout.nnz
    flat = layout.row_idx.long() * cols + layout.col_idx.long()
    live = torch.zeros(rows * cols, dtype=torch.bool, device=layout.device)
    live[flat] = True
    grow = update.grow_scores.detach().reshape(-1).float()
    dead = torch.nonzero(~live & torch.isfinite(grow)).flatten()  # ascending flat index
    drops = min(update.k, nnz) if regrow_dropped else min(update.k, nnz, dead.numel())
    moved = 0
    if drops > 0:
        # Smallest drop score first, non-finite last; ties in ascending flat order.
        drop = update.drop_scores.detach().reshape(-1).float()
        drop = torch.where(torch.isfinite(drop), drop, torch.full_like(drop, math.inf))
        by_flat = torch.argsort(flat, stable=True)
        dropped = by_flat[torch.argsort(drop[by_flat], stable=True)[:drops]]  # slots
        candidates, scores = dead, grow[dead]
        if regrow_dropped:
            # Dropped blocks compete too; a non-finite score ranks after every finite one.
            again = flat[dropped]
            again_scores = torch.where(torch.isfinite(grow[again]), grow[again], torch.full_like(grow[again], -math.inf))
            candidates = torch.cat([candidates, again])
            scores = torch.cat([scores, again_scores])
            order = torch.argsort(candidates)  # ascending flat index, for the tie order
            candidates, scores = candidates[order], scores[order]
        # Largest grow score first; the stable sort keeps ties in ascending flat order.
        grown = candidates[torch.argsort(-scores, stable=True)[:drops]]
        new = grown[~live[grown]].sort().values
        freed = dropped[~torch.isin(flat[dropped], grown)].sort().values
        moved = new.numel()
        layout.row_idx[freed] = (new // cols).to(INDEX_DTYPE)
        layout.col_idx[freed] = (new % cols).to(INDEX_DTYPE)
        with torch.no_grad():
            for t in update.zero:
                t[freed] = 0
    for name, t in zip(_INDEX_NAMES[2:], build_index_reference(layout.row_idx, layout.col_idx, layout.grid)):
        getattr(layout, name).copy_(t)
    return moved


# --------------------------------------------------------------------------- block norms
def block_norms_reference(weight: Tensor, block_size: Tuple[int, int]) -> Tensor:
    """Pure torch: the Frobenius norm of every ``bo x bi`` block (all taps) -> fp32 ``[R, C]``."""
    bo, bi = block_size
    out_features, in_features = weight.shape[:2]
    blocks = weight.detach().float().reshape(out_features // bo, bo, in_features // bi, bi, -1)
    return blocks.pow(2).sum(dim=(1, 3, 4)).sqrt()


def block_norms(weight: Tensor, block_size: Tuple[int, int]) -> Tensor:
    """Frobenius norm of every block of a dense weight ``[out, in, *taps]`` -> fp32 ``[R, C]``.

    Used for RigL's grow scores (the dense gradient's block norms) and for keeping the
    largest blocks of a dense weight.
    """
    bo, bi = block_size
    if weight.dim() < 2 or weight.shape[0] % bo or weight.shape[1] % bi:
        raise ValueError(f"block size {tuple(block_size)} does not divide the weight of shape {tuple(weight.shape)}")
    return torch.ops.sparse_kernels.block_norms(weight.detach(), bo, bi)


# --------------------------------------------------------------------------- registrations
@torch.library.register_fake("sparse_kernels::prune_and_regrow")
def _(row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, drop_scores, grow_scores, num_rows, num_cols,
      k, zero_tensors, zero_layer, regrow_dropped=True):
    return torch.empty(len(row_idx), dtype=torch.int64, device=row_idx[0].device if len(row_idx) else "cpu")


@torch.library.register_fake("sparse_kernels::block_norms")
def _(weight, block_out, block_in):
    return weight.new_empty(weight.shape[0] // block_out, weight.shape[1] // block_in, dtype=torch.float32)


def prune_and_regrow_op_reference(row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, drop_scores, grow_scores,
                                  num_rows, num_cols, k, zero_tensors, zero_layer, regrow_dropped=True):
    """:func:`prune_and_regrow_reference` with the op's signature (lists per layer)."""
    updates = [
        LayerUpdate(BlockSparseLayout((num_rows[i], num_cols[i]), (1, 1), *index), drop_scores[i], grow_scores[i],
                    k[i], [t for t, layer in zip(zero_tensors, zero_layer) if layer == i])
        for i, index in enumerate(zip(row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots))
    ]
    return prune_and_regrow_reference(updates, regrow_dropped) if updates else torch.zeros(0, dtype=torch.int64)


def build_index_op_reference(row_idx, col_idx, num_rows, num_cols):
    """:func:`~sparse_kernels.layout.build_index_reference` with the op's signature."""
    return build_index_reference(row_idx, col_idx, (num_rows, num_cols))


def block_norms_op_reference(weight, block_out, block_in):
    """:func:`block_norms_reference` with the op's signature."""
    return block_norms_reference(weight, (block_out, block_in))


# The references as kernels, by op: the reference override (sparse_kernels.backend) and CUDA
# tensors of an extension built without CUDA use them.
REFERENCE_KERNELS = {
    "build_index": build_index_op_reference,
    "prune_and_regrow": prune_and_regrow_op_reference,
    "block_norms": block_norms_op_reference,
}
for _op, _kernel in REFERENCE_KERNELS.items():
    if not extension.has_compiled_kernel(_op, "cuda"):
        torch.library.register_kernel(f"sparse_kernels::{_op}", "cuda", _kernel)


__all__: List[str] = [
    "LayerUpdate",
    "block_norms",
    "block_norms_reference",
    "prune_and_regrow",
    "prune_and_regrow_reference",
]
