"""A grid's run folders read back as one row per cell (method, sparsity, block, drop fraction,
growth rule): means and spreads over seeds, FID curves, s / step (re-timed from one machine's
measurements where the grid names them), and how the report names and groups the rows. Reads
only each run's ``config.json`` and ``metrics.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import BlockShape, TrainConfig, block_pair
from ..migrations import migrate_config
from .grid import RunSpec

METHOD_ORDER = ["dense", "static", "rigl", "magran"]


def finished(run: RunSpec) -> bool:
    """Whether the run folder holds the results of the whole run (its steps and its FID)."""
    path = Path(run.config.out) / "metrics.json"
    if not path.exists():
        return False
    result = json.loads(path.read_text())
    if result.get("steps") != run.config.steps:
        return False
    return not run.config.eval_samples or result.get("metrics", {}).get("num_samples") == run.config.eval_samples


def read_runs(root: Path, runs: Sequence[RunSpec]) -> List[Dict]:
    """One record per run folder: its configuration, its results, or its error."""
    records = []
    for run in runs:
        folder = Path(run.config.out)
        record = {"study": run.study, "name": run.name, "folder": folder}
        config_path, metrics_path, error_path = folder / "config.json", folder / "metrics.json", folder / "error.txt"
        if config_path.exists():
            record["config"] = json.loads(config_path.read_text())
        if metrics_path.exists() and finished(run):
            record["results"] = json.loads(metrics_path.read_text())
        elif error_path.exists():
            record["error"] = error_path.read_text().strip().splitlines()[-1]
        records.append(record)
    return records


def model_name(config: Dict) -> str:
    """The model a run trains, as the report names it: ``pixel demo``, ``pixel small``."""
    return f"{config['model']} {config.get('preset')}"


def cell_key(config: Dict) -> Tuple:
    """(method, sparsity, block, drop fraction, exact k, model): what the seeds of one cell share."""
    if config["method"] == "dense":
        return ("dense", 0.0, None, None, False, model_name(config))
    moves = config["method"] in ("rigl", "magran")
    drop = config["drop_fraction"] if moves else None
    exact_k = moves and not migrate_config(config)["regrow_dropped"]
    return (config["method"], config["sparsity"], config["block_size"], drop, exact_k, model_name(config))


def label(row: Dict) -> str:
    """The method as tables and legends name it: ``rigl``, or ``rigl exact-k`` for the variant
    that grows only blocks dead before an update; a dense row borrowed from another study
    (:func:`summarize`) names it."""
    if row.get("from_study"):
        return f"{row['method']} (study {row['from_study']})"
    return row["method"] + (" exact-k" if row.get("exact_k") else "")


def mean_std(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation of the finite ``values`` (0 for one; None for none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


# The cell dimensions of :func:`cell_key` as the rows of :func:`cells` name them.
CELL = ("method", "sparsity", "block", "drop", "exact_k", "model")
# The TrainConfig fields a dense run may differ in from a study's sparse runs and still be their
# baseline: the sparsity settings, the seed, folders, and how often it saved, sampled or evaluated.
NOT_SETUP = {"out", "method", "sparsity", "block_size", "distribution", "drop_fraction", "update_interval",
             "regrow_dropped", "seed", "sample_every", "checkpoint_every", "eval_every", "data_dir"}
SETUP_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_SETUP)


def setup(config: Dict) -> Tuple:
    """A run's training and evaluation settings: its :data:`SETUP_FIELDS` (every TrainConfig field
    but :data:`NOT_SETUP`)."""
    return tuple(config.get(name) for name in SETUP_FIELDS)


def summarize(records: List[Dict], timing: Optional[Dict[Tuple, float]] = None) -> Dict[str, List[Dict]]:
    """Per study, one row per cell (:func:`cell_key`): means over seeds. A study without a dense
    run of its own borrows the dense row of another study whose runs were all trained the same
    way (:func:`setup`): it is added to the study's rows with ``from_study`` naming its study,
    and the study's speed-ups are measured against it."""
    studies = dict.fromkeys(r["study"] for r in records)
    tables = {study: cells([r for r in records if r["study"] == study], timing) for study in studies}
    setups = {study: {setup(r["config"]) for r in records if r["study"] == study and "results" in r}
              for study in studies}
    for study, rows in tables.items():
        if not rows or any(r["method"] == "dense" for r in rows) or len(setups[study]) != 1:
            continue
        donors = [(other, r) for other, other_rows in tables.items() if setups[other] == setups[study]
                  for r in other_rows if r["method"] == "dense" and "from_study" not in r]
        if donors:
            other, dense = donors[0]
            _speedups(rows, dense["s_per_step"])
            rows.insert(0, {**dense, "from_study": other})
    return tables


def check_reused(runs: Sequence[RunSpec]) -> None:
    """Refuses, naming the folder, a finished reused run (a study's ``runs_from``) that was trained
    with other settings than the grid gives it (its cell, seed or :func:`setup`). An unfinished
    one is left to the grid that owns it (the report lists it as not run)."""
    for run in runs:
        if not run.reused or not finished(run):
            continue
        folder = Path(run.config.out)
        saved = migrate_config(json.loads((folder / "config.json").read_text()))
        wanted = json.loads(json.dumps(dataclasses.asdict(run.config)))  # as config.json spells it
        differ = [f"{k} {saved.get(k)!r} against {wanted.get(k)!r}" for k in SETUP_FIELDS + ("seed",)
                  if saved.get(k) != wanted.get(k)]
        if cell_key(saved) != cell_key(wanted):
            differ.insert(0, f"cell {cell_key(saved)} against {cell_key(wanted)}")
        if differ:
            raise ValueError(f"study {run.study!r}: {folder} was trained with other settings than the grid gives it: "
                             + ", ".join(differ))


def load_timing(path: str) -> Tuple[Dict[Tuple, float], Dict]:
    """A grid's ``wall_clock_from``: the seconds per training step of every cell, measured side
    by side on one machine (``python -m benchmarks.study_timing``), keyed by :func:`cell_key`;
    and that machine's record."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"wall_clock_from {path}: cannot read it as JSON: {error}") from None
    if not isinstance(payload, dict) or payload.get("suite") != "study_timing":
        raise ValueError(f"wall_clock_from {path}: not a benchmarks.study_timing result (no suite 'study_timing')")
    if any(len(r["key"]) != len(CELL) for r in payload["rows"]):
        raise ValueError(f"wall_clock_from {path}: its cells are keyed without the model (an older "
                         "benchmarks.study_timing): time the grid again")
    return {tuple(r["key"]): r["ms_per_step"] / 1000 for r in payload["rows"]}, payload.get("environment", {})


def _retimed(curve: List[Dict], seconds_per_step: float) -> List[Dict]:
    """``curve`` with each evaluation's training wall-clock replaced by step x ``seconds_per_step``."""
    return [{**p, "own_wall_clock_s": p["wall_clock_s"], "wall_clock_s": p["step"] * seconds_per_step} for p in curve]


def cells(records: List[Dict], timing: Optional[Dict[Tuple, float]] = None) -> List[Dict]:
    """One row per cell of the finished ``records``: means and spreads over seeds, each seed's
    FID curve and whether its timing was clean, the mean local FD and the local networks its
    seeds name (None: not recorded). A cell in ``timing`` (:func:`load_timing`) is
    re-timed: its s / step is the one measured there and its wall-clocks are steps x that; its
    runs' own s / step stays in ``own_s_per_step``. Speed-ups are against the dense cell of the
    same model; rows are ordered by model (in the order they first appear), then method."""
    groups: Dict[Tuple, List[Dict]] = {}
    for r in records:
        if "results" in r:
            groups.setdefault(cell_key(r["config"]), []).append(r)
    rows = []
    for key, members in groups.items():
        results = [m["results"] for m in members]
        fids = [x.get("metrics", {}).get("fid") for x in results]
        fid, fid_std = mean_std(fids)
        fd_local, _ = mean_std([x.get("metrics", {}).get("fd_local") for x in results])
        own_step, _ = mean_std([x["seconds_per_step"] for x in results])
        memory, _ = mean_std([x.get("state_bytes") for x in results])
        wall_clock, _ = mean_std([x.get("wall_clock_s") for x in results])
        curves = [x["curve"] for x in results if x.get("curve")]
        step = (timing or {}).get(key)
        if step is not None:
            wall_clock = step * results[0]["steps"]
            curves = [_retimed(c, step) for c in curves]
        rows.append({
            "method": key[0], "sparsity": key[1], "block": key[2], "drop": key[3], "exact_k": key[4], "model": key[5],
            "seeds": len(members), "fid": fid, "fid_std": fid_std, "fids": fids, "fd_local": fd_local,
            "local_networks": {x.get("metrics", {}).get("local_network") for x in results},
            "actual_sparsity": results[0]["sparsity"], "parameters": results[0]["parameters"],
            "flops": results[0]["flops_per_sample"], "s_per_step": own_step if step is None else step,
            "own_s_per_step": own_step, "retimed": step is not None, "wall_clock_s": wall_clock,
            "state_mb": memory / 2**20 if memory else None, "curves": curves,
            "clean": sum(bool(x.get("timing", {}).get("clean")) for x in results),
        })
    for model in dict.fromkeys(r["model"] for r in rows):
        dense = [r for r in rows if r["method"] == "dense" and r["model"] == model]
        _speedups([r for r in rows if r["model"] == model], dense[0]["s_per_step"] if dense else None)
    models = list(dict.fromkeys(r["model"] for r in rows))
    rows.sort(key=lambda r: (models.index(r["model"]), METHOD_ORDER.index(r["method"]), r["exact_k"], r["sparsity"],
                             block_order(r["block"]), r["drop"] or 0))
    return rows


def _speedups(rows: List[Dict], dense_step: Optional[float]) -> None:
    """Each row's training speed-up: ``dense_step`` over its s / step (None without a dense step)."""
    for row in rows:
        row["speedup"] = dense_step / row["s_per_step"] if dense_step and row["s_per_step"] else None


def block_weights(block: Optional[BlockShape]) -> int:
    """Weights per block (per kernel tap): 1 unstructured, 16 for 16x1, 256 for 16 (16x16); 0 for
    a dense row. The block axis of tables and plots is ordered by it."""
    if block is None:
        return 0
    bo, bi = block_pair(block)
    return bo * bi


def block_order(block: Optional[BlockShape]) -> Tuple[int, str]:
    return (block_weights(block), str(block))


def block_text(block: Optional[BlockShape]) -> str:
    """``16``, ``16x1``, or ``-`` for a dense row."""
    return "-" if block is None else str(block)


def main_block(rows: List[Dict]) -> Optional[BlockShape]:
    """The block size the headline and the FID-vs-sparsity plot show: the largest of those
    with the most runs."""
    blocks = [r["block"] for r in rows if r["method"] != "dense"]
    return max(set(blocks), key=lambda b: (blocks.count(b), block_order(b))) if blocks else None


def line_name(row: Dict) -> str:
    """A method with its drop fraction: one line of a plot or one row of the headline."""
    return label(row) + (f" (drop {row['drop']:g})" if row["drop"] is not None else "")


def differing_in(rows: List[Dict], column: str) -> List[Dict]:
    """The groups of cells that differ in ``column`` alone, with more than one value of it: each
    a dict from that value to its cell."""
    groups: Dict[Tuple, Dict] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in CELL if k != column), {})[r[column]] = r
    return [by for by in groups.values() if len(by) > 1]
