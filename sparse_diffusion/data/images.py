"""Image datasets: Fashion-MNIST from its idx files, and a folder of image files.

Items are ``(image, label)``: ``image`` float32 [C, S, S] in [-1, 1], ``label`` an int64
scalar tensor (-1 when the dataset has no labels).
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import struct

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .common import DatasetFormatError, DatasetNotFoundError, every_nth_split

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _limit_suffix(limit: int | None) -> str:
    return "" if limit is None else f"-first{limit}"


def _check_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


# --------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array [N, *item_shape] in the gzipped idx file ``path``.

    Checks the magic number, the item dimensions and that the payload holds exactly N items;
    raises DatasetFormatError naming ``path`` otherwise.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetFormatError(f"{path}: not a readable gzip file: {e}") from e
    ndim = 1 + len(item_shape)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated idx header ({len(raw)} bytes, need {header})")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetFormatError(f"{path}: idx magic number {found:#010x}, expected {magic:#010x}")
    count, *dims = struct.unpack(f">{ndim}I", raw[4:header])
    if tuple(dims) != tuple(item_shape):
        raise DatasetFormatError(f"{path}: idx item shape {tuple(dims)}, expected {tuple(item_shape)}")
    expected = header + count * math.prod(item_shape)
    if len(raw) != expected:
        raise DatasetFormatError(
            f"{path}: {len(raw)} bytes after decompression, expected {expected} for {count} items "
            f"of shape {tuple(item_shape)} (truncated or trailing data)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(count, *item_shape).copy()


def fashion_mnist_arrays(data_dir: str | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of a Fashion-MNIST split.

    ``split`` is "train" (60,000 items) or "test" (t10k, 10,000). ``data_dir`` holds the
    four ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` files; by default the folder
    that Debian's ``dataset-fashion-mnist`` package installs.
    """
    if split not in FASHION_MNIST_SPLITS:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(FASHION_MNIST_SPLITS)}, got {split!r}")
    folder = os.path.expanduser(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    prefix = FASHION_MNIST_SPLITS[split]
    image_file = os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz")
    label_file = os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz")
    missing = [os.path.basename(p) for p in (image_file, label_file) if not os.path.isfile(p)]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found: {folder} lacks {', '.join(missing)}. Install it with "
            "`sudo apt-get install -y dataset-fashion-mnist`, or pass --data-dir with the folder "
            "that holds the gzipped idx files."
        )
    images = read_idx(image_file, IDX_IMAGES_MAGIC, (28, 28))
    labels = read_idx(label_file, IDX_LABELS_MAGIC, ())
    if len(images) != len(labels):
        raise DatasetFormatError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DatasetFormatError(f"{label_file}: label {labels[bad]} at item {bad} is outside 0..9")
    return images, labels.astype(np.int64)


class FashionMNIST(Dataset):
    """Fashion-MNIST; items (image float32 [1, S, S] in [-1, 1], label int64 scalar in 0..9).

    The whole split is converted (and resized with bilinear ``F.interpolate`` when
    ``image_size`` is not 28) once, up front: 4 * N * S * S bytes, 188 MB for the
    training split at S = 28.
    """

    kind = "image"
    channels = 1
    num_classes = 10

    def __init__(self, split: str = "train", image_size: int | None = None,
                 data_dir: str | None = None, limit: int | None = None):
        size = 28 if image_size is None else _check_size(image_size)
        images, labels = fashion_mnist_arrays(data_dir, split)
        images, labels = images[:limit], labels[:limit]
        x = torch.from_numpy(images).unsqueeze(1)  # uint8 [N, 1, 28, 28]
        chunks = []
        for start in range(0, len(x), 8192):
            chunk = x[start:start + 8192].float().div_(127.5).sub_(1.0)
            if size != 28:
                chunk = F.interpolate(chunk, size=(size, size), mode="bilinear",
                                      align_corners=False, antialias=size < 28).clamp_(-1.0, 1.0)
            chunks.append(chunk)
        self.images = torch.cat(chunks) if chunks else torch.empty(0, 1, size, size)
        self.labels = torch.from_numpy(labels)
        self.image_size = size
        self.split = split
        self.name = f"fashion-mnist-{split}-{size}{_limit_suffix(limit)}"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


# --------------------------------------------------------------------------- image folder
def _scan_images(root: str) -> list[str]:
    """Paths of the image files under ``root`` relative to it, in sorted (tree) order."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        rel = os.path.relpath(folder, root)
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(found, key=lambda p: p.split(os.sep))


def _load_rgb(path: str, size: int) -> torch.Tensor:
    """Image at ``path`` as float32 [3, size, size] in [-1, 1]: RGB, center crop, bicubic."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetFormatError(f"{path}: cannot read image: {e}") from e
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(im, dtype=np.uint8))  # [S, S, 3]
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolder(Dataset):
    """Image files (png, jpg, jpeg, bmp, webp) found recursively under ``root``.

    Items are (image float32 [3, S, S] in [-1, 1], label int64 scalar). Images are
    converted to RGB, center-cropped to a square and resized to S = ``image_size`` with
    PIL bicubic. When ``root`` holds two or more subfolders that contain images, each such
    subfolder is a class (in sorted order) and images directly in ``root`` are refused;
    otherwise labels are -1 and ``num_classes`` is None.

    Split: files are sorted by path; file i belongs to "test" when i % 20 == 0 and to
    "train" otherwise (95 / 5), so a folder needs at least 2 images (ValueError with
    fewer). Files are read lazily: an unreadable image raises
    DatasetFormatError naming it when its item is loaded, never skipped.
    """

    kind = "image"
    channels = 3

    def __init__(self, root: str, split: str = "train", image_size: int = 64, limit: int | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"image folder split must be 'train' or 'test', got {split!r}")
        size = _check_size(image_size)
        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            raise DatasetNotFoundError(f"image folder {root} does not exist or is not a folder")
        rel_paths = _scan_images(root)
        if not rel_paths:
            raise DatasetNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        top = [p.split(os.sep)[0] for p in rel_paths]
        classes = sorted({t for t, p in zip(top, rel_paths) if p != t})
        if len(classes) >= 2:
            loose = [p for t, p in zip(top, rel_paths) if p == t]
            if loose:
                raise DatasetFormatError(
                    f"{root} has class subfolders {classes} but also {len(loose)} image(s) outside them, "
                    f"e.g. {os.path.join(root, loose[0])}; move them into a class folder"
                )
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[t] for t in top]
            self.classes: list[str] | None = classes
            self.num_classes: int | None = len(classes)
        else:
            labels = [-1] * len(rel_paths)
            self.classes, self.num_classes = None, None
        keep = every_nth_split(len(rel_paths), split, f"images:{root}", "image")[:limit]
        self.files = [os.path.join(root, rel_paths[i]) for i in keep]
        self.labels = torch.tensor([labels[i] for i in keep], dtype=torch.int64)
        self.image_size = size
        self.split = split
        digest = hashlib.sha1("\n".join([os.path.abspath(root), *rel_paths]).encode()).hexdigest()[:8]
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(os.path.abspath(root))))
        self.name = f"images-{base}-{digest}-{split}-{size}{_limit_suffix(limit)}"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _load_rgb(self.files[index], self.image_size), self.labels[index]
