"""``LayerUpdate``: one layer's part of a mask update, shared by the op and its reference.

A leaf of the masks folder: it needs only the layout, so the reference (and the registry,
through it) never import the op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor

from ..layout import BlockSparseLayout

# The index tensors of a layout, in the order the ops take them (BlockSparseLayout.tensors()).
INDEX_NAMES = ("row_idx", "col_idx", "row_ptr", "row_slots", "col_ptr", "col_slots")


@dataclass
class LayerUpdate:
    """One layer's part of a :func:`~sparse_kernels.prune_and_regrow` call.

    Attributes:
        layout: the layer's layout; its ``row_idx``, ``col_idx`` and index tensors are
            rewritten in place (a module's ``layout`` shares the module's buffers).
        drop_scores: ``[nnz]``, one per slot: the smallest are dropped (e.g. block norms of
            the weight).
        grow_scores: ``[R, C]`` (or ``[R * C]``): the largest dead blocks grow (e.g. block
            norms of the dense gradient). Scores at live blocks are ignored.
        k: how many blocks to move (capped as :mod:`sparse_kernels.masks` says).
        zero: tensors with one row per slot (``[nnz, ...]``, contiguous): values and
            optimizer state; the rows of the reused slots are set to zero.
    """

    layout: BlockSparseLayout
    drop_scores: Tensor
    grow_scores: Tensor
    k: int
    zero: Sequence[Tensor] = field(default_factory=list)
