"""Fréchet distance (FID) and kernel distance (KID) between two sets of features.

    mu1, sigma1 = feature_statistics(f1)                  # f1: [N, D]
    fd = frechet_distance(mu1, sigma1, *feature_statistics(f2))
    kid_mean, kid_std = kernel_distance(f1, f2)

Everything is computed in float64. Inputs may be tensors or numpy arrays.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["feature_statistics", "frechet_distance", "kernel_distance", "sqrtm_psd", "trace_sqrtm_product"]


def _as_float64(x) -> Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def _check_features(features: Tensor, name: str) -> None:
    if features.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows, got {features.shape[0]}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} has non-finite values")


def feature_statistics(features) -> Tuple[Tensor, Tensor]:
    """Mean and unbiased covariance of ``features [N, D]`` (N >= 2).

    Returns:
        ``(mu float64 [D], sigma float64 [D, D])``.
    """
    f = _as_float64(features)
    _check_features(f, "features")
    mu = f.mean(dim=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


def _psd_eigenvalues(eigenvalues: Tensor) -> Tensor:
    """Eigenvalues ``[D]`` of a symmetric PSD matrix with rounding noise set to 0.

    Values at or below ``D * eps * max|eigenvalue|`` (NumPy's ``matrix_rank`` tolerance) are
    below what float64 resolves: negative ones are rounding, and positive ones that small
    cannot be told from it. Zeroing them matters for low-rank covariances (fewer samples
    than features), whose square roots would otherwise carry thousands of ``sqrt(noise)``
    terms.
    """
    tolerance = eigenvalues.abs().max() * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > tolerance, eigenvalues, torch.zeros_like(eigenvalues))


def sqrtm_psd(sigma: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix ``[D, D]`` via ``eigh`` (float64).

    Negative and negligible eigenvalues (rounding, see :func:`_psd_eigenvalues`) become 0.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (eigenvectors * _psd_eigenvalues(eigenvalues).sqrt()) @ eigenvectors.T


def trace_sqrtm_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """``tr(sqrtm(S1 S2))`` for symmetric PSD ``S1, S2 [D, D]`` (float64 scalar tensor).

    With ``A = sqrtm(S1)`` and ``B = sqrtm(S2)``, ``S1 S2 = A (A S2 A) A^-1`` is similar to the
    symmetric PSD ``A S2 A = (A B)(A B)^T``, so the trace is the sum of the square roots of
    the eigenvalues of ``A S2 A``, i.e. the sum of the singular values of ``A B``: exact for
    symmetric PSD inputs. Taking singular values of ``A B`` rather than eigenvalues of
    ``A S2 A`` avoids squaring the condition number: eigenvalues of ``A S2 A`` below
    ``eps * |S|^2`` are lost to rounding, and their square roots add up (to about 1e-5 on
    a 128-d covariance whose eigenvalues span 1e-8..1).
    """
    return torch.linalg.svdvals(sqrtm_psd(sigma1) @ sqrtm_psd(sigma2)).sum()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with mu ``[D]`` and sigma
    ``[D, D]``, in float64; see :func:`trace_sqrtm_product` for the last term, which is
    stable where ``scipy.linalg.sqrtm`` of the non-symmetric product is not. Identical
    inputs give 0 to about 1e-10, also with fewer samples than features.
    """
    mu1, mu2 = _as_float64(mu1), _as_float64(mu2)
    sigma1, sigma2 = _as_float64(sigma1), _as_float64(sigma2)
    if mu1.dim() != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be [D] of one size, got {tuple(mu1.shape)} and {tuple(mu2.shape)}")
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} must be [{dim}, {dim}] to match mu, got {tuple(sigma.shape)}")
        if not torch.isfinite(sigma).all():
            raise ValueError(f"{name} has non-finite values")
    diff = mu1 - mu2
    distance = diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrtm_product(sigma1, sigma2)
    return float(distance)


def _polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """``(x . y / D + 1)^3`` for ``x [n, D]``, ``y [m, D]`` -> ``[n, m]``."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _unbiased_mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 of ``x [m, D]`` and ``y [m, D]`` under the polynomial kernel."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.mean()


def kernel_distance(f1, f2, num_subsets: int = 100, subset_size: int = 1000,
                    generator: Optional[torch.Generator] = None) -> Tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al., 2018) of ``f1 [N, D]`` and ``f2 [M, D]``.

    The unbiased MMD^2 with the kernel ``(x . y / D + 1)^3``, averaged over ``num_subsets``
    random pairs of subsets of ``min(subset_size, N, M)`` rows each, drawn without
    replacement within a subset.

    Args:
        generator: CPU generator for the subsets; None uses a fresh one seeded with 0, so
            that the result is reproducible and leaves the global RNG untouched.

    Returns:
        ``(mean, std)`` over the subsets; std is the population std (0 for a single subset).
    """
    x, y = _as_float64(f1), _as_float64(f2)
    _check_features(x, "f1")
    _check_features(y, "f2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"f1 and f2 must have the same feature size, got {x.shape[1]} and {y.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be at least 1, got {num_subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be at least 2, got {subset_size}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    m = min(subset_size, x.shape[0], y.shape[0])
    values = torch.empty(num_subsets, dtype=torch.float64)
    for i in range(num_subsets):
        xi = x[torch.randperm(x.shape[0], generator=generator)[:m]]
        yi = y[torch.randperm(y.shape[0], generator=generator)[:m]]
        values[i] = _unbiased_mmd2(xi, yi)
    std = values.std(unbiased=False) if num_subsets > 1 else values.new_zeros(())
    return float(values.mean()), float(std)
