"""The block-sparse linear layer's op, one folder: ``y = x @ W.T + bias`` with ``W [out, in]``
block-sparse (``values [nnz, bo, bi]`` over a :class:`~sparse_kernels.BlockSparseLayout`).

One naming chain, from the GPU kernel up to the module:

    _bsr_dsd_kernel, _bsr_sdd_kernel       triton_kernels.py  @triton.jit kernels
      -> bsr_linear_fwd, bsr_linear_grad_input, bsr_linear_grad_weight
                                           triton_kernels.py  their launchers (check, allocate, launch)
      -> kernels registered for the ops sparse_kernels::bsr_linear{,_grad_input,_grad_weight}
                                           kernels.py         Triton for CUDA, fake, reference (op signatures)
      -> bsr_linear                        op.py              the public function (checks, then the op)
      -> BlockSparseLinear                 sparse_kernels/nn.py

(The forward and grad-input share ``_bsr_dsd_kernel``, dense @ block-sparse, walking the
row- or column-sorted index; ``_bsr_sdd_kernel`` is the sampled grad-weight product.) The CPU
kernels and the autograd are C++: csrc/cpu/linear.cpp, csrc/autograd.cpp.

The files:

* ``reference.py``: the pure-torch references (masked dense weight + ``F.linear``), the
  oracle of every test; imports only the layout.
* ``triton_kernels.py``: the Triton kernels and launchers; imports triton (and nothing that
  needs the compiled extension), so it runs under ``TRITON_INTERPRET=1`` on any machine.
* ``kernels.py``: what Python registers for the ops (``FAKE_KERNELS``, ``REFERENCE_KERNELS``,
  ``cuda_kernels()``: the Triton kernels); :mod:`sparse_kernels.registry` registers them (the
  only place that does).
* ``op.py``: :func:`bsr_linear`, exported by the package root (``sparse_kernels.bsr_linear``).

This ``__init__`` exports only the references: the registry imports ``kernels.py``, which runs
this file first, and ``op.py`` imports the registry, so exporting ``bsr_linear`` here would
close an import circle.
"""
from .reference import bsr_linear_grad_input_reference, bsr_linear_grad_weight_reference, bsr_linear_reference

__all__ = ["bsr_linear_grad_input_reference", "bsr_linear_grad_weight_reference", "bsr_linear_reference"]
