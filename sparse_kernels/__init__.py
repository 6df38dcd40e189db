"""Block-sparse linear and conv2d layers for sparse training: forward and backward kernels
(C++ for CPUs, Triton for GPUs) behind torch's dispatcher, and mask updates on the device.

    import sparse_kernels as sk
    layout = sk.BlockSparseLayout.from_block_mask(block_mask, block_size=32)
    values = sk.from_dense(weight, layout)          # [nnz, bo, bi]
    y = sk.bsr_linear(x, values, layout, bias)      # x @ to_dense(values, layout).T + bias
    layer = sk.BlockSparseLinear(1024, 1024, block_size=32, density=0.25)
    conv = sk.BlockSparseConv2d(128, 128, 3, padding=1, block_size=32, density=0.25)

Importing the package loads no compiled code and registers nothing: the compiled extension
(:mod:`sparse_kernels.extension`) is loaded, and the Python kernels registered
(:mod:`sparse_kernels.registry`), on the first op call. The layout and the Triton kernels
(``sparse_kernels.<op>.triton_kernels``) work without the build.
"""
from . import capability, extension, masks, registry, testing
from .capability import select_backend
from .conv2d.op import bsr_conv2d
from .conv2d.reference import bsr_conv2d_reference
from .group_norm_silu.op import GroupNormSiLU, group_norm_silu
from .group_norm_silu.reference import group_norm_silu_reference
from .layout import BlockSparseLayout, from_dense, to_dense
from .linear.op import bsr_linear
from .linear.reference import bsr_linear_reference
from .masks.op import block_norms, prune_and_regrow
from .masks.update import LayerUpdate
from .nn import (
    BlockSparseConv2d,
    BlockSparseLinear,
    BlockSparseModule,
    blocks_for_density,
    largest_blocks_mask,
    random_blocks_mask,
)
from .shapes import BlockSize, normalize_block_size

__version__ = "0.1.0"

__all__ = [
    "BlockSize",
    "BlockSparseConv2d",
    "BlockSparseLayout",
    "BlockSparseLinear",
    "BlockSparseModule",
    "GroupNormSiLU",
    "LayerUpdate",
    "block_norms",
    "blocks_for_density",
    "bsr_conv2d",
    "bsr_conv2d_reference",
    "bsr_linear",
    "bsr_linear_reference",
    "capability",
    "extension",
    "from_dense",
    "group_norm_silu",
    "group_norm_silu_reference",
    "largest_blocks_mask",
    "masks",
    "normalize_block_size",
    "prune_and_regrow",
    "random_blocks_mask",
    "registry",
    "select_backend",
    "testing",
    "to_dense",
]
