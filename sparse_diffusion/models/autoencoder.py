"""diffusers AutoencoderKL presets and their training loss, for latent diffusion."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

AUTOENCODER_PRESETS: Dict[str, Dict] = {
    # Downsampling factor 2, 4 latent channels: tests.
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8),
    # Factor 4 (28x28 -> 7x7), 4 latent channels: CPU runs.
    "demo": dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16),
    # The paper's VQ-f4 setting, as a KL autoencoder: factor 4, 3 latent channels (256x256 -> 64x64x3).
    "paper": dict(block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3, norm_num_groups=32),
}


def build_autoencoder(preset: str, sample_size: int, channels: int):
    """An ``AutoencoderKL`` for ``[B, channels, sample_size, sample_size]`` images in [-1, 1]."""
    from diffusers import AutoencoderKL

    if preset not in AUTOENCODER_PRESETS:
        raise ValueError(f"unknown autoencoder preset {preset!r}; choose one of {sorted(AUTOENCODER_PRESETS)}")
    config = AUTOENCODER_PRESETS[preset]
    levels = len(config["block_out_channels"])
    return AutoencoderKL(
        in_channels=channels, out_channels=channels, sample_size=sample_size,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        **config,
    )


def autoencoder_loss(autoencoder, images: torch.Tensor, kl_weight: float = 1e-6):
    """Reconstruction MSE + ``kl_weight`` x KL to N(0, 1) (a near-deterministic KL-f autoencoder,
    as in latent diffusion). images: [B, C, H, W] in [-1, 1]. Returns (loss, reconstruction)."""
    posterior = autoencoder.encode(images).latent_dist
    reconstruction = autoencoder.decode(posterior.sample()).sample
    loss = F.mse_loss(reconstruction, images) + kl_weight * posterior.kl().mean()
    return loss, reconstruction


@torch.no_grad()
def latent_scale(autoencoder, images: torch.Tensor) -> float:
    """1 / std of the latents of ``images``: scales latents to unit variance for diffusion."""
    latents = autoencoder.encode(images).latent_dist.mean
    return float(1.0 / latents.float().std().clamp_min(1e-6))
