"""Every kernel registered from Python, in one place, and the accessor the ops go through.

The compiled extension (csrc/) defines every op's schema and registers its C++ kernels: CPU for
all, CUDA for the mask ops in a CUDA build, Autograd and Autocast. What Python adds is done here,
by :func:`ops` on its first call (the first op call of the process), in this order:

1. load ``sparse_kernels._C`` (:func:`sparse_kernels.extension.load`: without the build, the
   one-line :class:`~sparse_kernels.extension.ExtensionNotBuiltError`, and nothing registered);
2. each op folder's kernels (its ``kernels.py`` says what they are; this module alone calls
   ``torch.library``), into one library fragment kept for the process: the fake kernels
   (``FAKE_KERNELS``: ``torch.compile``, ``opcheck``) and what CUDA tensors run
   (``cuda_kernels()``): ``linear`` and ``conv2d``: the Triton kernels; ``masks``: the
   references, for the ops the build has no CUDA kernel for (read off
   :func:`~sparse_kernels.extension.build_info`, not the dispatcher); ``group_norm_silu``: the
   references (torch's GroupNorm and SiLU);
3. the process-wide choice ``SPARSE_KERNELS_BACKEND=reference|triton``
   (:func:`~sparse_kernels.capability.requested_backend`, read once, here): the same kernels as
   :func:`sparse_kernels.testing.override` installs, in a second fragment, for good.

Why nothing depends on import order: importing the package registers nothing and loads no
compiled code; every op reaches the ops of ``torch.ops.sparse_kernels`` through :func:`ops`, which
makes the registrations above once (under a lock) before handing them out, whoever calls first
and whatever was imported before. The only other registrations are :func:`install_override`'s,
which first make sure the ones above exist, so that the override's kernels sit over them and go
when its fragment is destroyed. Under ``torch.compile``, a first call met while tracing runs
the registrations eagerly (as ``torch.compiler.assume_constant_result`` marks) instead of
tracing them, so a model compiled before its first eager call works too.
"""
from __future__ import annotations

import threading
import types
import warnings

import torch

from . import capability, extension
from .conv2d import kernels as conv2d_kernels
from .group_norm_silu import kernels as group_norm_silu_kernels
from .linear import kernels as linear_kernels
from .masks import kernels as masks_kernels

OP_FOLDERS = (linear_kernels, conv2d_kernels, masks_kernels, group_norm_silu_kernels)

_lock = threading.Lock()
_ready = False  # set once every registration of the module docstring is made
_libraries = []  # the fragments holding them, kept for the process
# The ops of torch.ops.sparse_kernels (the same OpOverloadPacket objects), filled by _register_once.
# A plain namespace, for the layers' hot path: an attribute of torch.ops costs about 0.4 us (its
# namespaces are module subclasses with a __getattr__), one of this about 20 ns.
_ops = types.SimpleNamespace()


def ops() -> types.SimpleNamespace:
    """The ops of ``torch.ops.sparse_kernels`` (``ops().bsr_linear.default`` is
    ``torch.ops.sparse_kernels.bsr_linear.default``), with the extension loaded and every Python
    registration made (on the first call; later calls cost a flag test). Raises the one-line
    :class:`~sparse_kernels.extension.ExtensionNotBuiltError` without the build."""
    if not _ready:
        _register_once()
    return _ops


def _register_once() -> bool:
    """Makes the registrations of the module docstring, unless made; returns ``True``."""
    global _ready
    with _lock:
        if not _ready:
            extension.load()
            library = torch.library.Library("sparse_kernels", "IMPL")
            try:
                for folder in OP_FOLDERS:
                    for name, kernel in folder.FAKE_KERNELS.items():
                        torch.library.register_fake(f"sparse_kernels::{name}", kernel, lib=library)
                    for name, kernel in folder.cuda_kernels().items():
                        torch.library.register_kernel(f"sparse_kernels::{name}", "cuda", kernel, lib=library)
                process_wide = _process_wide_override()
            except BaseException:
                library._destroy()
                raise
            _libraries.append(library)
            if process_wide is not None:
                _libraries.append(process_wide)
            for name in extension.OPS:
                setattr(_ops, name, getattr(torch.ops.sparse_kernels, name))
            _ready = True
    return True


# Dynamo, meeting a first ops() call while tracing, runs _register_once eagerly and takes its result
# as a constant instead of tracing the registrations (which would break the graph). This is the
# mark torch.compiler.assume_constant_result sets; set directly, since that decorator imports
# torch._dynamo (seconds, and triton) and importing this package must stay light.
_register_once._dynamo_marked_constant = True


def _process_wide_override():
    """The fragment of the ``SPARSE_KERNELS_BACKEND`` choice, or ``None`` for ``auto`` / ``compiled``."""
    requested = capability.requested_backend()
    if requested not in capability.OVERRIDES:
        return None
    _check_override(requested)
    return _override_library(requested)


def install_override(kind: str) -> torch.library.Library:
    """Registers the kernels of override ``kind`` over the defaults, in a new library fragment;
    destroying the fragment (``library._destroy()``) restores the defaults.

    Args:
        kind: ``"reference"``: every op, CPU and CUDA, on its pure-torch reference;
            ``"triton"``: the block-sparse ops of CPU tensors on the Triton kernels (needs
            ``TRITON_INTERPRET=1`` before triton is imported), refusing what they cannot take.
    Used by :func:`sparse_kernels.testing.override`, which also records it for
    :func:`~sparse_kernels.capability.select_backend`.
    """
    _check_override(kind)
    ops()  # the defaults first: the override's kernels go over them
    return _override_library(kind)


def _check_override(kind: str) -> None:
    if kind not in capability.OVERRIDES:
        raise ValueError(f"override must be one of {capability.OVERRIDES}, got {kind!r}")
    if kind == "triton" and not capability.triton_interpreting():
        raise ValueError("the Triton override runs CPU tensors under the interpreter: set TRITON_INTERPRET=1 "
                         "before triton is imported")


def _override_library(kind: str) -> torch.library.Library:
    """A library fragment holding the kernels of override ``kind`` (read from the op folders now)."""
    library = torch.library.Library("sparse_kernels", "IMPL")
    if kind == "reference":
        kernels = {**linear_kernels.REFERENCE_KERNELS, **conv2d_kernels.REFERENCE_KERNELS,
                   **masks_kernels.REFERENCE_KERNELS, **group_norm_silu_kernels.REFERENCE_KERNELS}
        devices = ("cpu", "cuda")
    else:
        kernels = {**linear_kernels.triton_op_kernels(strict=True), **conv2d_kernels.triton_op_kernels(strict=True)}
        devices = ("cpu",)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")  # replacing a kernel is the point
        for name, kernel in kernels.items():
            torch.library.register_kernel(f"sparse_kernels::{name}", devices, kernel, lib=library)
    return library
