"""The test override: the ops on other kernels for the length of a ``with`` block.

    with sparse_kernels.testing.override("reference"):   # every op on its pure-torch reference
        ...
    with sparse_kernels.testing.override("triton"):      # CPU tensors on the Triton kernels,
        ...                                              # under TRITON_INTERPRET=1

That is how the tests run the Triton kernels without a GPU and compare every path. For the
whole process, ``SPARSE_KERNELS_BACKEND=reference|triton`` asks the same of
:mod:`sparse_kernels.registry` instead.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from . import capability, registry


def active_override() -> Optional[str]:
    """The innermost :func:`override` in force, else the process-wide ``SPARSE_KERNELS_BACKEND``
    choice (``"reference"`` / ``"triton"``), else ``None``."""
    return capability.active_override()


@contextlib.contextmanager
def override(kind: str) -> Iterator[None]:
    """Runs the ops on other kernels inside the block; the defaults come back when it ends.

    Args:
        kind: ``"reference"``: every op, CPU and CUDA, on its pure-torch reference;
            ``"triton"``: the block-sparse ops of CPU tensors on the Triton kernels (needs
            ``TRITON_INTERPRET=1`` before triton is imported), refusing what they cannot take.
    Raises:
        ``ValueError`` for another ``kind``, or ``"triton"`` without the interpreter.
    """
    library = registry.install_override(kind)
    capability.overrides_in_force.append(kind)
    try:
        yield
    finally:
        capability.overrides_in_force.pop()
        library._destroy()
