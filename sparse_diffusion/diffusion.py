"""Diffusion tasks: the training loss and the sampler of each kind of model.

* :class:`ImageDiffusion`: a diffusers ``UNet2DModel`` predicting the noise of images in
  pixel space, or of their latents under a frozen ``AutoencoderKL`` (latent diffusion);
  class-conditional when the UNet has ``num_class_embeds``.
* :class:`StrokeDiffusion`: ChiroDiff, a network predicting the noise of stroke sequences
  ``(x, y, pen)``; the pen bit is diffused as ``+-1`` and thresholded at 0 when sampling.
  It shares the images' 1000-step linear schedule (the ChiroDiff paper used 35 steps; the
  sampler's step count, ``--sample-steps``, is what sets the cost of sampling).

Training uses ``DDPMScheduler`` (noise or velocity prediction); sampling uses DDIM or DDPM
with the same betas. All randomness comes from the caller: a training loss draws from a
:class:`~sparse_diffusion.distributed.RankRandom` (the step's generator and this rank's rows of
the global batch), sampling from a generator, so a run that resumes from a checkpoint draws
exactly what the uninterrupted run drew.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import RankRandom


def make_scheduler(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                   prediction: str = "epsilon"):
    """The training noise schedule (linear betas, as DDPM and latent diffusion); the network
    predicts the noise (``epsilon``) or the velocity (``v``, faster to train at small budgets)."""
    from diffusers import DDPMScheduler

    if prediction not in ("epsilon", "v"):
        raise ValueError(f"prediction must be 'epsilon' or 'v', got {prediction!r}")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule="linear", prediction_type="epsilon" if prediction == "epsilon" else "v_prediction")


def _target(scheduler, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the network learns to predict: the noise, or the velocity."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return noise


# Samples per network call while sampling. One call on all of an evaluation's samples (1,000 or
# more) holds every activation of every sample at once: on the 2-core CPU it was 1.6x slower than
# calls of 64 (the demo UNet at 50% sparsity, 1,000 samples: 3.9 s against 2.4 s per timestep,
# the same outputs to the bit there; in general within float32 rounding), and at paper scale it
# would not fit in a GPU's memory.
SAMPLE_BATCH = 64


def in_batches(fn, batch_size: int, *tensors: Optional[Tensor]) -> Tensor:
    """``fn(*slices)`` on consecutive slices of ``batch_size`` rows of ``tensors`` (``None``
    stays ``None``), concatenated: what ``fn(*tensors)`` returns, with a bounded batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    num = tensors[0].shape[0]
    return torch.cat([fn(*(None if t is None else t[start:start + batch_size] for t in tensors))
                      for start in range(0, max(num, 1), batch_size)])  # 0 rows: one empty call


def sampling_scheduler(train_scheduler, sampler: str, steps: int):
    """A DDIM or DDPM scheduler sharing ``train_scheduler``'s betas, set to ``steps`` steps."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    scheduler = cls.from_config(train_scheduler.config)
    scheduler.set_timesteps(min(steps, train_scheduler.config.num_train_timesteps))
    return scheduler


def noise_and_timesteps(x0: Tensor, scheduler, random: RankRandom) -> Tuple[Tensor, Tensor]:
    """The training noise (shaped like ``x0``) and a timestep per item, drawn for the global
    batch and kept for this rank's rows of it (``x0`` holds those rows)."""
    noise = random.normal_like(x0)
    timesteps = random.integers(scheduler.config.num_train_timesteps, x0.shape[0])
    return noise, timesteps.to(x0.device)


class ImageDiffusion(nn.Module):
    """Noise prediction on images ``[B, C, H, W]`` in [-1, 1], in pixel or latent space.

    Args:
        unet: the denoiser (trained, possibly block-sparse).
        scheduler: the training ``DDPMScheduler``.
        autoencoder: a frozen ``AutoencoderKL`` for latent diffusion, or ``None``.
        latent_scale: multiplies latents to unit variance (see ``models.autoencoder.latent_scale``).
    """

    def __init__(self, unet: nn.Module, scheduler, autoencoder: Optional[nn.Module] = None, latent_scale: float = 1.0):
        super().__init__()
        self.unet, self.scheduler, self.latent_scale = unet, scheduler, latent_scale
        self.autoencoder = autoencoder
        if autoencoder is not None:
            autoencoder.requires_grad_(False).eval()

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def conditional(self) -> bool:
        return self.unet.config.num_class_embeds is not None

    def encode(self, images: Tensor, random: RankRandom) -> Tensor:
        if self.autoencoder is None:
            return images
        with torch.no_grad():
            posterior = self.autoencoder.encode(images).latent_dist
            sample = posterior.mean + posterior.std * random.normal_like(posterior.mean)
        return sample * self.latent_scale

    def decode(self, latents: Tensor) -> Tensor:
        if self.autoencoder is None:
            return latents
        return self.autoencoder.decode(latents / self.latent_scale).sample

    def loss(self, batch, random: RankRandom, network: Optional[nn.Module] = None) -> Tensor:
        """The noise-prediction MSE of one batch ``(images, labels)``, its noise and timesteps
        drawn by ``random``. Under data parallelism ``batch`` holds this rank's rows of the
        global batch (``random`` draws the noise for the whole batch and keeps the same rows),
        and ``network`` is the DDP wrapper of the UNet."""
        images, labels = batch
        x0 = self.encode(images, random)
        noise, timesteps = noise_and_timesteps(x0, self.scheduler, random)
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        network = network if network is not None else self.unet
        prediction = network(noisy, timesteps, class_labels=labels if self.conditional else None).sample
        return F.mse_loss(prediction.float(), _target(self.scheduler, x0, noise, timesteps).float())

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator, labels: Optional[Tensor] = None,
               sampler: str = "ddim", steps: int = 50, batch_size: int = SAMPLE_BATCH) -> Tensor:
        """``num`` images ``[num, C, H, W]`` in [-1, 1]; ``labels [num]`` for a conditional UNet
        (default: the classes in turn). The UNet (and the decoder) see ``batch_size`` samples at
        a time; the sampler steps all of them together, so the result does not depend on it
        (up to float32 rounding)."""
        device = next(self.unet.parameters()).device
        config = self.unet.config
        if self.conditional and labels is None:
            labels = torch.arange(num) % config.num_class_embeds
        labels = labels.to(device) if labels is not None and self.conditional else None
        scheduler = sampling_scheduler(self.scheduler, sampler, steps)
        x = torch.randn(num, config.in_channels, config.sample_size, config.sample_size, generator=generator)
        x = x.to(device)

        def predict(x_part, t_part, labels_part):
            return self.unet(x_part, t_part, class_labels=labels_part).sample

        for t in scheduler.timesteps:
            prediction = in_batches(predict, batch_size, x, t.to(device).expand(num), labels)
            x = scheduler.step(prediction, t, x, generator=generator).prev_sample
        return in_batches(self.decode, batch_size, x).clamp(-1, 1)


class StrokeDiffusion(nn.Module):
    """ChiroDiff: noise prediction on stroke sequences ``points [B, L, 3]`` with ``lengths [B]``.

    The pen channel (1 at the last point of a stroke) is diffused as ``2 * pen - 1``; the
    loss counts valid points only. Sampling draws lengths from ``length_counts`` (the
    training set's histogram) and thresholds the pen channel at 0.
    """

    def __init__(self, net: nn.Module, scheduler, length_counts: Tensor):
        super().__init__()
        self.net, self.scheduler = net, scheduler
        self.register_buffer("length_counts", length_counts.float())

    @property
    def denoiser(self) -> nn.Module:
        return self.net

    def loss(self, batch, random: RankRandom, network: Optional[nn.Module] = None) -> Tensor:
        """The MSE over the valid points of one batch ``(points, lengths)``. Under data
        parallelism (``random``, ``network``: see :meth:`ImageDiffusion.loss`) the mean is over
        the valid points of the whole global batch, scaled so that DDP's average of the ranks'
        gradients is the single-process gradient."""
        points, lengths = batch
        valid = (torch.arange(points.shape[1], device=points.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        x0 = torch.cat([points[..., :2], 2 * points[..., 2:] - 1], dim=-1) * valid
        noise, timesteps = noise_and_timesteps(x0, self.scheduler, random)
        noisy = self.scheduler.add_noise(x0, noise * valid, timesteps)
        network = network if network is not None else self.net
        prediction = network(noisy, timesteps, lengths)
        target = _target(self.scheduler, x0, noise * valid, timesteps)
        squared = (prediction.float() - target.float()).square() * valid
        count = valid.sum() * points.shape[-1]
        if random.is_part and dist.is_initialized():
            count = count.float()
            dist.all_reduce(count)
            return squared.sum() * random.share / count.clamp_min(1)  # share: the world size
        return squared.sum() / count.clamp_min(1)

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator, sampler: str = "ddim", steps: int = 50,
               lengths: Optional[Tensor] = None, batch_size: int = SAMPLE_BATCH) -> Tuple[Tensor, Tensor]:
        """``(points [num, L, 3] with pen in {0, 1}, lengths [num])``; the network sees
        ``batch_size`` samples at a time (as :meth:`ImageDiffusion.sample`)."""
        device = self.length_counts.device
        max_len = self.length_counts.numel() - 1
        if lengths is None:
            lengths = torch.multinomial(self.length_counts.cpu(), num, replacement=True, generator=generator)
        lengths = lengths.clamp(1, max_len).to(device)
        valid = (torch.arange(max_len, device=device)[None, :] < lengths[:, None]).unsqueeze(-1)
        scheduler = sampling_scheduler(self.scheduler, sampler, steps)
        x = torch.randn(num, max_len, 3, generator=generator).to(device) * valid
        for t in scheduler.timesteps:
            prediction = in_batches(self.net, batch_size, x, t.to(device).expand(num), lengths)
            x = scheduler.step(prediction, t, x, generator=generator).prev_sample * valid
        pen = (x[..., 2:] > 0).to(x.dtype)
        last = torch.nn.functional.one_hot(lengths - 1, max_len).unsqueeze(-1).to(x.dtype)
        pen = torch.maximum(pen, last) * valid  # every sample ends a stroke at its last point
        return torch.cat([x[..., :2], pen], dim=-1), lengths
