"""Shape arithmetic shared by every layer of the package: block sizes, int pairs, conv sizes.

A leaf module: it imports nothing from the package.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

BlockSize = Union[int, Sequence[int]]
IntPair = Union[int, Sequence[int]]


def normalize_block_size(block_size: BlockSize) -> Tuple[int, int]:
    """``32 -> (32, 32)``; ``(bo, bi) -> (bo, bi)``; refuses non-positive sizes."""
    if isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}")
    if isinstance(block_size, int):
        pair = (block_size, block_size)
    else:
        pair = tuple(block_size)
        if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in pair):
            raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    return pair


def int_pair(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    """``v -> (v, v)``, ``(a, b) -> (a, b)``; ``ValueError`` naming ``name`` unless both are
    ints ``>= minimum``."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if (
        pair is None or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)
    ):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair


def explicit_padding(padding, kernel: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int]:
    """Explicit ``(pad_h, pad_w)`` from an int, a pair, ``"valid"`` or ``"same"``."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(total % 2 for total in totals):
            raise ValueError(
                f"padding='same' with kernel {kernel} and dilation {dilation} needs uneven padding, "
                f"which bsr_conv2d does not do; pad the input with F.pad instead"
            )
        return (totals[0] // 2, totals[1] // 2)
    return int_pair("padding", padding, 0)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of one spatial axis of a convolution, as ``F.conv2d`` computes it."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
