"""Files a run writes: atomic writes, image grids and the loss curve (checkpoints: :mod:`.checkpoint`)."""
from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Sequence

import torch


# What a killed atomic_write / atomic_write_folder leaves beside its file or folder.
TEMPORARY_GLOB = ".*.tmp"


def one_line(error: BaseException) -> str:
    """An error's message on one line (its type's name if it has none), for one-line errors."""
    return " ".join(str(error).split()) or type(error).__name__


class DiskFullError(OSError):
    """The disk filled up while a file was written; the previous file is intact."""


def atomic_write(data: bytes, path: Path) -> None:
    """Writes ``data`` to a temporary file beside ``path``, flushed to disk, then renamed over
    it: a crash or a full disk mid-write leaves the previous file intact (a killed process
    leaves the temporary file, which :func:`remove_stale_temporaries` clears)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(error.errno, f"disk full while writing {path}; the previous file is kept") from error
        raise


def atomic_write_folder(write: Callable[[Path], None], folder: Path) -> None:
    """Calls ``write(staging)`` to fill a new folder beside ``folder``, then renames it into
    place (over ``folder`` if that is an empty folder): a crash or a full disk leaves no half
    folder (a killed process leaves the staging folder, which :func:`remove_stale_temporaries`
    clears)."""
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        write(staging)
        os.replace(staging, folder)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(error.errno, f"disk full while writing {folder}") from error
        raise


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Deletes the temporary files and folders that killed saves left in ``folder``; returns them."""
    stale = list(Path(folder).glob(TEMPORARY_GLOB))
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def check_writable(folder: Path) -> None:
    """Creates ``folder`` if needed; raises ``PermissionError`` naming it when it cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PermissionError(f"cannot write to the output folder {folder}: {error.strerror or error}") from error


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 8, scale: int = 3) -> None:
    """Saves ``images [N, C, H, W]`` in [-1, 1] (C = 1 or 3) as one PNG grid, enlarged
    ``scale`` times (nearest) so small images stay visible."""
    from PIL import Image

    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    count, channels, height, width = images.shape
    rows = (count + columns - 1) // columns
    pad = 2
    grid = torch.full((channels, rows * (height + pad) + pad, columns * (width + pad) + pad), 255, dtype=torch.uint8)
    for i in range(count):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[:, top:top + height, left:left + width] = images[i]
    array = grid.permute(1, 2, 0).squeeze(-1).numpy()
    picture = Image.fromarray(array, mode="L" if channels == 1 else "RGB")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def save_loss_curve(losses: Sequence[float], path: Path, ylabel: str = "loss") -> None:
    """The training loss per step and its running mean, log scale, as a PNG (non-finite
    losses, from skipped steps, are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [v if math.isfinite(v) else float("nan") for v in losses]
    if not losses:
        return
    window = max(1, len(losses) // 50)
    running = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist() if len(losses) >= window else list(losses)
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot(range(1, len(losses) + 1), losses, color="0.75", linewidth=0.6, label="loss")
    axis.plot(range(window, window + len(running)), running, color="C0", label=f"mean of {window}")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
