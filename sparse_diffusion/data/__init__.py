"""Datasets for training diffusion models: images and pen strokes.

    from sparse_diffusion.data import get_dataset
    ds = get_dataset("fashion-mnist", split="train")          # items (image [1, 28, 28], label)
    ds = get_dataset("images:/photos", image_size=64)         # items (image [3, 64, 64], label or -1)
    ds = get_dataset("kanjivg", max_len=64)                   # items (points [64, 3], length)
    ds = get_dataset("quickdraw:/data/cat.ndjson")            # items (points [64, 3], length)
    ds = get_dataset("vmnist:/data/vmnist.npz")               # items (points [64, 3], length)

Every dataset has ``kind`` ("image" or "stroke"), ``name`` (a short stable string for
caching) and ``num_classes`` (int or None). Image datasets also have ``channels`` and
``image_size``; stroke datasets have ``max_len`` and ``labels`` (int64 [N] or None, since
stroke items carry no label).

Image items are ``(image, label)``: ``image`` float32 [C, S, S] in [-1, 1] and ``label``
an int64 scalar tensor, -1 when the data has no labels. Stroke items are
``(points, length)``: ``points`` float32 [max_len, 3] with rows (x, y, pen), ``pen == 1``
on the last point of each stroke, zero rows from ``length`` on; ``length`` int64 scalar.
"""
from __future__ import annotations

from .common import TEST_EVERY, DatasetFormatError, DatasetNotFoundError, every_nth_split
from .images import FashionMNIST, ImageFolder, fashion_mnist_arrays
from .stroke_datasets import VMNIST, KanjiVG, QuickDraw, StrokeDataset
from .strokes import (
    normalize_strokes,
    parse_svg_path,
    parse_svg_strokes,
    resample_strokes,
    strokes_to_points,
)

SPEC_FORMS = ("fashion-mnist", "kanjivg", "images:PATH", "quickdraw:PATH", "vmnist:PATH")
DEFAULT_MAX_LEN = 64


def get_dataset(
    spec: str,
    split: str = "train",
    image_size: int | None = None,
    max_len: int | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
):
    """The dataset named by ``spec``, one of ``SPEC_FORMS``.

    ``image_size`` applies to image datasets (None: 28 for Fashion-MNIST, 64 for a folder)
    and ``max_len`` to stroke datasets (None: 64). ``data_dir`` replaces the default folder
    of ``fashion-mnist`` and ``kanjivg``; the ``KIND:PATH`` forms ignore it (PATH says
    where). ``limit`` keeps the first ``limit`` items of the split.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    kind, sep, path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    max_len = DEFAULT_MAX_LEN if max_len is None else max_len
    if not sep and kind == "fashion-mnist":
        return FashionMNIST(split, image_size=image_size, data_dir=data_dir, limit=limit)
    if not sep and kind == "kanjivg":
        return KanjiVG(split, max_len=max_len, svg_dir=data_dir, limit=limit)
    if sep and path and kind == "images":
        return ImageFolder(path, split, image_size=64 if image_size is None else image_size, limit=limit)
    if sep and path and kind == "quickdraw":
        return QuickDraw(path, split, max_len=max_len, limit=limit)
    if sep and path and kind == "vmnist":
        return VMNIST(path, split, max_len=max_len, limit=limit)
    raise ValueError(f"unknown dataset spec {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")


__all__ = [
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FashionMNIST",
    "ImageFolder",
    "KanjiVG",
    "QuickDraw",
    "SPEC_FORMS",
    "StrokeDataset",
    "VMNIST",
    "fashion_mnist_arrays",
    "get_dataset",
    "normalize_strokes",
    "parse_svg_path",
    "parse_svg_strokes",
    "resample_strokes",
    "strokes_to_points",
]
