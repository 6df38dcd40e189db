"""Sparsifiable diffusion models: diffusers UNets and autoencoders, and ChiroDiff."""
from .autoencoder import AUTOENCODER_PRESETS, autoencoder_loss, build_autoencoder, latent_scale
from .chirodiff import ChiroDiffNet
from .unet import UNET_PRESETS, build_unet

__all__ = [
    "AUTOENCODER_PRESETS",
    "ChiroDiffNet",
    "UNET_PRESETS",
    "autoencoder_loss",
    "build_autoencoder",
    "build_unet",
    "latent_scale",
]
