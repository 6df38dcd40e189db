"""The compiled extension ``sparse_kernels._C`` (csrc/): loading it, lazily, and what it holds.

Loading ``_C`` defines every op of the package in torch's dispatcher,
``torch.ops.sparse_kernels.*``: the block-sparse linear and conv2d ops (forward,
grad-input, grad-weight) with their CPU kernels, Autograd and Autocast kernels; the mask
ops (``build_index``, ``prune_and_regrow``, ``block_norms``) with CPU and, in a CUDA build,
CUDA kernels; and ``build_info``, ``cpu_isa``, ``cpu_kernels_take``. The kernels registered
from Python (Triton, fake, reference) are :mod:`sparse_kernels.registry`'s.

Nothing is loaded when the package is imported: :func:`library` loads ``_C`` on first need
(once; a failure is remembered too), :func:`load` does the same and raises
:class:`ExtensionNotBuiltError` (one line, with the command that builds it) where it cannot.
So the layout and the Triton kernels work without the build, and the ops say how to get it.
"""
from __future__ import annotations

import functools
import importlib
import platform
import threading
from types import ModuleType
from typing import Dict, Optional

import torch

# The mask ops have CPU and (in a CUDA build) CUDA kernels; the block-sparse ops CPU kernels.
MASK_OPS = ("build_index", "prune_and_regrow", "block_norms")
KERNEL_OPS = (
    "bsr_linear",
    "bsr_linear_grad_input",
    "bsr_linear_grad_weight",
    "bsr_conv2d",
    "bsr_conv2d_grad_input",
    "bsr_conv2d_grad_weight",
)
# GroupNorm + SiLU: CPU kernels (fp32).
NORM_OPS = ("group_norm_silu", "group_norm_silu_forward", "group_norm_silu_backward")
# What the build says about itself (compiled, no kernel per device: usable before any registration).
INFO_OPS = ("build_info", "cpu_isa", "cpu_kernels_take")
OPS = MASK_OPS + KERNEL_OPS + NORM_OPS + INFO_OPS  # every op of csrc/ops.cpp
BUILD_COMMAND = "pip install --no-build-isolation -e ."


class ExtensionNotBuiltError(ImportError):
    """``sparse_kernels._C`` cannot be loaded here: not built, or built for another torch."""


_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failure: Optional[str] = None  # why loading failed, once it has


def library() -> Optional[ModuleType]:
    """The loaded ``sparse_kernels._C``, or ``None`` where it cannot be loaded; never raises.

    Tries once per process (on first call) and remembers the outcome, failure included.
    """
    global _module, _failure
    if _module is None and _failure is None:
        with _lock:
            if _module is None and _failure is None:
                try:
                    _module = importlib.import_module(f"{__package__}._C")
                except ImportError as error:
                    text = str(error).strip()
                    _failure = text.splitlines()[0] if text else type(error).__name__
    return _module


def load() -> ModuleType:
    """``sparse_kernels._C``, loaded; :class:`ExtensionNotBuiltError` (one line, naming why and
    the command that builds it) where it cannot be."""
    module = library()
    if module is None:
        raise ExtensionNotBuiltError(
            f"sparse_kernels: the compiled extension sparse_kernels._C is not built ({_failure}); "
            f"build it with `{BUILD_COMMAND}` where torch is installed"
        )
    return module


@functools.lru_cache(maxsize=None)
def _build_info() -> Dict[str, str]:
    load()
    parts = torch.ops.sparse_kernels.build_info().split(";")
    info = dict(part.partition("=")[::2] for part in parts[1:])
    info["devices"] = "cpu,cuda" if "cuda" in info else "cpu"
    return info


def build_info() -> Dict[str, str]:
    """What setup.py built, e.g. ``{"devices": "cpu,cuda", "cuda": "13.0", "archs": "8.0 9.0",
    "torch": ...}``; :class:`ExtensionNotBuiltError` without the build."""
    return dict(_build_info())


def has_compiled_kernel(op: str, device_type: str) -> bool:
    """Whether ``sparse_kernels::<op>`` (one of :data:`MASK_OPS` or :data:`KERNEL_OPS`) has a
    compiled kernel for ``device_type``, read off what was built: on ``cpu`` every op, on
    ``cuda`` the mask ops of a CUDA build, nothing elsewhere or without the build. It does not
    look at the dispatcher, so what Python registers (:mod:`sparse_kernels.registry`) never
    changes the answer."""
    if op not in MASK_OPS + KERNEL_OPS:
        raise ValueError(f"op must be one of {MASK_OPS + KERNEL_OPS}, got {op!r}")
    if library() is None:
        return False
    if device_type == "cpu":
        return True
    return device_type == "cuda" and op in MASK_OPS and "cuda" in _build_info()["devices"].split(",")


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with here: ``avx512``, ``avx2`` or ``generic``
    (``SPARSE_KERNELS_CPU_ISA`` forces one)."""
    load()
    return torch.ops.sparse_kernels.cpu_isa()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), e.g. ``AMD EPYC 9B45``. Pure Python."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
