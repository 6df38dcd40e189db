"""Block-sparse linear and conv2d layers for sparse training: forward and backward kernels
(C++ for CPUs, Triton for GPUs) behind torch's dispatcher, and mask updates on the device.

    import sparse_kernels as sk
    layout = sk.BlockSparseLayout.from_block_mask(block_mask, block_size=32)
    values = sk.from_dense(weight, layout)          # [nnz, bo, bi]
    y = sk.bsr_linear(x, values, layout, bias)      # x @ to_dense(values, layout).T + bias
    layer = sk.BlockSparseLinear(1024, 1024, block_size=32, density=0.25)
    conv = sk.BlockSparseConv2d(128, 128, 3, padding=1, block_size=32, density=0.25)
"""
from . import backend, extension, masks
from .backend import select_backend
from .layout import BlockSparseLayout, from_dense, to_dense
from .masks import LayerUpdate, block_norms, prune_and_regrow
from .nn import (
    BlockSparseConv2d,
    BlockSparseLinear,
    BlockSparseModule,
    blocks_for_density,
    largest_blocks_mask,
    random_blocks_mask,
)
from .ops.conv2d import bsr_conv2d
from .ops.linear import bsr_linear
from .reference import bsr_conv2d_reference, bsr_linear_reference
from .shapes import BlockSize, normalize_block_size

__all__ = [
    "BlockSize",
    "BlockSparseConv2d",
    "BlockSparseLayout",
    "BlockSparseLinear",
    "BlockSparseModule",
    "LayerUpdate",
    "backend",
    "block_norms",
    "blocks_for_density",
    "bsr_conv2d",
    "bsr_conv2d_reference",
    "bsr_linear",
    "bsr_linear_reference",
    "extension",
    "from_dense",
    "largest_blocks_mask",
    "masks",
    "normalize_block_size",
    "prune_and_regrow",
    "random_blocks_mask",
    "select_backend",
    "to_dense",
]
__version__ = "0.1.0"

backend._install_requested()
