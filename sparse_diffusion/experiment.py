"""``sparse-diffusion experiment GRID.yaml``: a grid of training runs and its report.

A grid file names its output folder, the training settings every run shares, and one or
more studies (a model on a dataset), each crossed with the grid's axes::

    out: runs/experiments/cpu-small         # one folder per run below it: STUDY/RUN/
    defaults: {steps: 400, batch_size: 32, eval_samples: 200}   # any `train` option
    grid:                                   # the axes, crossed (a study may override any)
      method: [dense, static, rigl, magran]
      sparsity: [0.5, 0.75]
      drop_fraction: [0.05, 0.3]            # RigL and MagRan only
      block_size: [1, 16, 32]               # 1 = unstructured (masked reference path)
      seed: [0, 1]
    studies:
      - name: fashion-ldm
        model: ldm
        dataset: fashion-mnist
        autoencoder: {steps: 1500}          # trained once into STUDY/autoencoder (or a path)

Dense runs ignore sparsity, drop fraction and block size; Static ignores the drop
fraction. Finished runs (a metrics.json with their FID) are skipped, interrupted ones
resume from their checkpoint, so the command can be run again until it completes. A run
that fails writes error.txt and the grid goes on. The report (report.md and plots/ in the
output folder) is built from the run folders alone: config.json and metrics.json.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shlex
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .config import METHODS, TrainConfig
from .launch import autoencoder_command, run_under_torchrun, train_command
from .train import CHECKPOINT

AXES = ("method", "sparsity", "drop_fraction", "block_size", "seed")
AXIS_DEFAULTS = {"method": ["dense"], "sparsity": [0.5], "drop_fraction": [0.3], "block_size": [32], "seed": [0]}
STUDY_KEYS = {"name", "grid", "autoencoder"}
TOP_KEYS = {"out", "defaults", "grid", "studies", "description", "report"}
METHOD_ORDER = ["dense", "static", "rigl", "magran"]


@dataclasses.dataclass
class RunSpec:
    """One training run of the grid: its study, folder name and full configuration."""

    study: str
    name: str
    config: TrainConfig


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


def run_name(method: str, sparsity: float, block: int, drop: Optional[float], seed: int) -> str:
    if method == "dense":
        return f"dense-seed{seed}"
    drop_part = f"-d{drop:g}" if drop is not None else ""
    return f"{method}-s{sparsity:g}-b{block}{drop_part}-seed{seed}"


def expand(grid: Dict, root: Optional[str] = None) -> List[RunSpec]:
    """Every run of the grid, in order, without duplicates (dense once per seed)."""
    root_path = Path(root or grid["out"])
    runs: List[RunSpec] = []
    for study in grid["studies"]:
        axes = {**AXIS_DEFAULTS, **(grid.get("grid") or {}), **(study.get("grid") or {})}
        settings = {**(grid.get("defaults") or {}), **{k: v for k, v in study.items() if k not in STUDY_KEYS}}
        for axis in AXES:  # a single value given as a plain option
            if axis in settings:
                axes[axis] = [settings.pop(axis)]
        if study.get("autoencoder") is not None:
            settings["autoencoder"] = str(autoencoder_path(study, root_path))
        seen = set()
        for method, sparsity, drop, block, seed in itertools.product(*(axes[a] for a in AXES)):
            if method == "dense":
                sparsity, drop, block = 0.0, None, None
            elif method == "static":
                drop = None
            key = (method, sparsity, drop, block, seed)
            if key in seen:
                continue
            seen.add(key)
            name = run_name(method, sparsity, block, drop, seed)
            config = TrainConfig(**{
                **settings, "method": method, "seed": seed, "out": str(root_path / study["name"] / name),
                **({} if method == "dense" else {"sparsity": sparsity, "block_size": block}),
                **({"drop_fraction": drop} if drop is not None else {}),
            })
            config.validate()
            runs.append(RunSpec(study["name"], name, config))
    return runs


def autoencoder_path(study: Dict, root: Path) -> Path:
    """Where a study's autoencoder lives: the given path, or STUDY/autoencoder when trained here."""
    spec = study["autoencoder"]
    return Path(spec) if isinstance(spec, str) else root / study["name"] / "autoencoder"


def _train_autoencoders(grid: Dict, root: Path) -> None:
    from .autoencoder_training import train_autoencoder

    for path, options in _pending_autoencoders(grid, root):
        print(f"== training the autoencoder into {path}")
        train_autoencoder(out=str(path), **options)


def _pending_autoencoders(grid: Dict, root: Path) -> List[Tuple[Path, Dict]]:
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


def _finished(run: RunSpec) -> bool:
    path = Path(run.config.out) / "metrics.json"
    if not path.exists():
        return False
    result = json.loads(path.read_text())
    if result.get("steps") != run.config.steps:
        return False
    return not run.config.eval_samples or result.get("metrics", {}).get("num_samples") == run.config.eval_samples


def run_grid(path: str, out: Optional[str] = None, report_only: bool = False, dry_run: bool = False,
             nproc_per_node: int = 1, print_commands: bool = False) -> Path:
    """Runs what is left of the grid in ``path``, then writes the report. Returns its path.

    ``nproc_per_node`` > 1 trains each run under torchrun with that many processes.
    ``print_commands`` trains nothing and prints one shell command per step left to do: the
    studies' autoencoders first, then one per run (for a cluster scheduler; run
    ``--report-only`` once they are done)."""
    from .train import Trainer

    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    grid = load_grid(path)
    root = Path(out or grid["out"])
    runs = expand(grid, str(root))
    pending = [r for r in runs if not _finished(r)]
    if print_commands:
        for folder, options in _pending_autoencoders(grid, root):
            print(shlex.join(autoencoder_command(folder, options)))
        for run in pending:
            resume = (Path(run.config.out) / CHECKPOINT).exists()
            print(shlex.join(train_command(run.config, resume, nproc_per_node)))
        return root / "report.md"
    print(f"{path}: {len(runs)} runs in {len(grid['studies'])} studies, {len(pending)} to do, output {root}")
    if dry_run:
        for run in runs:
            print(f"  {'todo' if run in pending else 'done'}  {run.study}/{run.name}")
        return root / "report.md"
    if not report_only:
        root.mkdir(parents=True, exist_ok=True)
        if pending:
            _train_autoencoders(grid, root)
        for i, run in enumerate(pending):
            folder = Path(run.config.out)
            resume = (folder / CHECKPOINT).exists()
            print(f"\n== [{i + 1}/{len(pending)}] {run.study}/{run.name}" + (" (resuming)" if resume else ""))
            try:
                if nproc_per_node > 1:
                    run_under_torchrun(run.config, resume, nproc_per_node)
                else:
                    Trainer(run.config, resume=resume).train()
                (folder / "error.txt").unlink(missing_ok=True)
            except Exception:  # noqa: BLE001 (one failed run must not stop the grid; the report lists it)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "error.txt").write_text(traceback.format_exc())
                print(f"   failed: see {folder / 'error.txt'}")
    return write_report(root, grid, runs)


# --------------------------------------------------------------------------- report
def read_runs(root: Path, runs: Sequence[RunSpec]) -> List[Dict]:
    """One record per run folder: its configuration, its results, or its error."""
    records = []
    for run in runs:
        folder = Path(run.config.out)
        record = {"study": run.study, "name": run.name, "folder": folder}
        config_path, metrics_path, error_path = folder / "config.json", folder / "metrics.json", folder / "error.txt"
        if config_path.exists():
            record["config"] = json.loads(config_path.read_text())
        if metrics_path.exists() and _finished(run):
            record["results"] = json.loads(metrics_path.read_text())
        elif error_path.exists():
            record["error"] = error_path.read_text().strip().splitlines()[-1]
        records.append(record)
    return records


def _group_key(config: Dict) -> Tuple:
    if config["method"] == "dense":
        return ("dense", 0.0, None, None)
    drop = config["drop_fraction"] if config["method"] in ("rigl", "magran") else None
    return (config["method"], config["sparsity"], config["block_size"], drop)


def _mean_std(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def summarize(records: List[Dict]) -> Dict[str, List[Dict]]:
    """Per study, one row per (method, sparsity, block, drop fraction): means over seeds."""
    tables: Dict[str, List[Dict]] = {}
    for study in dict.fromkeys(r["study"] for r in records):
        done = [r for r in records if r["study"] == study and "results" in r]
        groups: Dict[Tuple, List[Dict]] = {}
        for r in done:
            groups.setdefault(_group_key(r["config"]), []).append(r)
        rows = []
        for key, members in groups.items():
            results = [m["results"] for m in members]
            fid, fid_std = _mean_std([x.get("metrics", {}).get("fid") for x in results])
            step, _ = _mean_std([x["seconds_per_step"] for x in results])
            memory, _ = _mean_std([x.get("state_bytes") for x in results])
            rows.append({
                "method": key[0], "sparsity": key[1], "block": key[2], "drop": key[3], "seeds": len(members),
                "fid": fid, "fid_std": fid_std, "actual_sparsity": results[0]["sparsity"],
                "parameters": results[0]["parameters"], "flops": results[0]["flops_per_sample"],
                "s_per_step": step, "state_mb": memory / 2**20 if memory else None,
            })
        dense = [r for r in rows if r["method"] == "dense"]
        dense_step = dense[0]["s_per_step"] if dense else None
        for row in rows:
            row["speedup"] = dense_step / row["s_per_step"] if dense_step and row["s_per_step"] else None
        rows.sort(key=lambda r: (METHOD_ORDER.index(r["method"]), r["sparsity"], r["block"] or 0, r["drop"] or 0))
        tables[study] = rows
    return tables


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: List[Dict]) -> str:
    header = ("| method | sparsity (actual) | block | drop | seeds | FID (mean ± std) | parameters | MFLOPs / sample | "
              "s / step | speed-up vs dense | train state (MB) |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [header]
    for r in rows:
        fid = "-" if r["fid"] is None else f"{r['fid']:.1f} ± {r['fid_std']:.1f}"
        lines.append(
            f"| {r['method']} | {r['sparsity']:.2f} ({r['actual_sparsity']:.2f}) | {_fmt(r['block'], 'd')} | {_fmt(r['drop'], 'g')} | "
            f"{r['seeds']} | {fid} | {r['parameters']:,} | {r['flops'] / 1e6:.1f} | {_fmt(r['s_per_step'], '.3f')} | "
            f"{_fmt(r['speedup'], '.2f')} | {_fmt(r['state_mb'], '.2f')} |"
        )
    return "\n".join(lines)


def main_block(rows: List[Dict]) -> Optional[int]:
    """The block size the headline and the FID-vs-sparsity plot show: the largest of those
    with the most runs."""
    blocks = [r["block"] for r in rows if r["method"] != "dense"]
    return max(set(blocks), key=lambda b: (blocks.count(b), b)) if blocks else None


def headline_table(rows: List[Dict]) -> str:
    """FID (mean ± std over seeds) and training speed-up vs dense, one row per method and
    drop fraction, one column per sparsity, at the main block size."""
    block = main_block(rows)
    sparse = [r for r in rows if r["method"] != "dense" and r["block"] == block]
    sparsities = sorted({r["sparsity"] for r in sparse})
    dense = next((r for r in rows if r["method"] == "dense"), None)

    def cell(r):
        if r is None or r["fid"] is None:
            return "-"
        return f"{r['fid']:.1f} ± {r['fid_std']:.1f} ({_fmt(r['speedup'], '.2f')}x)"

    lines = ["| method | " + " | ".join(f"sparsity {s:g}" for s in sparsities) + " |",
             "| --- |" + " ---: |" * len(sparsities)]
    if dense:
        lines.append("| dense | " + " | ".join(cell(dense) for _ in sparsities) + " |")
    labels = dict.fromkeys((r["method"], r["drop"]) for r in sparse)
    for method, drop in labels:
        name = method + (f" (drop {drop:g})" if drop is not None else "")
        by_sparsity = {r["sparsity"]: r for r in sparse if (r["method"], r["drop"]) == (method, drop)}
        lines.append(f"| {name} | " + " | ".join(cell(by_sparsity.get(s)) for s in sparsities) + " |")
    return "\n".join(lines)


def _plots(study: str, rows: List[Dict], folder: Path) -> List[Path]:
    """FID vs sparsity per method, FID vs block size, speed-up vs sparsity: PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    sparse = [r for r in rows if r["method"] != "dense"]
    dense = [r for r in rows if r["method"] == "dense"]
    blocks = sorted({r["block"] for r in sparse})
    paths = []
    if not sparse:
        return paths
    block = main_block(rows)
    top_sparsity = max(r["sparsity"] for r in sparse)

    def label(r):
        return r["method"] + (f" (drop {r['drop']:g})" if r["drop"] is not None else "")

    def lines(ax, selected, x_key):
        for name in dict.fromkeys(label(r) for r in selected):
            points = sorted((r[x_key], r) for r in selected if label(r) == name and r["fid"] is not None)
            if points:
                ax.errorbar([p[0] for p in points], [p[1]["fid"] for p in points],
                            yerr=[p[1]["fid_std"] for p in points], marker="o", capsize=3, label=name)

    figure, ax = plt.subplots(figsize=(6, 4))
    lines(ax, [r for r in sparse if r["block"] == block], "sparsity")
    if dense and dense[0]["fid"] is not None:
        ax.axhline(dense[0]["fid"], color="black", linestyle="--", label="dense")
    ax.set(xlabel="sparsity", ylabel="FID (lower is better)", title=f"{study}: FID vs sparsity (block {block})")
    _legend(ax)
    paths.append(_save(figure, folder / f"{study}-fid-vs-sparsity.png"))

    figure, ax = plt.subplots(figsize=(6, 4))
    lines(ax, [r for r in sparse if r["sparsity"] == top_sparsity], "block")
    if dense and dense[0]["fid"] is not None:
        ax.axhline(dense[0]["fid"], color="black", linestyle="--", label="dense")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="block size (1 = unstructured)", ylabel="FID (lower is better)",
           title=f"{study}: FID vs block size (sparsity {top_sparsity:g})")
    _legend(ax)
    paths.append(_save(figure, folder / f"{study}-fid-vs-block.png"))

    figure, ax = plt.subplots(figsize=(6, 4))
    for block in blocks:
        by_sparsity: Dict[float, List[float]] = {}
        for r in sparse:
            if r["block"] == block and r["speedup"]:
                by_sparsity.setdefault(r["sparsity"], []).append(r["speedup"])
        xs = sorted(by_sparsity)
        ax.plot(xs, [sum(by_sparsity[x]) / len(by_sparsity[x]) for x in xs], marker="o", label=f"block {block}")
    ax.axhline(1.0, color="black", linestyle="--", label="dense")
    ax.set(xlabel="sparsity", ylabel="training speed-up vs dense (s/step)", title=f"{study}: speed-up vs sparsity")
    _legend(ax)
    paths.append(_save(figure, folder / f"{study}-speedup-vs-sparsity.png"))
    return paths


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:  # no FID in these runs (eval_samples: 0)
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def write_report(root: Path, grid: Dict, runs: Sequence[RunSpec]) -> Path:
    """report.md (a table per study) and plots/ in ``root``, from the run folders alone."""
    records = read_runs(root, runs)
    tables = summarize(records)
    done = sum("results" in r for r in records)
    parts = [f"# Experiment report: {root.name}\n",
             f"{done} of {len(records)} runs finished. Every number below is read from the run folders "
             "(config.json, metrics.json). FID: standard Inception features, samples against the test split "
             "(strokes rasterised at 64x64); s / step: wall-clock of training; train state: parameters + "
             "gradients + optimizer state; speed-up: dense s / step over the row's.\n"]
    if grid.get("description"):
        parts.append(str(grid["description"]).strip() + "\n")
    for study, rows in tables.items():
        first = next((r["config"] for r in records if r["study"] == study and "config" in r), {})
        device = next((r["results"]["device"] for r in records if r["study"] == study and "results" in r), "-")
        parts.append(f"## {study}\n")
        parts.append(f"model {first.get('model')}, dataset {first.get('dataset')}, preset {first.get('preset')}, "
                     f"{first.get('steps')} steps of batch {first.get('batch_size')}, "
                     f"FID on {first.get('eval_samples')} samples, device {device}.\n")
        if any(r["method"] != "dense" for r in rows):
            parts.append(f"Headline: FID ± std over seeds (training speed-up vs dense), blocks of {main_block(rows)}.\n")
            parts.append(headline_table(rows) + "\n")
            parts.append("All runs:\n")
        parts.append(markdown_table(rows) + "\n")
        for path in _plots(study, rows, root / "plots"):
            parts.append(f"![{path.stem}](plots/{path.name})\n")
    failed = [r for r in records if "error" in r]
    if failed:
        parts.append("## Failed runs\n")
        parts.extend(f"- {r['study']}/{r['name']}: {r['error']}" for r in failed)
        parts.append("")
    missing = [r for r in records if "results" not in r and "error" not in r]
    if missing:
        parts.append(f"## Not run yet\n\n{len(missing)} runs: " + ", ".join(f"{r['study']}/{r['name']}" for r in missing) + "\n")
    path = root / "report.md"
    path.write_text("\n".join(parts))
    print(f"wrote {path}")
    return path
