"""Data-parallel training under ``torchrun``: which process this is, and what it shares.

``torchrun --nproc-per-node N -m sparse_diffusion train ...`` starts N processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous) in their environment.
:func:`from_environment` reads them, checks the settings, initialises the process group and
returns a :class:`Distributed`; outside torchrun it returns :data:`SINGLE` and nothing changes.

The split is exact: every rank draws the whole global batch's randomness (item indices, noise,
timesteps) from the step-seeded generator and keeps its own rows (:class:`RankRandom`), so the
union over ranks is the batch a single process would train on, whatever the world size.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

BACKENDS = ("nccl", "gloo")
TIMEOUT = datetime.timedelta(minutes=30)  # FID generation on rank 0 can be long
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class Rows(NamedTuple):
    """Rows ``[start, stop)`` of a global batch of ``total`` items."""

    start: int
    stop: int
    total: int


@dataclass(frozen=True)
class RankRandom:
    """The random draws of one step, and this process's rows of the global batch.

    Every draw is made for the whole global batch (``rows.total`` items) from ``generator`` and
    this process keeps its ``rows``: the generator advances as it would in a single process, so
    the union over ranks is what one process draws. Without ``rows`` (one process) a draw is as
    large as asked. The step makes one (:meth:`Distributed.random`) and hands it to the batch
    draw (:func:`~sparse_diffusion.tasks.draw_batch`) and to the task's loss.
    """

    generator: torch.Generator
    rows: Optional[Rows] = None

    @property
    def is_part(self) -> bool:
        """Whether this process holds only part of the global batch."""
        return self.rows is not None and self.rows.stop - self.rows.start < self.rows.total

    @property
    def share(self) -> float:
        """The global batch over this process's part of it (the world size; 1 in one process)."""
        return self.rows.total / (self.rows.stop - self.rows.start) if self.is_part else 1.0

    def draw(self, draw: Callable[[int], Tensor], size: int) -> Tensor:
        """``draw(n)`` for the whole batch (``rows.total`` items, or ``size`` without ``rows``),
        then this process's rows."""
        if self.rows is None:
            return draw(size)
        return draw(self.rows.total)[self.rows.start:self.rows.stop]

    def integers(self, high: int, size: int) -> Tensor:
        """Integers in ``[0, high)``: ``size`` of them (this process's rows of the batch)."""
        return self.draw(lambda n: torch.randint(0, high, (n,), generator=self.generator), size)

    def normal_like(self, x: Tensor) -> Tensor:
        """Standard normal noise shaped like ``x`` (this process's rows), on its device and dtype."""
        noise = self.draw(lambda n: torch.randn((n, *x.shape[1:]), generator=self.generator), x.shape[0])
        return noise.to(x.device, x.dtype)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job. ``SINGLE`` (no process group) makes every method a
    no-op; so does a torchrun job of one process, which still trains under DDP."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: no process group (not launched by torchrun)
    device: Optional[torch.device] = None  # the device this rank trains on (None: --device decides)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder."""
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """Whether this process belongs to a torchrun job (a process group exists)."""
        return self.backend is not None

    @property
    def active(self) -> bool:
        """Whether there are other ranks to share with."""
        return self.world_size > 1

    def random(self, generator: torch.Generator, batch_size: int) -> RankRandom:
        """A step's draws from ``generator`` for a global batch of ``batch_size``, and this rank's
        rows of it (all of them in a single process)."""
        if not self.active:
            return RankRandom(generator)
        share = batch_size // self.world_size
        return RankRandom(generator, Rows(self.rank * share, (self.rank + 1) * share, batch_size))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean_and_any(self, value: torch.Tensor, flag: bool) -> Tuple[float, bool]:
        """The mean over ranks of a scalar tensor, as a float (the loss of the global batch),
        and whether ``flag`` is set on any rank: one all-reduce, every rank gets the same answer."""
        if not self.active:
            return value.item(), flag
        packed = torch.stack([value.detach().double().reshape(()),
                              torch.tensor(float(flag), dtype=torch.float64, device=value.device)])
        dist.all_reduce(packed)
        total, flags = packed.tolist()
        return total / self.world_size, flags > 0

    def gather(self, value: Any) -> List[Any]:
        """``value`` of every rank, in rank order, on every rank."""
        if not self.active:
            return [value]
        values: List[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def close(self, wait: bool = True) -> None:
        """Ends the process group; ``wait``: first wait for every rank (none tears down its
        connections while another still uses them). After an error, do not wait: torchrun
        stops the other ranks."""
        if self.launched and dist.is_initialized():
            if wait and self.active:
                dist.barrier()
            dist.destroy_process_group()


SINGLE = Distributed()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def from_environment(device: str = "auto", backend: Optional[str] = None,
                     batch_size: Optional[int] = None) -> Distributed:
    """The :class:`Distributed` of this process: :data:`SINGLE` outside torchrun, else an
    initialised process group (of one process too: ``torchrun --nproc-per-node 1`` trains
    under DDP, which is how a one-GPU machine checks the multi-GPU path).

    Backend: ``backend`` if given, else NCCL when this node has a GPU for each of its ranks and
    ``device`` is not ``cpu``, else gloo. Each rank trains on ``cuda:LOCAL_RANK`` with a GPU,
    on the CPU otherwise. Settings that cannot work are a one-line ``ValueError`` before any
    connection is made: NCCL with ``--device cpu`` or without a GPU per local rank, a
    ``--device cuda:N`` (the local rank picks the GPU), a global batch the world size does not
    divide.
    """
    if not launched_by_torchrun():
        return SINGLE
    rank, world_size, local_rank = (int(os.environ[name]) for name in _TORCHRUN_VARIABLES)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"--dist-backend must be one of {BACKENDS}, got {backend!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK or the CPU; "
                         "pass --device auto, cuda or cpu")
    use_gpu = device != "cpu" and gpus >= local_world
    if device == "cuda" and not use_gpu:
        raise ValueError(f"--device cuda under torchrun needs a GPU per local rank: {local_world} ranks on this "
                         f"node, {gpus} GPUs")
    backend = backend or ("nccl" if use_gpu else "gloo")
    if backend == "nccl" and not use_gpu:
        why = "--device cpu" if device == "cpu" else f"{local_world} ranks on this node and {gpus} GPUs"
        raise ValueError(f"--dist-backend nccl needs a GPU per rank ({why}); use gloo for CPU training")
    if batch_size is not None and batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} (the global batch) is not divisible by the world size "
                         f"{world_size}: each rank needs an equal share")
    if use_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=TIMEOUT)
    return Distributed(rank, world_size, local_rank, backend,
                       torch.device("cuda", local_rank) if use_gpu else torch.device("cpu"))
