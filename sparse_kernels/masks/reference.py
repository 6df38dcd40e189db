"""Pure-torch references of the mask ops: the oracle of their tests, and the kernels of a CUDA
tensor where the extension was built without CUDA (:mod:`sparse_kernels.masks.kernels`).

:func:`prune_and_regrow_reference` updates one layer after another, with host syncs; it gives
exactly what the compiled op gives (the selection rules are :mod:`sparse_kernels.masks`'s).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

from ..layout import INDEX_DTYPE, build_index_reference
from .update import INDEX_NAMES, LayerUpdate


# --------------------------------------------------------------------------- prune and regrow
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
    for name, t in zip(INDEX_NAMES[2:], build_index_reference(layout.row_idx, layout.col_idx, layout.grid)):
        getattr(layout, name).copy_(t)
    return moved


# --------------------------------------------------------------------------- block norms
def block_norms_reference(weight: Tensor, block_size: Tuple[int, int]) -> Tensor:
    """Pure torch: the Frobenius norm of every ``bo x bi`` block (all taps) -> fp32 ``[R, C]``."""
    bo, bi = block_size
    out_features, in_features = weight.shape[:2]
    blocks = weight.detach().float().reshape(out_features // bo, bo, in_features // bi, bi, -1)
    return blocks.pow(2).sum(dim=(1, 3, 4)).sqrt()
