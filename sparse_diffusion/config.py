"""The settings of a training run (:class:`TrainConfig`, what ``sparse-diffusion train`` takes)
and the device they name.

Each setting is declared once, as a field with its help and choices (:func:`setting`): the
``train`` flags are generated from the fields (:func:`flag` names them, :func:`setting_type`
types them) and :meth:`TrainConfig.validate` checks the choices, so a new setting is one line."""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

from .algorithms import MagRan, RigL, Static
from .distributed import BACKENDS
from .models.chirodiff import KINDS as CHIRODIFF_KINDS
from .models.unet import UNET_PRESETS
from .sparsify import DISTRIBUTIONS

METHODS = {"dense": None, "static": Static, "rigl": RigL, "magran": MagRan}
PRECISIONS = ("fp32", "bf16", "fp16")
# Fields that define what a checkpoint is; a resume must match them all.
IDENTITY = (
    "model", "dataset", "method", "sparsity", "block_size", "distribution", "preset", "image_size", "max_len",
    "chirodiff_kind", "seed", "batch_size", "drop_fraction", "update_interval", "limit", "prediction",
    "regrow_dropped",
)
# Settings that mean nothing for a dense run.
SPARSE_ONLY = ("sparsity", "block_size", "distribution", "drop_fraction", "update_interval", "regrow_dropped")
# Where a run is and what it runs on, not what it computes (`compile` changes how the
# denoiser runs, not what it computes, up to fp32 rounding). A latent run keeps its own copy
# of the autoencoder (RUN/autoencoder, AUTOENCODER_COPY) and reads that one, so the
# `autoencoder` it was given is a place too.
PLACE = ("out", "device", "data_dir", "autoencoder", "dist_backend", "compile")
AUTOENCODER_COPY = "autoencoder"


def setting(default: Any, help: str, choices: Optional[Sequence] = None, parse: Optional[Callable] = None) -> Any:
    """A :class:`TrainConfig` field: its default, the help of its ``train`` flag and, for a
    setting with a fixed set of values, those values (the flag's choices, checked by
    :meth:`TrainConfig.validate`); ``parse`` turns the flag's text into the value where the
    annotation's type cannot (:func:`block_shape`). The flag is generated from it (``sparse_diffusion.cli``)."""
    metadata = {"help": help, **({"choices": tuple(choices)} if choices is not None else {}),
                **({"parse": parse} if parse is not None else {})}
    return dataclasses.field(default=default, metadata=metadata)


# A block size as a run's settings keep it: an int for square blocks (16 is 16x16), "BOxBI" for
# the others ("16x1": 16 output channels x 1 input channel, a vector block).
BlockShape = Union[int, str]


def block_shape(value: Any) -> BlockShape:
    """``value`` (an int, ``"16"``, ``"16x1"``, ``"16x16"`` or a pair) as a :data:`BlockShape`:
    square blocks as their side, others as ``"BOxBI"``; a ``ValueError`` naming it otherwise."""
    pair = None
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, str) and (match := re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+)\s*)?", value)):
        pair = (int(match.group(1)), int(match.group(2) or match.group(1)))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        pair = tuple(value)
    if pair is None or min(pair) < 1:
        raise ValueError(f"--block-size must be a positive size, N (square) or BOxBI such as 16x1, got {value!r}")
    return pair[0] if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def block_pair(shape: BlockShape) -> Tuple[int, int]:
    """A :data:`BlockShape` as ``(bo, bi)``: ``16 -> (16, 16)``, ``"16x1" -> (16, 1)``."""
    shape = block_shape(shape)
    if isinstance(shape, int):
        return (shape, shape)
    bo, bi = shape.split("x")
    return (int(bo), int(bi))


def flag(name: str) -> str:
    """The ``train`` flag of the :class:`TrainConfig` field ``name``: ``block_size`` is ``--block-size``."""
    return "--" + name.replace("_", "-")


def setting_type(field: dataclasses.Field) -> Callable:
    """How a :class:`TrainConfig` field's flag text becomes its value: its ``parse`` function, or
    the annotation's int, float, str or bool (``Optional[X]`` is X; its default None leaves the
    setting to the run)."""
    if "parse" in field.metadata:
        return field.metadata["parse"]
    kind = typing.get_type_hints(TrainConfig)[field.name]
    if typing.get_origin(kind) is typing.Union:
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return kind


@dataclass
class TrainConfig:
    """Everything a training run depends on (see ``sparse-diffusion train --help``): each field is
    one ``train`` flag, ``x_y`` as ``--x-y``, declared with its help and choices by :func:`setting`."""

    out: str = setting("runs/run", "the run folder")
    model: str = setting("pixel", "pixel-space UNet, latent diffusion (needs --autoencoder), or ChiroDiff on strokes",
                         choices=("pixel", "ldm", "chirodiff"))
    dataset: str = setting("fashion-mnist", "fashion-mnist | kanjivg | images:PATH | quickdraw:PATH | vmnist:PATH")
    method: str = setting("dense", "dense (no sparsity), static (a fixed mask), rigl (drop the smallest blocks, grow "
                          "by gradient) or magran (drop the smallest, grow at random)", choices=sorted(METHODS))
    sparsity: float = setting(0.5, "fraction of weights removed (sparsified layers)")
    block_size: BlockShape = setting(32, "the blocks the weights are cut into: N (N x N), or BOxBI such as 16x1 "
                                     "(16 output channels x 1 input channel, with all of a convolution's taps); "
                                     "1 = unstructured (masked reference path)", parse=block_shape)
    distribution: str = setting("erk", "how the density is spread over the layers: uniform, er or erk (RigL's)",
                                choices=DISTRIBUTIONS)
    drop_fraction: float = setting(0.3, "the paper's prune-and-regrowth ratio")
    update_interval: int = setting(100, "RigL/MagRan: steps between mask updates")
    regrow_dropped: bool = setting(
        True, "RigL/MagRan: a block just dropped may be regrown, as in the RigL paper (default); "
        "--no-regrow-dropped grows only blocks dead before the update, so exactly k move")
    steps: int = setting(1000, "optimizer steps to train")
    batch_size: int = setting(64, "the global batch: under torchrun each of the N processes trains on batch-size / N "
                              "of it")
    lr: float = setting(1e-3, "AdamW's learning rate")
    weight_decay: float = setting(0.01, "AdamW's weight decay")
    grad_clip: Optional[float] = setting(None, "clip the gradient norm to this (default: no clipping)")
    precision: str = setting("fp32", "fp32, or autocast to bf16 / fp16", choices=PRECISIONS)
    seed: int = setting(0, "the seed of the initialisation, the masks, the data order and the noise")
    preset: str = setting("demo", "model size: tiny (tests), demo (CPU), small, paper (the paper's LDM UNet; GPU)",
                          choices=tuple(UNET_PRESETS))
    image_size: Optional[int] = setting(None, "resize images (default: the dataset's own)")
    max_len: int = setting(64, "points per stroke sequence")
    chirodiff_kind: str = setting("gru", "ChiroDiff's network: a bidirectional GRU or a transformer",
                                  choices=CHIRODIFF_KINDS)
    autoencoder: Optional[str] = setting(None, "a diffusers AutoencoderKL folder (for --model ldm)")
    ema_decay: float = setting(0.999, "decay of the weights' moving average (the EMA samples and is evaluated)")
    prediction: str = setting("epsilon", "the network predicts the noise or the velocity (v: faster to train at "
                              "small budgets)", choices=("epsilon", "v"))
    sampler: str = setting("ddim", "the sampler of sample grids and evaluations", choices=("ddim", "ddpm"))
    sample_steps: int = setting(50, "denoising steps per sample")
    sample_every: int = setting(0, "steps between sample grids (0: at the end)")
    checkpoint_every: int = setting(500, "steps between checkpoints (0: at the end only)")
    eval_samples: int = setting(0, "samples for FID at the end (0: none)")
    eval_every: int = setting(0, "evaluate every N steps too (metrics.json 'curve': FID vs steps and training "
                              "wall-clock; the evaluations' own time is not counted as training)")
    eval_reference: int = setting(0, "test-split items the metrics compare with (0: as many as the samples; more "
                                  "than the split: all)")
    data_dir: Optional[str] = setting(None, "where Fashion-MNIST's files are (default: Debian's location)")
    limit: Optional[int] = setting(None, "use only the first N training items")
    device: str = setting("auto", "auto (the first GPU, else the CPU), cpu, cuda, cuda:N; under torchrun: each rank "
                          "takes cuda:LOCAL_RANK")
    compile: bool = setting(False, "run the denoiser's training forward and backward under torch.compile (the "
                            "sparse ops inside the graph); on a 2-core CPU it changed the step by -4% to +1%, "
                            "see the README")
    dist_backend: Optional[str] = setting(None, "under torchrun: the process group's backend (default: nccl with a "
                                          "GPU per rank, else gloo)", choices=BACKENDS)

    def __post_init__(self) -> None:
        self.block_size = block_shape(self.block_size)  # one spelling per shape: 16, never "16x16"

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value, allowed = getattr(self, field.name), field.metadata.get("choices")
            if allowed is not None and value is not None and value not in allowed:
                raise ValueError(f"{flag(field.name)} must be one of {', '.join(allowed)}; got {value!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"--steps and --batch-size must be positive, got {self.steps} and {self.batch_size}")
        if self.method not in ("dense", "static") and self.steps < self.update_interval:
            raise ValueError(f"--steps ({self.steps}) must be at least --update-interval ({self.update_interval})")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1], got {self.ema_decay}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if min(self.checkpoint_every, self.sample_every, self.eval_samples, self.eval_every, self.eval_reference) < 0:
            raise ValueError("--checkpoint-every, --sample-every, --eval-samples, --eval-every and --eval-reference "
                             "must be >= 0")
        if self.eval_every and not self.eval_samples:
            raise ValueError(f"--eval-every {self.eval_every} needs --eval-samples N (how many samples each FID uses)")
        if self.model == "ldm" and not self.autoencoder:
            raise ValueError(
                "--model ldm needs --autoencoder PATH (a diffusers AutoencoderKL folder); train one with "
                "`sparse-diffusion train-autoencoder --dataset ... --out runs/ae` and pass --autoencoder runs/ae"
            )


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; a device that this
    machine does not have is a ``ValueError`` naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no usable CUDA device (torch.cuda.is_available() "
                             "is False); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device
