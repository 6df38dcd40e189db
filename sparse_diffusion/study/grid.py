"""A grid file (``sparse-diffusion experiment GRID.yaml``) read, checked and expanded into its runs.

A grid file names its output folder, the training settings every run shares, and one or
more studies (a model on a dataset), each crossed with the grid's axes::

    out: runs/experiments/cpu-small         # one folder per run below it: STUDY/RUN/
    defaults: {steps: 400, batch_size: 32, eval_samples: 200}   # any `train` option
    grid:                                   # the axes, crossed (a study may override any)
      method: [dense, static, rigl, magran]
      sparsity: [0.5, 0.75]
      drop_fraction: [0.05, 0.3]            # RigL and MagRan only
      block_size: [1, 16x1, 16, 32]         # 1 = unstructured (masked reference path), 16x1 = vector blocks
      seed: [0, 1]
    studies:
      - name: fashion-ldm
        model: ldm
        dataset: fashion-mnist
        autoencoder: {steps: 1500}          # trained once into STUDY/autoencoder (or a path)
    wall_clock_from: experiments/results/cpu-small/timing.json   # optional (:mod:`.report`)

A study with ``runs_from: FOLDER`` trains nothing: its runs are the run folders ``FOLDER/RUN``
of another grid (a committed study's results), read in place once finished and checked to have
been trained with the settings this grid gives them (:func:`~.results.check_reused`).

Dense runs ignore sparsity, drop fraction and block size; Static ignores the drop
fraction. Each run is a :class:`RunSpec`: its study, its folder name (:func:`run_name`) and
its whole :class:`~sparse_diffusion.config.TrainConfig`.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..config import METHODS, BlockShape, TrainConfig, block_shape

AXES = ("method", "sparsity", "drop_fraction", "block_size", "seed")
AXIS_DEFAULTS = {"method": ["dense"], "sparsity": [0.5], "drop_fraction": [0.3], "block_size": [32], "seed": [0]}
STUDY_KEYS = {"name", "grid", "autoencoder", "runs_from"}
TOP_KEYS = {"out", "defaults", "grid", "studies", "description", "report", "wall_clock_from"}


@dataclasses.dataclass
class RunSpec:
    """One training run of the grid: its study, folder name and full configuration."""

    study: str
    name: str
    config: TrainConfig
    reused: bool = False  # read from another grid's folder (the study's ``runs_from``), never trained


def load_grid(path: str) -> Dict:
    """Reads and checks a grid file (YAML; JSON is YAML too)."""
    import yaml

    text = Path(path).read_text()
    try:
        grid = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(grid, dict):
        raise ValueError(f"{path}: expected a mapping with 'out' and 'studies', got {type(grid).__name__}")
    unknown = set(grid) - TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    if "out" not in grid or not grid.get("studies"):
        raise ValueError(f"{path}: needs 'out' (the output folder) and a non-empty 'studies' list")
    if not isinstance(grid.get("wall_clock_from", ""), str):
        raise ValueError(f"{path}: 'wall_clock_from' must be the path of a benchmarks.study_timing JSON file")
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"out"}
    for where, settings in [("defaults", grid.get("defaults") or {})] + [
        (f"study {s.get('name', i)!r}", {k: v for k, v in s.items() if k not in STUDY_KEYS})
        for i, s in enumerate(grid["studies"])
    ]:
        bad = set(settings) - fields - set(AXES)
        if bad:
            raise ValueError(f"{path}: {where}: unknown training options {sorted(bad)}")
    for i, study in enumerate(grid["studies"]):
        if not isinstance(study, dict) or not study.get("name"):
            raise ValueError(f"{path}: study {i} needs a 'name'")
        if not isinstance(study.get("runs_from", ""), str) or (study.get("runs_from") and study.get("autoencoder")):
            raise ValueError(f"{path}: study {study['name']!r}: 'runs_from' must be the folder of another grid's "
                             "runs (a string), without an 'autoencoder' to train")
        for axes in (grid.get("grid") or {}, study.get("grid") or {}):
            bad = set(axes) - set(AXES)
            if bad:
                raise ValueError(f"{path}: study {study['name']!r}: unknown grid axes {sorted(bad)}; allowed: {AXES}")
            for axis, values in axes.items():
                if not isinstance(values, list) or not values:
                    raise ValueError(f"{path}: grid axis {axis!r} must be a non-empty list, got {values!r}")
        methods = (study.get("grid") or {}).get("method") or (grid.get("grid") or {}).get("method") or ["dense"]
        bad_methods = set(methods) - set(METHODS)
        if bad_methods:
            raise ValueError(f"{path}: unknown methods {sorted(bad_methods)}; allowed: {sorted(METHODS)}")
    return grid


def run_name(method: str, sparsity: float, block: Optional[BlockShape], drop: Optional[float], seed: int) -> str:
    if method == "dense":
        return f"dense-seed{seed}"
    drop_part = f"-d{drop:g}" if drop is not None else ""
    return f"{method}-s{sparsity:g}-b{block}{drop_part}-seed{seed}"


def expand(grid: Dict, root: Optional[str] = None) -> List[RunSpec]:
    """Every run of the grid, in order, without duplicates (dense once per seed)."""
    root_path = Path(root or grid["out"])
    runs: List[RunSpec] = []
    for study in grid["studies"]:
        # The grid's axes and defaults, then the study's, each overriding what came before: an
        # axis given a single value as a plain option (`block_size: 16`) is that one value.
        axes, settings = dict(AXIS_DEFAULTS), {}
        for level_axes, options in ((grid.get("grid"), grid.get("defaults")),
                                    (study.get("grid"), {k: v for k, v in study.items() if k not in STUDY_KEYS})):
            axes.update(level_axes or {})
            for key, value in (options or {}).items():
                if key in AXES:
                    axes[key] = [value]
                else:
                    settings[key] = value
        if study.get("autoencoder") is not None:
            settings["autoencoder"] = str(autoencoder_path(study, root_path))
        seen = set()
        for method, sparsity, drop, block, seed in itertools.product(*(axes[a] for a in AXES)):
            if method == "dense":
                sparsity, drop, block = 0.0, None, None
            elif method == "static":
                drop = None
            if block is not None:
                block = block_shape(block)  # "16x16" is 16, one name per shape
            key = (method, sparsity, drop, block, seed)
            if key in seen:
                continue
            seen.add(key)
            name = run_name(method, sparsity, block, drop, seed)
            folder = Path(study["runs_from"]) if study.get("runs_from") else root_path / study["name"]
            config = TrainConfig(**{
                **settings, "method": method, "seed": seed, "out": str(folder / name),
                **({} if method == "dense" else {"sparsity": sparsity, "block_size": block}),
                **({"drop_fraction": drop} if drop is not None else {}),
            })
            config.validate()
            runs.append(RunSpec(study["name"], name, config, reused=bool(study.get("runs_from"))))
    return runs


def autoencoder_path(study: Dict, root: Path) -> Path:
    """Where a study's autoencoder lives: the given path, or STUDY/autoencoder when trained here."""
    spec = study["autoencoder"]
    return Path(spec) if isinstance(spec, str) else root / study["name"] / "autoencoder"


def pending_autoencoders(grid: Dict, root: Path) -> List[Tuple[Path, Dict]]:
    """``(folder, train_autoencoder options)`` of each study's autoencoder still to train."""
    pending = []
    for study in grid["studies"]:
        spec = study.get("autoencoder")
        if spec is None or isinstance(spec, str):
            continue
        path = autoencoder_path(study, root)
        if (path / "config.json").exists():
            continue
        options = {"dataset": study.get("dataset", "fashion-mnist"), **spec}
        for key in ("image_size", "data_dir", "device", "limit"):
            value = study.get(key, (grid.get("defaults") or {}).get(key))
            if value is not None:
                options.setdefault(key, value)
        pending.append((path, options))
    return pending
