"""A small feature network trained on the dataset itself, for domains far from ImageNet.

Inception features describe natural photographs; on tiny grey images or rasterised
sketches a network trained locally on the reference set is the usual complement. With
labels it is a classifier (features: the 128-d penultimate layer); without, an autoencoder
(features: the 128-d bottleneck; the decoder is trained and then dropped).

    net = load_or_train_local_features("fashion-mnist", images, labels, cache_dir)
    features = local_features(net, images)          # float64 [N, 128]
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import atomic_write

__all__ = ["LocalFeatureNet", "load_or_train_local_features", "local_features", "train_local_features"]

INPUT_SIZE = 32
FEATURE_DIM = 128
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv 3x3 -> GroupNorm -> SiLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(8, out_channels),
        nn.SiLU(),
    )


def _resize(images: Tensor) -> Tensor:
    """float ``[N, C, H, W]`` -> ``[N, C, 32, 32]`` (bilinear, antialiased when shrinking)."""
    if images.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return images
    return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                         antialias=True)


def _check_images(images: Tensor, name: str = "images") -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be [N, C, H, W] with C 1 or 3, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")


class LocalFeatureNet(nn.Module):
    """Images ``[N, C, H, W]`` in ``[-1, 1]`` (C = ``in_channels``) -> features ``[N, 128]``.

    Resizes to 32x32, then four conv/GroupNorm/SiLU blocks with 2x2 max pools
    (32 -> 64 -> 128 -> 256 channels at 32, 16, 8 and 4 pixels), global average pooling and
    a linear map to 128 features. About 0.42 M parameters.
    """

    def __init__(self, in_channels: int = 1):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.in_channels = in_channels
        self.trunk = nn.Sequential(
            _block(in_channels, 32), nn.MaxPool2d(2),
            _block(32, 64), nn.MaxPool2d(2),
            _block(64, 128), nn.MaxPool2d(2),
            _block(128, 256),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Linear(256, FEATURE_DIM)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must be [N, {self.in_channels}, H, W], got shape {tuple(images.shape)}")
        return self.embed(self.trunk(_resize(images.float())))


def _decoder(out_channels: int) -> nn.Module:
    """Features ``[N, 128]`` -> images ``[N, C, 32, 32]`` in ``[-1, 1]`` (trained, then dropped)."""
    return nn.Sequential(
        nn.Linear(FEATURE_DIM, 64 * 4 * 4), nn.SiLU(), nn.Unflatten(1, (64, 4, 4)),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.SiLU(),   # 8x8
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.SiLU(),   # 16x16
        nn.ConvTranspose2d(16, out_channels, 4, stride=2, padding=1),    # 32x32
        nn.Tanh(),
    )


def train_local_features(images: Tensor, labels: Optional[Tensor], epochs: int = 3, batch_size: int = 128,
                         seed: int = 0) -> LocalFeatureNet:
    """Trains a :class:`LocalFeatureNet` on ``images [N, C, H, W]`` in ``[-1, 1]``.

    With ``labels`` (int64 ``[N]``, classes ``0..K-1``) it trains a linear classifier head
    with cross-entropy; with ``labels=None`` a small decoder to reconstruct the 32x32 image
    (mean squared error). The head or decoder is dropped afterwards. AdamW with a cosine
    learning-rate decay; runs on ``images.device``; the global RNG is left untouched.

    Returns:
        the network in eval mode, with ``net.train_losses``: the mean loss of each epoch.
    """
    _check_images(images)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    num = images.shape[0]
    if labels is not None:
        labels = torch.as_tensor(labels).to(images.device, torch.long)
        if labels.shape != (num,):
            raise ValueError(f"labels must be [{num}] to match images, got shape {tuple(labels.shape)}")
        if labels.min() < 0:
            raise ValueError(f"labels must be non-negative class indices, got minimum {int(labels.min())}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LocalFeatureNet(images.shape[1]).to(images.device)
        if labels is not None:
            head: nn.Module = nn.Linear(FEATURE_DIM, int(labels.max()) + 1)
        else:
            head = _decoder(images.shape[1])
        head = head.to(images.device)
        generator = torch.Generator().manual_seed(seed)

    parameters = list(net.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = -(-num // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    targets32 = _resize(images.float()) if labels is None else None

    net.train()
    head.train()
    losses: List[float] = []
    for _ in range(epochs):
        total = 0.0
        for index in torch.randperm(num, generator=generator).to(images.device).split(batch_size):
            features = net(images[index])
            if labels is not None:
                loss = F.cross_entropy(head(features), labels[index])
            else:
                loss = F.mse_loss(head(features), targets32[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * index.numel()
        losses.append(total / num)
    net.eval()
    net.train_losses = losses
    return net


def local_features(net: LocalFeatureNet, images: Tensor, batch_size: int = 512) -> Tensor:
    """float64 features ``[N, 128]`` of ``images [N, C, H, W]`` in ``[-1, 1]``, in eval mode."""
    _check_images(images)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    with torch.no_grad():
        chunks = [net(batch.to(device)).double().cpu() for batch in images.split(batch_size)]
    net.train(was_training)
    return torch.cat(chunks)


def check_name(name: str) -> None:
    """Raises ValueError unless ``name`` is safe inside a file name."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(f"name must be letters, digits, '_', '-' or '.' (a file-name part), got {name!r}")


def load_or_train_local_features(name: str, images: Tensor, labels: Optional[Tensor], cache_dir) -> LocalFeatureNet:
    """The :class:`LocalFeatureNet` cached at ``cache_dir/local-features-{name}.safetensors``.

    Trains it with :func:`train_local_features` (default settings) and writes its state dict
    atomically when the file is missing, or when it does not fit ``images``' channel count.
    The network is on ``images.device``, in eval mode. A cache file that is not a readable
    safetensors file is a one-line ``ValueError`` naming it (it is never unpickled).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    check_name(name)
    _check_images(images)
    path = Path(cache_dir) / f"local-features-{name}.safetensors"
    if path.is_file():
        net = LocalFeatureNet(images.shape[1])
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"the metrics cache {path} is unreadable ({error}); delete it to recompute") from None
        try:
            net.load_state_dict(state)
        except RuntimeError:
            pass  # written for other images (another channel count): train again below
        else:
            return net.to(images.device).eval()
    net = train_local_features(images, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(save({key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}), path)
    return net
