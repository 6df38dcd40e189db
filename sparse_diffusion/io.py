"""Files a run writes: atomic checkpoints, image grids and the loss curve."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over
    it: a crash mid-save leaves the previous file intact."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


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


def save_loss_curve(losses: Sequence[float], path: Path) -> None:
    """The training loss per step and its running mean, log scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not losses:
        return
    window = max(1, len(losses) // 50)
    running = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist() if len(losses) >= window else list(losses)
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot(range(1, len(losses) + 1), losses, color="0.75", linewidth=0.6, label="loss")
    axis.plot(range(window, window + len(running)), running, color="C0", label=f"mean of {window}")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("noise-prediction MSE")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
