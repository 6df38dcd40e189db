"""``prune_and_regrow`` and ``block_norms``: the public mask ops, their checks, and the calls into
the dispatcher. The rules they follow are :mod:`sparse_kernels.masks`'s docstring.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

from ..registry import ops
from .update import INDEX_NAMES, LayerUpdate


# --------------------------------------------------------------------------- prune and regrow
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
    return ops().prune_and_regrow(
        *([getattr(layout, name) for layout in layouts] for name in INDEX_NAMES),
        [drop for drop, _ in scores],
        [grow for _, grow in scores],
        [layout.grid[0] for layout in layouts],
        [layout.grid[1] for layout in layouts],
        [update.k for update in updates],
        zero,
        zero_layer,
        regrow_dropped,
    )


# --------------------------------------------------------------------------- block norms
def block_norms(weight: Tensor, block_size: Tuple[int, int]) -> Tensor:
    """Frobenius norm of every block of a dense weight ``[out, in, *taps]`` -> fp32 ``[R, C]``.

    Used for RigL's grow scores (the dense gradient's block norms) and for keeping the
    largest blocks of a dense weight.
    """
    bo, bi = block_size
    if weight.dim() < 2 or weight.shape[0] % bo or weight.shape[1] % bi:
        raise ValueError(f"block size {tuple(block_size)} does not divide the weight of shape {tuple(weight.shape)}")
    return ops().block_norms(weight.detach(), bo, bi)
