"""Sparse-to-sparse training of diffusion models on top of :mod:`sparse_kernels`.

The training layer (``sparsify``, ``Static``, ``RigL``, ``MagRan``), models, datasets and
the command line arrive with their own issues; this package holds nothing yet.
"""
