"""The block-sparse conv2d's op, one folder: ``y = F.conv2d(x, W) + bias`` with ``W [Cout, Cin,
kh, kw]`` block-sparse over channel blocks (``values [nnz, bo, bi, kh, kw]``: a live block
holds all its taps).

One naming chain, from the GPU kernel up to the module:

    _bsr_conv2d_dsd_kernel, _bsr_conv2d_sdd_kernel   triton_kernels.py  @triton.jit implicit-GEMM kernels
      -> bsr_conv2d_fwd, bsr_conv2d_grad_input, bsr_conv2d_grad_weight
                                                     triton_kernels.py  their launchers
      -> kernels registered for the ops sparse_kernels::bsr_conv2d{,_grad_input,_grad_weight}
                                                     kernels.py         Triton for CUDA, fake, reference
      -> bsr_conv2d                                  op.py              the public function
      -> BlockSparseConv2d                           sparse_kernels/nn.py

(1x1 convolutions without stride or padding run on the linear launchers,
:mod:`sparse_kernels.linear.triton_kernels`.) The CPU kernels and the autograd are C++:
csrc/cpu/conv2d.cpp, csrc/autograd.cpp.

The files:

* ``reference.py``: the pure-torch references (masked dense weight + ``F.conv2d`` and its
  gradients), the oracle of every test; imports only the layout.
* ``triton_kernels.py``: the Triton kernels and launchers; imports triton (and nothing that
  needs the compiled extension), so it runs under ``TRITON_INTERPRET=1`` on any machine.
* ``kernels.py``: what Python registers for the ops (``FAKE_KERNELS``, ``REFERENCE_KERNELS``,
  ``cuda_kernels()``: the Triton kernels); :mod:`sparse_kernels.registry` registers them (the
  only place that does).
* ``op.py``: :func:`bsr_conv2d`, exported by the package root (``sparse_kernels.bsr_conv2d``).

This ``__init__`` exports only the references: the registry imports ``kernels.py``, which runs
this file first, and ``op.py`` imports the registry, so exporting ``bsr_conv2d`` here would
close an import circle.
"""
from .reference import bsr_conv2d_grad_input_reference, bsr_conv2d_grad_weight_reference, bsr_conv2d_reference

__all__ = ["bsr_conv2d_grad_input_reference", "bsr_conv2d_grad_weight_reference", "bsr_conv2d_reference"]
