"""The public block-sparse ops and the kernels registered for them from Python: one module per
op family (``linear``, ``conv``), shared checks and adapters in ``common``."""
from .conv2d import bsr_conv2d
from .linear import bsr_linear

__all__ = ["bsr_conv2d", "bsr_linear"]
