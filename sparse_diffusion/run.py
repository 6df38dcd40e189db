"""A run folder: one per run, self-contained, the truth about its run.

It holds ``config.json`` (the settings in effect, and under ``changes`` those a resume
changed), ``checkpoint.safetensors`` (the whole :class:`~sparse_diffusion.state.TrainState`:
tensors in safetensors and the rest in JSON, so loading it runs no code; written atomically),
``samples/step-*.png``, ``loss.png``, ``metrics.json``, ``summary.md`` and, for a latent run,
``autoencoder/`` (its own copy of the autoencoder). It can be copied or moved: ``sample``,
``evaluate``, ``export`` and ``--resume`` read the folder they are given, whatever path its
``config.json`` was written under.

:class:`Run` knows where each file is and writes and reads them; :func:`load_run` opens a
finished (or interrupted) run read-only, as a :class:`LoadedRun`. Folders written by older
versions are brought up to date once, here, by :mod:`.migrations`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .checkpoint import CheckpointError, load_state, non_finite_tensors, save_state
from .config import AUTOENCODER_COPY, IDENTITY, TrainConfig, resolve_device
from .io import atomic_write_folder, check_writable, remove_stale_temporaries, save_image_grid, save_loss_curve
from .migrations import LEGACY_CHECKPOINT, migrate_checkpoint, migrate_config, refuse_legacy_checkpoint
from .state import TrainState, check_precision
from .tasks import load_autoencoder

CHECKPOINT = "checkpoint.safetensors"
# What a training checkpoint holds at least.
CHECKPOINT_KEYS = {"config", "step", "model", "optimizer", "ema", "algo", "losses"}


class Run:
    """The folder of the run ``config`` describes (``config.out``), and its files.

    Make one with :meth:`for_training` (checks the folder before a run starts or resumes) or
    :meth:`open` (an existing run, read-only: nothing in it is written, so a run the user
    cannot write can still be read).
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.folder = Path(config.out)
        self.checkpoint_path = self.folder / CHECKPOINT

    # ------------------------------------------------------------------ opening
    @classmethod
    def for_training(cls, config: TrainConfig, resume: bool = False, writes: bool = True) -> "Run":
        """The folder a run trains in. ``writes`` (the process that writes it, rank 0): it is
        created if needed, checked writable, and cleared of the temporary files killed saves
        left. A new run is refused where a run already is, a resume where no checkpoint is."""
        run = cls(config)
        if writes:
            check_writable(run.folder)
            remove_stale_temporaries(run.folder)
        run._check_checkpoint(resume)
        return run

    @classmethod
    def open(cls, folder: str, device: str = "auto") -> "Run":
        """The existing run in ``folder``, read-only, its settings from ``config.json``
        (migrated), its place ``folder`` and ``device`` (the folder is the truth, not the
        ``out`` its config.json was written with)."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a run folder: {path} is missing")
        try:
            fields = json.loads(path.read_text())
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a valid run configuration: {error}") from None
        fields.pop("changes", None)
        fields = migrate_config(fields)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{path} has settings this version does not know: {', '.join(unknown)}")
        fields.update(out=str(folder), device=device)
        config = TrainConfig(**fields)
        config.validate()
        run = cls(config)
        run._check_checkpoint(resume=True)
        return run

    def _check_checkpoint(self, resume: bool) -> None:
        if resume and not self.checkpoint_path.exists():
            refuse_legacy_checkpoint(self.folder)
            raise FileNotFoundError(f"there is no checkpoint in {self.folder} ({self.checkpoint_path} is missing)")
        if not resume and (self.checkpoint_path.exists() or (self.folder / LEGACY_CHECKPOINT).exists()):
            raise FileExistsError(f"{self.folder} already holds a run: pass --resume to continue it, or choose "
                                  "another --out")

    # ------------------------------------------------------------------ the autoencoder of a latent run
    def own_autoencoder(self, write: bool = False) -> Optional[str]:
        """The folder of the run's own copy of its autoencoder (``RUN/autoencoder``), which a
        latent run reads instead of ``--autoencoder``; ``write``: make the copy if there is none
        yet. None for other runs, and where there is no copy."""
        if self.config.model != "ldm":
            return None
        folder = self.folder / AUTOENCODER_COPY
        if write and not (folder / "config.json").is_file():
            autoencoder = load_autoencoder(self.config.autoencoder)
            atomic_write_folder(lambda staging: autoencoder.save_pretrained(staging, safe_serialization=True), folder)
        return str(folder) if (folder / "config.json").is_file() else None

    # ------------------------------------------------------------------ the checkpoint
    def write_checkpoint(self, state: Dict) -> None:
        """Writes a :meth:`TrainState.state_dict` to ``checkpoint.safetensors``, atomically."""
        save_state(state, self.checkpoint_path)

    def read_checkpoint(self, device: torch.device) -> Dict:
        """The checkpoint, tensors on ``device``, migrated (:mod:`.migrations`) and checked: a
        training checkpoint of this run's identity settings (``IDENTITY``) with finite weights.
        Anything else is a one-line ``CheckpointError`` or ``ValueError`` naming the file."""
        path = self.checkpoint_path
        state = load_state(path, device)
        missing = CHECKPOINT_KEYS - set(state)
        if missing:
            raise CheckpointError(f"{path} lacks {sorted(missing)}: it is not a training checkpoint")
        state = migrate_checkpoint(state, self.read_metrics())
        saved = state["config"]
        mismatched = {k: (saved.get(k), getattr(self.config, k)) for k in IDENTITY
                      if saved.get(k) != getattr(self.config, k)}
        if mismatched:
            details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"cannot resume {path}: the run was made with other settings ({details})")
        bad = non_finite_tensors({"model": state["model"], "ema": state["ema"]["shadow_params"]})
        if bad:
            raise CheckpointError(f"{path} holds non-finite weights ({', '.join(bad[:3])}"
                                  f"{', ...' if len(bad) > 3 else ''}): refused")
        return state

    # ------------------------------------------------------------------ other files
    def write_config(self, changes: List[Dict]) -> None:
        """``config.json``: the settings in effect, and under ``changes`` those a resume changed."""
        record = {**dataclasses.asdict(self.config), "changes": changes}
        (self.folder / "config.json").write_text(json.dumps(record, indent=2) + "\n")

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.json"

    def write_metrics(self, results: Dict) -> None:
        self.metrics_path.write_text(json.dumps(results, indent=2) + "\n")

    def read_metrics(self) -> Optional[Dict]:
        """``metrics.json`` as written at the end of the last training (or by ``evaluate``), or
        None where there is none; a file that is not a JSON object is a one-line ``ValueError``."""
        if not self.metrics_path.is_file():
            return None
        try:
            metrics = json.loads(self.metrics_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.metrics_path} is not valid JSON ({error}): move it aside to go on") from None
        if not isinstance(metrics, dict):
            raise ValueError(f"{self.metrics_path} is not a JSON object: move it aside to go on")
        return metrics

    def write_summary(self, text: str, path: Optional[Path] = None) -> Path:
        """``summary.md`` (or ``path``)."""
        path = Path(path) if path is not None else self.folder / "summary.md"
        path.write_text(text)
        return path

    def sample_grids(self) -> List[Path]:
        """The sample grids written so far, oldest first."""
        return sorted((self.folder / "samples").glob("step-*.png"))

    def write_sample_grid(self, images: torch.Tensor, step: int, columns: int) -> Path:
        """``samples/step-NNNNNNN.png``: ``images [N, C, H, W]`` in [-1, 1], ``columns`` a row."""
        path = self.folder / "samples" / f"step-{step:07d}.png"
        save_image_grid(images, path, columns=columns)
        return path

    def write_loss_curve(self, losses: Sequence[float], label: str) -> None:
        save_loss_curve(losses, self.folder / "loss.png", ylabel=label)


@dataclass(frozen=True)
class LoadedRun:
    """A run opened read-only at its last checkpoint (:func:`load_run`): its folder and settings
    (``run``) and what the checkpoint holds (``state``: model, EMA, algorithm, progress)."""

    run: Run
    state: TrainState


def load_run(folder: str, device: str = "auto") -> LoadedRun:
    """The run in ``folder`` at its last checkpoint, opened read-only (for sampling, evaluation
    and export). The folder is the truth: a copied or moved run loads its own weights, whatever
    path its ``config.json`` was written under."""
    run = Run.open(folder, device)
    target = resolve_device(run.config.device)
    check_precision(run.config, target)
    state = TrainState(run.config, target, autoencoder=run.own_autoencoder())
    state.load_state_dict(run.read_checkpoint(target))
    return LoadedRun(run, state)
