"""Block-sparse matmul kernels in Triton, forward and backward, for sparse training.

    import sparse_kernels as sk
    layout = sk.BlockSparseLayout.from_block_mask(block_mask, block_size=32)
    values = sk.from_dense(weight, layout)          # [nnz, bo, bi]
    y = sk.bsr_linear(x, values, layout, bias)      # x @ to_dense(values, layout).T + bias
    layer = sk.BlockSparseLinear(1024, 1024, block_size=32, density=0.25)
    conv = sk.BlockSparseConv2d(128, 128, 3, padding=1, block_size=32, density=0.25)
"""
import warnings as _warnings

from . import extension
from .backend import select_backend
from .layout import BlockSparseLayout, from_dense, to_dense
from .nn import BlockSparseConv2d, BlockSparseLinear
from .ops.conv import bsr_conv2d
from .ops.linear import bsr_linear
from .reference import bsr_conv2d_reference, bsr_linear_reference

__all__ = [
    "BlockSparseConv2d",
    "BlockSparseLayout",
    "BlockSparseLinear",
    "bsr_conv2d",
    "bsr_conv2d_reference",
    "bsr_linear",
    "bsr_linear_reference",
    "from_dense",
    "select_backend",
    "to_dense",
]
__version__ = "0.1.0"

if not extension.LOADED:
    _warnings.warn(extension.missing_message(), RuntimeWarning, stacklevel=2)
