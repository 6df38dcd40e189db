"""Pen-stroke geometry: SVG paths, the QuickDraw and sketch-rnn formats, normalisation
and arc-length resampling (the datasets are in :mod:`.stroke_datasets`).

A drawing is a list of strokes, float64 [P_i, 2] absolute (x, y), y down as in the
sources. ``strokes_to_points`` turns it into an item:

1. normalise: subtract the mean point, divide by the standard deviation of all the
   coordinates (one scalar). This is our reading of ChiroDiff (Das et al., ICLR 2023),
   which centres each sample and scales it by one global factor;
2. resample each stroke by arc length to points at most ``spacing`` apart, evenly spaced,
   both ends kept (``spacing`` is in normalised units, so it means the same for every
   source). When the drawing needs more than ``max_len`` points, the whole drawing is
   resampled coarser (a larger spacing, the smallest that fits within 2%) instead of
   being truncated. A drawing whose strokes cannot fit even at two points per stroke
   raises DatasetFormatError naming it;
3. normalise again, so the points kept have zero mean and unit standard deviation;
4. pack into ``points`` float32 [max_len, 3] (x, y, pen), ``pen == 1`` on the last point
   of each stroke, zero rows from ``length`` on.
"""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import torch

from .common import DatasetFormatError

DEFAULT_SPACING = 0.1  # in units of the sample's standard deviation
CURVE_SAMPLES = 16  # points per cubic Bezier segment, before arc-length resampling

# --------------------------------------------------------------------------- SVG paths
_ARGS = {"M": 2, "L": 2, "C": 6, "S": 4, "Z": 0}
_TOKENS = re.compile(
    r"(?P<cmd>[A-Za-z])|(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<sep>[\s,]+)|(?P<bad>.)", re.S
)
_t = np.linspace(0.0, 1.0, CURVE_SAMPLES + 1)[1:, None]
_BERNSTEIN = np.hstack([(1 - _t) ** 3, 3 * (1 - _t) ** 2 * _t, 3 * (1 - _t) * _t**2, _t**3])  # [K, 4]


def _tokenize(d: str, where: str) -> list:
    """The commands (str) and numbers (float) of the path data ``d``."""
    tokens = []
    for m in _TOKENS.finditer(d):
        kind, text = m.lastgroup, m.group()
        if kind == "bad" or (kind == "cmd" and text.upper() not in _ARGS):
            raise DatasetFormatError(f"{where}: unexpected {text!r} at offset {m.start()} of the path data")
        if kind == "num" and not math.isfinite(float(text)):
            raise DatasetFormatError(f"{where}: number {text!r} is not finite")
        if kind != "sep":
            tokens.append(text if kind == "cmd" else float(text))
    return tokens


def _sample_cubics(start: tuple, segments: list) -> np.ndarray:
    """Polyline [1 + K * n, 2] through n cubic segments, each (c1, c2, end), from ``start``."""
    ctrl = np.empty((len(segments), 4, 2))
    ctrl[:, 1:] = segments
    ctrl[0, 0] = start
    ctrl[1:, 0] = ctrl[:-1, 3]
    points = np.einsum("kj,njd->nkd", _BERNSTEIN, ctrl).reshape(-1, 2)
    return np.vstack([np.asarray(start, dtype=np.float64)[None], points])


def parse_svg_path(d: str, where: str = "path data") -> list[np.ndarray]:
    """Polylines [P_i, 2] of the SVG path data ``d``, one per subpath that draws something.

    Supports M/m, L/l, C/c, S/s and Z/z, absolute and relative, with implicit repeats
    (pairs after a moveto are linetos). Cubics are sampled at ``CURVE_SAMPLES`` points
    each, lines likewise. Raises DatasetFormatError prefixed with ``where``.
    """
    tokens = _tokenize(d, where)
    out, segments = [], []
    cur = start = (0.0, 0.0)
    ctrl2 = None  # second control point of the previous C/S segment, for S's reflection
    cmd, i, fresh = None, 0, False

    def flush():
        if segments:
            out.append(_sample_cubics(start, segments))
        segments.clear()

    while i < len(tokens):
        if isinstance(tokens[i], str):
            if fresh:
                raise DatasetFormatError(f"{where}: command {cmd!r} has no numbers")
            cmd, i, fresh = tokens[i], i + 1, True
            if cmd in "Zz":
                if cur != start:
                    segments.append(_line(cur, start))
                cur, ctrl2, fresh = start, None, False
            continue
        if cmd is None or cmd in "Zz":
            raise DatasetFormatError(f"{where}: number {tokens[i]!r} outside any command")
        n = _ARGS[cmd.upper()]
        args = tokens[i:i + n]
        if len(args) < n or any(isinstance(a, str) for a in args):
            raise DatasetFormatError(f"{where}: command {cmd!r} needs {n} numbers at token {i}")
        i, fresh = i + n, False
        ox, oy = cur if cmd.islower() else (0.0, 0.0)
        pts = [(ox + args[k], oy + args[k + 1]) for k in range(0, n, 2)]
        upper = cmd.upper()
        if upper == "M":
            flush()
            cur = start = pts[0]
            cmd = "l" if cmd == "m" else "L"  # further pairs are implicit linetos
            ctrl2 = None
            continue
        if upper == "L":
            segments.append(_line(cur, pts[0]))
            ctrl2 = None
        elif upper == "C":
            segments.append(pts)
            ctrl2 = pts[1]
        else:  # S: the first control point reflects the previous C/S's second one
            c1 = (2 * cur[0] - ctrl2[0], 2 * cur[1] - ctrl2[1]) if ctrl2 is not None else cur
            segments.append([c1, pts[0], pts[1]])
            ctrl2 = pts[0]
        cur = segments[-1][-1]
    if fresh and cmd not in "Zz":
        raise DatasetFormatError(f"{where}: command {cmd!r} has no numbers")
    flush()
    return out


def _line(a: tuple, b: tuple) -> list:
    """A straight segment from a to b as cubic control points (c1, c2, end)."""
    return [(a[0] + (b[0] - a[0]) / 3, a[1] + (b[1] - a[1]) / 3),
            (a[0] + 2 * (b[0] - a[0]) / 3, a[1] + 2 * (b[1] - a[1]) / 3), b]


def parse_svg_strokes(path: str) -> list[np.ndarray]:
    """Strokes [P_i, 2] of the SVG file ``path``: its ``<path d>`` elements in document order.

    Each subpath is one stroke (every KanjiVG path is a single subpath). Raises
    DatasetFormatError naming the file and the path id for malformed path data.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DatasetFormatError(f"{path}: not a readable SVG file: {e}") from e
    strokes = []
    elements = [el for el in root.iter() if isinstance(el.tag, str) and el.tag.rsplit("}", 1)[-1] == "path"]
    for k, el in enumerate(elements):
        where = f"{path}: path {el.get('id') or f'#{k}'}"
        d = el.get("d")
        if d is None:
            raise DatasetFormatError(f"{where}: no 'd' attribute")
        drawn = parse_svg_path(d, where)
        if not drawn:
            raise DatasetFormatError(f"{where}: path data {d[:40]!r} draws nothing")
        strokes.extend(drawn)
    if not strokes:
        raise DatasetFormatError(f"{path}: no <path> elements")
    return strokes


# --------------------------------------------------------------------------- geometry
def normalize_strokes(strokes: list[np.ndarray]) -> list[np.ndarray]:
    """Strokes minus the mean point [2], divided by the std of all coordinates (a scalar).

    A drawing whose points all coincide is only centred (its std is 0).
    """
    points = np.concatenate(strokes)
    mean = points.mean(axis=0)
    std = float((points - mean).std())
    scale = std if std > 0 else 1.0
    return [(s - mean) / scale for s in strokes]


def _arc_length(stroke: np.ndarray) -> float:
    return float(np.hypot(*np.diff(stroke, axis=0).T).sum()) if len(stroke) > 1 else 0.0


def _points_needed(lengths: np.ndarray, spacing: float) -> np.ndarray:
    """Points per stroke at ``spacing``: ceil(L / spacing) + 1 (at least 2), 1 for a dot."""
    steps = np.maximum(1, np.ceil(lengths / spacing - 1e-9))
    return np.where(lengths > 0, steps + 1, 1).astype(np.int64)


def resample_strokes(strokes: list[np.ndarray], spacing: float) -> list[np.ndarray]:
    """Each stroke [P_i, 2] resampled by arc length to [Q_i, 2] evenly spaced points.

    A stroke of length L gets Q = ceil(L / spacing) + 1 points, the first and last kept,
    so consecutive points are L / (Q - 1) <= ``spacing`` apart along the stroke. A stroke
    of length 0 becomes its first point.
    """
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"spacing must be a positive finite number, got {spacing!r}")
    out = []
    for stroke in strokes:
        pts = np.asarray(stroke, dtype=np.float64)
        step = np.hypot(*np.diff(pts, axis=0).T)
        pts, step = pts[np.concatenate([[True], step > 0])], step[step > 0]
        if len(step) == 0:
            out.append(pts[:1].copy())
            continue
        cum = np.concatenate([[0.0], np.cumsum(step)])
        t = np.linspace(0.0, cum[-1], int(_points_needed(cum[-1:], spacing)[0]))
        out.append(np.stack([np.interp(t, cum, pts[:, 0]), np.interp(t, cum, pts[:, 1])], axis=1))
    return out


def _fit_spacing(lengths: np.ndarray, spacing: float, max_len: int) -> float:
    """The smallest spacing >= ``spacing`` (within 2%) whose resampling fits ``max_len``."""
    if _points_needed(lengths, spacing).sum() <= max_len:
        return spacing
    # ceil(L / s) + 1 >= L / s + 1 per stroke, so s >= sum(L) / (max_len - strokes).
    spacing = max(spacing, lengths.sum() / (max_len - len(lengths)))
    while _points_needed(lengths, spacing).sum() > max_len:
        spacing *= 1.02
    return spacing


def strokes_to_points(strokes: list, max_len: int, spacing: float = DEFAULT_SPACING,
                      where: str = "sample") -> tuple[torch.Tensor, torch.Tensor]:
    """``(points float32 [max_len, 3], length int64 scalar)`` of a drawing; see the module doc."""
    checked = []
    for k, s in enumerate(strokes):
        s = np.asarray(s, dtype=np.float64)
        if s.ndim != 2 or s.shape[1] != 2 or len(s) == 0 or not np.isfinite(s).all():
            raise DatasetFormatError(f"{where}: stroke {k} must be finite points [P, 2], got shape {s.shape}")
        checked.append(s)
    if not checked:
        raise DatasetFormatError(f"{where}: no strokes")
    checked = normalize_strokes(checked)
    lengths = np.array([_arc_length(s) for s in checked])
    least = int(np.where(lengths > 0, 2, 1).sum())
    if least > max_len:
        raise DatasetFormatError(
            f"{where}: {len(checked)} strokes need at least {least} points, more than max_len={max_len}; raise max_len"
        )
    resampled = normalize_strokes(resample_strokes(checked, _fit_spacing(lengths, spacing, max_len)))
    length = sum(len(s) for s in resampled)
    points = np.zeros((max_len, 3), dtype=np.float32)
    points[:length, :2] = np.concatenate(resampled)
    points[np.cumsum([len(s) for s in resampled]) - 1, 2] = 1.0
    return torch.from_numpy(points), torch.tensor(length, dtype=torch.int64)


# --------------------------------------------------------------------------- record sources
def stroke3_to_strokes(data, where: str) -> list[np.ndarray]:
    """Absolute strokes [P_i, 2] of a stroke-3 array [N, 3] of (dx, dy, pen_lifted) rows."""
    a = np.asarray(data)
    if a.ndim != 2 or a.shape[1] != 3 or len(a) == 0 or not np.issubdtype(a.dtype, np.number):
        raise DatasetFormatError(f"{where}: expected a numeric stroke-3 array [N, 3], got {a.dtype} {a.shape}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all() or not np.isin(a[:, 2], (0.0, 1.0)).all():
        raise DatasetFormatError(f"{where}: values must be finite and pen_lifted 0 or 1")
    xy = np.cumsum(a[:, :2], axis=0)
    return [p for p in np.split(xy, np.flatnonzero(a[:, 2] == 1) + 1) if len(p)]


def drawing_to_strokes(record, where: str) -> list[np.ndarray]:
    """Strokes [P_i, 2] of a QuickDraw ndjson record: "drawing" holds [xs, ys] or [xs, ys, ts]."""
    drawing = record.get("drawing") if isinstance(record, dict) else None
    if not isinstance(drawing, list) or not drawing:
        raise DatasetFormatError(f"{where}: needs a 'drawing' field with a non-empty list of strokes")
    strokes = []
    for k, stroke in enumerate(drawing):
        ok = isinstance(stroke, list) and len(stroke) in (2, 3) and all(isinstance(c, list) for c in stroke)
        ok = ok and len(stroke[0]) > 0 and all(len(c) == len(stroke[0]) for c in stroke)
        ok = ok and all(type(v) in (int, float) for c in stroke[:2] for v in c)
        if not ok:
            raise DatasetFormatError(f"{where}: stroke {k} must be [xs, ys] or [xs, ys, ts], equal-length lists of numbers")
        strokes.append(np.array(stroke[:2], dtype=np.float64).T)
    return strokes
