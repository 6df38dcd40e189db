"""``sparse-diffusion train-autoencoder``: an AutoencoderKL for latent diffusion, from scratch."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .data import get_dataset
from .distributed import RankRandom
from .io import check_writable, save_image_grid
from .models.autoencoder import autoencoder_loss, build_autoencoder, latent_scale
from .tasks import draw_batch


def train_autoencoder(
    dataset: str,
    out: str,
    preset: str = "demo",
    image_size: Optional[int] = None,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    data_dir: Optional[str] = None,
    limit: Optional[int] = None,
    device: str = "auto",
) -> Path:
    """Trains an ``AutoencoderKL`` on ``dataset`` and saves it as a diffusers folder ``out``
    (``from_pretrained`` loads it), with ``scaling_factor`` set to 1 / std of its latents and
    a reconstruction grid ``out/reconstructions.png``."""
    from tqdm.auto import tqdm

    from .config import resolve_device

    target = resolve_device(device)
    out_path = Path(out)
    check_writable(out_path)
    data = get_dataset(dataset, "train", image_size=image_size, data_dir=data_dir, limit=limit)
    if data.kind != "image":
        raise ValueError(f"an autoencoder needs an image dataset, {dataset} holds strokes")
    torch.manual_seed(seed)
    autoencoder = build_autoencoder(preset, data.image_size, data.channels).to(target)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=lr)
    bar = tqdm(range(steps), desc="autoencoder", unit="step", dynamic_ncols=True)
    for step in bar:
        random = RankRandom(torch.Generator().manual_seed(seed * 1_000_003 + step))
        images, _ = draw_batch(data, batch_size, random, target)
        loss, _ = autoencoder_loss(autoencoder, images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    autoencoder.eval()
    images, _ = draw_batch(data, min(256, len(data)), RankRandom(torch.Generator().manual_seed(seed)), target)
    autoencoder.register_to_config(scaling_factor=latent_scale(autoencoder, images))
    autoencoder.save_pretrained(out_path)
    with torch.no_grad():
        _, reconstruction = autoencoder_loss(autoencoder, images[:32])
    save_image_grid(torch.cat([images[:32], reconstruction]).cpu(), out_path / "reconstructions.png")
    return out_path
