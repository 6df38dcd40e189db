"""From a training configuration to a model, its diffusion task and its data."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.utils.data import default_collate

import sparse_kernels as sk

from .data import get_dataset
from .diffusion import ImageDiffusion, StrokeDiffusion, make_scheduler
from .distributed import RankRandom
from .io import one_line
from .models.unet import build_unet

CHIRODIFF_PRESETS = {"tiny": dict(hidden_size=32, num_layers=1), "demo": {}, "small": {}, "paper": {}}


def build_task(config, device: torch.device) -> Tuple[nn.Module, torch.utils.data.Dataset]:
    """The diffusion task (with its denoiser, ``task.denoiser``) and the training set."""
    if config.model == "chirodiff":
        from .models.chirodiff import ChiroDiffNet

        dataset = get_dataset(config.dataset, "train", max_len=config.max_len, data_dir=config.data_dir,
                              limit=config.limit)
        if dataset.kind != "stroke":
            raise ValueError(f"--model chirodiff needs a stroke dataset (kanjivg, quickdraw:, vmnist:), got {config.dataset}")
        scheduler = make_scheduler(prediction=config.prediction)
        net = ChiroDiffNet(kind=config.chirodiff_kind, num_train_timesteps=scheduler.config.num_train_timesteps,
                           **CHIRODIFF_PRESETS.get(config.preset, {}))
        lengths = torch.stack([dataset[i][1] for i in range(len(dataset))])
        return StrokeDiffusion(net, scheduler, torch.bincount(lengths, minlength=dataset.max_len + 1)), dataset

    dataset = get_dataset(config.dataset, "train", image_size=config.image_size, data_dir=config.data_dir,
                          limit=config.limit)
    if dataset.kind != "image":
        raise ValueError(f"--model {config.model} needs an image dataset (fashion-mnist, images:), got {config.dataset}")
    if config.model == "pixel":
        unet = build_unet(config.preset, dataset.image_size, dataset.channels, dataset.num_classes)
        return ImageDiffusion(unet, make_scheduler(prediction=config.prediction)), dataset
    autoencoder = load_autoencoder(config.autoencoder)
    factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    unet = build_unet(config.preset, dataset.image_size // factor, autoencoder.config.latent_channels,
                      dataset.num_classes)
    scale = float(getattr(autoencoder.config, "scaling_factor", 1.0))
    return ImageDiffusion(unet, make_scheduler(prediction=config.prediction), autoencoder, scale), dataset


def load_autoencoder(path: str):
    """The diffusers ``AutoencoderKL`` saved in the local folder ``path``; a path that is not
    such a folder is a ``FileNotFoundError`` naming it (never a download from the Hub)."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--autoencoder {path}: no AutoencoderKL folder there ({folder / 'config.json'} is "
                                "missing); train one with `sparse-diffusion train-autoencoder --out PATH`")
    try:
        return AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as error:
        raise ValueError(f"--autoencoder {path}: cannot load it ({one_line(error)[:200]})") from None


def draw_batch(dataset, batch_size: int, random: RankRandom, device: torch.device):
    """``batch_size`` items drawn with replacement by ``random``, collated, on ``device``; under
    data parallelism, this rank's rows of the global batch (``random.rows``)."""
    indices = random.integers(len(dataset), batch_size).tolist()
    batch = default_collate([dataset[i] for i in indices])
    return [t.to(device, non_blocking=True) for t in batch]


@torch.no_grad()
def count_flops(task: nn.Module, dataset, device: torch.device) -> int:
    """FLOPs (2 x multiply-accumulates) of the denoiser's weight layers for one sample:
    every live weight once per output position (token, point or pixel)."""
    macs = []

    def hook(module, inputs, output):
        weights = module.values.numel() if isinstance(module, sk.BlockSparseModule) else module.weight.numel()
        out_features = getattr(module, "out_features", None) or getattr(module, "out_channels")
        macs.append(output.numel() // out_features * weights)

    layers = (nn.Linear, nn.Conv2d, sk.BlockSparseLinear, sk.BlockSparseConv2d)
    handles = [m.register_forward_hook(hook) for m in task.denoiser.modules() if isinstance(m, layers)]
    try:
        batch = draw_batch(dataset, 1, RankRandom(torch.Generator().manual_seed(0)), device)
        task.loss(batch, RankRandom(torch.Generator().manual_seed(0)))
    finally:
        for handle in handles:
            handle.remove()
    return 2 * sum(macs)


def metric_inputs(config, samples):
    """``(cache name, reference images, reference labels, sample images)`` for the evaluator:
    the dataset's test split (its first ``config.eval_reference`` items, or as many as samples
    when that is 0; strokes rasterised) and ``samples`` (images ``[N, C, H, W]``, or strokes
    ``(points, lengths)``)."""
    from .metrics.raster import rasterize_strokes

    num_samples = samples[1].shape[0] if isinstance(samples, tuple) else samples.shape[0]
    test = get_dataset(config.dataset, "test", image_size=config.image_size, max_len=config.max_len,
                       data_dir=config.data_dir)
    count = min(config.eval_reference or num_samples, len(test))
    items = default_collate([test[i] for i in range(count)])
    if test.kind == "stroke":
        return f"{test.name}-raster64", rasterize_strokes(*items, size=64), None, rasterize_strokes(*samples, size=64)
    labels = items[1] if test.num_classes else None
    return test.name, items[0], labels, samples.cpu()
