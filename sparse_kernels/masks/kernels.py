"""The kernels of the mask ops that Python registers: fake kernels, the references with the
ops' signatures, and :func:`cuda_kernels`; :mod:`sparse_kernels.registry` registers them.

The ops (schemas in csrc/ops.cpp): ``build_index`` (the layout's index, see
:func:`sparse_kernels.layout.build_index`), ``prune_and_regrow`` and ``block_norms``. Their
kernels are compiled for CPU (csrc/cpu/masks.cpp) and, in a CUDA build, for CUDA
(csrc/cuda/masks.cu); where the build has no CUDA, the references serve CUDA tensors.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .. import extension
from ..layout import BlockSparseLayout, build_index_reference
from .reference import block_norms_reference, prune_and_regrow_reference
from .update import LayerUpdate


# --------------------------------------------------------------------------- fake kernels
def _build_index_fake(row_idx, col_idx, num_rows, num_cols):
    nnz = row_idx.shape[0]
    return row_idx.new_empty(num_rows + 1), row_idx.new_empty(nnz), row_idx.new_empty(num_cols + 1), row_idx.new_empty(nnz)


def _prune_and_regrow_fake(row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, drop_scores, grow_scores,
                           num_rows, num_cols, k, zero_tensors, zero_layer, regrow_dropped=True):
    return torch.empty(len(row_idx), dtype=torch.int64, device=row_idx[0].device if len(row_idx) else "cpu")


def _block_norms_fake(weight, block_out, block_in):
    return weight.new_empty(weight.shape[0] // block_out, weight.shape[1] // block_in, dtype=torch.float32)


FAKE_KERNELS: Dict[str, Callable] = {
    "build_index": _build_index_fake,
    "prune_and_regrow": _prune_and_regrow_fake,
    "block_norms": _block_norms_fake,
}


# --------------------------------------------------------------------------- reference kernels
def prune_and_regrow_op_reference(row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, drop_scores, grow_scores,
                                  num_rows, num_cols, k, zero_tensors, zero_layer, regrow_dropped=True):
    """:func:`~sparse_kernels.masks.reference.prune_and_regrow_reference` with the op's signature
    (lists per layer)."""
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
    """:func:`~sparse_kernels.masks.reference.block_norms_reference` with the op's signature."""
    return block_norms_reference(weight, (block_out, block_in))


# The references as kernels, by op: the reference override and CUDA tensors of an extension
# built without CUDA use them.
REFERENCE_KERNELS: Dict[str, Callable] = {
    "build_index": build_index_op_reference,
    "prune_and_regrow": prune_and_regrow_op_reference,
    "block_norms": block_norms_op_reference,
}


# --------------------------------------------------------------------------- what CUDA runs
def cuda_kernels() -> Dict[str, Callable]:
    """What CUDA tensors run, by op, besides the compiled kernels: the references of the ops the
    build has no CUDA kernel for (:func:`sparse_kernels.extension.has_compiled_kernel`, read off
    the build, not off the dispatcher)."""
    return {name: kernel for name, kernel in REFERENCE_KERNELS.items() if not extension.has_compiled_kernel(name, "cuda")}
