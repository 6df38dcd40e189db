"""Run folders written by older versions: every compatibility rule in one place.

:class:`~sparse_diffusion.run.Run` applies them once, when it reads a run's ``config.json``
(:func:`migrate_config`) or its checkpoint (:func:`migrate_checkpoint`); the rest of the code
only ever sees settings and states of this version. The rules:

* Settings added since a run was written take their defaults, which give the behaviour from
  before they existed, except ``regrow_dropped``: before it, RigL and MagRan grew only among
  the blocks dead before an update, so an older ``rigl`` / ``magran`` run has it off. A
  checkpoint's algorithm state of that time lacks it too and takes its run's value.
* Until the last step's evaluation was part of the checkpoint, it was written only to
  ``metrics.json``: a run trained longer lost that point. The points of ``metrics.json``'s curve
  at steps the checkpoint has reached but lacks are put back (:func:`migrate_checkpoint`).
* ``checkpoint.pt`` (:data:`LEGACY_CHECKPOINT`): the torch.save pickles written before
  checkpoint version 2. They are never unpickled (unpickling can run code):
  :func:`refuse_legacy_checkpoint` says so in one line.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional

from .checkpoint import load_state
from .config import TrainConfig

LEGACY_CHECKPOINT = "checkpoint.pt"
# Methods that grew only among the blocks dead before an update until regrow_dropped existed.
GREW_ONLY_DEAD_BLOCKS = ("rigl", "magran")


def migrate_config(saved: Dict) -> Dict:
    """A saved configuration (``config.json``, a checkpoint's ``config``) with the settings added
    since it was written filled in as its version ran."""
    missing = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in saved}
    if "regrow_dropped" in missing and saved.get("method") in GREW_ONLY_DEAD_BLOCKS:
        missing["regrow_dropped"] = False
    return {**saved, **missing}


def migrate_checkpoint(state: Dict, metrics: Optional[Dict] = None) -> Dict:
    """A training checkpoint's state with its ``config`` migrated (:func:`migrate_config`), its
    algorithm's saved configuration given the run's ``regrow_dropped`` where it lacks it, and
    the evaluations of ``metrics`` (the run's ``metrics.json``) it should hold and lacks."""
    config = migrate_config(state["config"])
    algo = state.get("algo")
    saved = algo.get("config") if isinstance(algo, dict) else None
    if saved is not None and "regrow_dropped" not in saved:
        algo = {**algo, "config": {**saved, "regrow_dropped": config["regrow_dropped"]}}
    return {**state, "config": config, "algo": algo, "curve": _curve_with_final_points(state, metrics)}


def _curve_with_final_points(state: Dict, metrics: Optional[Dict]) -> List[Dict]:
    """The checkpoint's curve, with the points of ``metrics["curve"]`` at steps it has reached
    (up to its ``step``) but does not hold, in step order."""
    curve = list(state.get("curve", []))
    points = metrics.get("curve") if isinstance(metrics, dict) else None
    if not isinstance(points, list):
        return curve
    held = {point["step"] for point in curve}
    lost = [point for point in points if isinstance(point, dict) and isinstance(point.get("step"), int)
            and point["step"] <= state["step"] and point["step"] not in held]
    return sorted(curve + lost, key=lambda point: point["step"]) if lost else curve


def refuse_legacy_checkpoint(folder: Path) -> None:
    """Raises :class:`~sparse_diffusion.checkpoint.CheckpointError` (one line: why an old pickle
    is not read) if ``folder`` holds a :data:`LEGACY_CHECKPOINT`."""
    legacy = Path(folder) / LEGACY_CHECKPOINT
    if legacy.exists():
        load_state(legacy)  # raises: the file is a pickle
