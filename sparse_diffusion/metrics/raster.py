"""Rasterise stroke sequences (sketches) to images, so image metrics apply to them.

Ink is -1 (black) on a white background of +1, like Fashion-MNIST with its grey levels
inverted: paper-and-pen sketches read naturally this way, and Inception (trained on
photographs) sees dark lines on a light page rather than light lines on black.

Coordinates follow image conventions: x grows to the right and y grows downwards (as in
QuickDraw's screen coordinates). Each sample is scaled and centred on its own, so the
absolute position and size of a drawing do not matter, only its shape.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["rasterize_strokes"]

INK, PAPER = 0, 255


def _strokes(rows: np.ndarray) -> list:
    """Splits ``rows [n, 3]`` of ``(x, y, pen)`` into arrays ``[k, 2]``, one per stroke.

    A stroke ends at a row with ``pen >= 0.5``; the last row ends the last stroke.
    """
    strokes, start = [], 0
    for end in np.flatnonzero(rows[:, 2] >= 0.5):
        strokes.append(rows[start:end + 1, :2])
        start = end + 1
    if start < len(rows):
        strokes.append(rows[start:, :2])
    return strokes


def _fit(xy: np.ndarray, size: int, margin: float) -> np.ndarray:
    """Pixel coordinates ``[n, 2]``: ``xy`` scaled uniformly into the canvas less ``margin``
    on each side, and centred. A drawing of zero extent lands at the centre."""
    low, high = xy.min(axis=0), xy.max(axis=0)
    extent = float((high - low).max())
    span = size - 1 - 2 * margin
    scale = span / extent if extent > 0 else 0.0
    centre = (low + high) / 2
    return (xy - centre) * scale + (size - 1) / 2


def rasterize_strokes(points: Tensor, lengths: Tensor, size: int = 64, line_width: int = 2) -> Tensor:
    """Draws stroke sequences as grey images.

    Args:
        points: ``[B, L, 3]`` rows ``(x, y, pen)``; ``pen == 1`` marks the last point of a
            stroke, so no line joins it to the next point. Coordinates are normalised but
            unbounded: each sample is fitted into the canvas with a margin of
            ``max(line_width, size / 16)`` pixels, keeping its aspect ratio.
        lengths: int ``[B]``; rows at and after ``lengths[b]`` are ignored.
        size: canvas side in pixels.
        line_width: line width in pixels (PIL ``ImageDraw.line``).

    Returns:
        float32 ``[B, 1, size, size]`` in ``[-1, 1]``: ink -1, background +1.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be [B, L, 3], got shape {tuple(points.shape)}")
    batch, max_len = points.shape[:2]
    lengths = torch.as_tensor(lengths).reshape(-1)
    if lengths.shape[0] != batch:
        raise ValueError(f"lengths must be [{batch}] to match points, got shape {tuple(lengths.shape)}")
    if batch and (lengths.min() < 0 or lengths.max() > max_len):
        raise ValueError(f"lengths must lie in 0..{max_len}, got values in "
                         f"{int(lengths.min())}..{int(lengths.max())}")
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}")
    if line_width < 1:
        raise ValueError(f"line_width must be at least 1, got {line_width}")

    rows_all = points.detach().to("cpu", torch.float64).numpy()
    margin = max(line_width, size / 16)
    images = np.empty((batch, 1, size, size), dtype=np.float32)
    for b in range(batch):
        rows = rows_all[b, :int(lengths[b])]
        if not np.isfinite(rows).all():
            raise ValueError(f"points of sample {b} have non-finite values within its length {int(lengths[b])}")
        canvas = Image.new("L", (size, size), PAPER)
        if len(rows):
            draw = ImageDraw.Draw(canvas)
            pixels = _fit(rows[:, :2], size, margin)
            rows = np.concatenate([pixels, rows[:, 2:]], axis=1)
            for stroke in _strokes(rows):
                xy = [tuple(p) for p in stroke.tolist()]
                if len(xy) == 1:
                    radius = line_width / 2
                    (x, y), = xy
                    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=INK)
                else:
                    draw.line(xy, fill=INK, width=line_width, joint="curve")
        images[b, 0] = np.asarray(canvas, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(images)
