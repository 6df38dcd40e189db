"""Mask updates on the device: one folder for the mask ops, as for the block-sparse ones.

* :func:`~sparse_kernels.prune_and_regrow`: RigL/SET's update for many layers in one call:
  each layer drops its ``k`` live blocks with the smallest drop score, grows the ``k`` blocks
  with the largest grow score among those inactive after the drop (the RigL paper's
  algorithm: a block just dropped may be regrown and keeps its slot; or, as an option, only
  among the blocks dead before), puts the new ones in the freed slots, zeroes those slots in
  the given tensors (values, optimizer state) and rebuilds its index;
* :func:`~sparse_kernels.block_norms`: the Frobenius norm of every block of a dense weight;
* the index build itself is the layout's: :func:`sparse_kernels.layout.build_index`.

The ops are compiled (csrc/cpu/masks.cpp, csrc/cuda/masks.cu) and routed by torch's
dispatcher; each has a pure-torch reference, the test oracle, which also serves a CUDA tensor
where the extension was built without CUDA. Both give identical results: selections compare
unique keys (score, then flat block index ``row * C + col``), so ties go to the lower block
index; non-finite drop scores are dropped last and a dead block with a non-finite grow score
never grows (a just-dropped one ranks after every finite score). ``k`` is capped at the live
blocks (and, growing only dead blocks, at the dead blocks with a finite score), so nnz never
changes. Freed slots (ascending) take the newly grown blocks (ascending).

The files, from the bottom up:

* ``update.py``: :class:`LayerUpdate`, one layer's part of an update;
* ``reference.py``: :func:`prune_and_regrow_reference`, :func:`block_norms_reference`, pure torch;
* ``kernels.py``: the fake kernels, the references with the ops' signatures, and
  ``cuda_kernels()``, which :mod:`sparse_kernels.registry` registers;
* ``op.py``: the public ``prune_and_regrow`` and ``block_norms`` (checks, then the op through
  :func:`sparse_kernels.registry.ops`); the package root exports them.

This ``__init__`` exports only what sits below the registry (the registry imports
``kernels.py``, which runs this file first): ``from sparse_kernels.masks import LayerUpdate``
works; the ops are ``sparse_kernels.prune_and_regrow`` / ``block_norms``.
"""
from .reference import block_norms_reference, prune_and_regrow_reference
from .update import LayerUpdate

__all__ = ["LayerUpdate", "block_norms_reference", "prune_and_regrow_reference"]
