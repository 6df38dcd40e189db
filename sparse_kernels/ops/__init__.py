"""Autograd functions and ``torch.library`` registrations of the block-sparse ops."""
from .linear import bsr_linear

__all__ = ["bsr_linear"]
