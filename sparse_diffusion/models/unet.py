"""diffusers UNet2DModel presets for pixel-space and latent diffusion.

Channel counts are multiples of 32, so every layer but the first and last can be
block-sparse with blocks of 16 or 32 (64 for the larger presets).
"""
from __future__ import annotations

from typing import Dict, Optional

UNET_PRESETS: Dict[str, Dict] = {
    # A few thousand parameters' worth of layers: tests.
    "tiny": dict(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ),
    # The CPU demo: about 1.2 M parameters, attention at the lowest resolution.
    "demo": dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # A GPU-sized model for 32x32 to 64x64 images or latents.
    "small": dict(
        block_out_channels=(64, 128, 256), layers_per_block=2, norm_num_groups=32, attention_head_dim=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    # The paper's latent-diffusion UNet (CompVis LDM): 224 base channels, multipliers 1, 2,
    # 3, 4, 2 residual blocks per level, attention at latent resolutions 32, 16 and 8 (of 64).
    "paper": dict(
        block_out_channels=(224, 448, 672, 896), layers_per_block=2, norm_num_groups=32, attention_head_dim=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
}


def build_unet(preset: str, sample_size: int, channels: int, num_classes: Optional[int] = None):
    """A ``UNet2DModel`` predicting the noise of ``[B, channels, sample_size, sample_size]``;
    class-conditional (``num_class_embeds``) when ``num_classes`` is given."""
    from diffusers import UNet2DModel

    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
    levels = len(UNET_PRESETS[preset]["block_out_channels"])
    if sample_size % 2 ** (levels - 1):
        raise ValueError(
            f"the {preset!r} UNet halves the resolution {levels - 1} times: sample size {sample_size} "
            f"must be divisible by {2 ** (levels - 1)}"
        )
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        num_class_embeds=num_classes, **UNET_PRESETS[preset],
    )
