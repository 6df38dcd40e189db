"""The report of a grid (``report.md`` and ``plots/`` in its output folder), built from the run
folders alone: each run's ``config.json`` and ``metrics.json``.

Per study: a table of every (method, sparsity, block, drop fraction, growth rule) averaged over
seeds, a headline table, and plots of FID against sparsity and block size and of the speed-up.
Runs that evaluated during training (``eval_every``) add the convergence questions of
:func:`convergence_section`: FID against steps and against training wall-clock, whether each
cell matches dense within the seed noise, which is best at equal wall-clock, and how long each
needs to reach a fixed FID.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from .config import settings_it_predates

if TYPE_CHECKING:
    from .experiment import RunSpec

METHOD_ORDER = ["dense", "static", "rigl", "magran"]


def finished(run: "RunSpec") -> bool:
    """Whether the run folder holds the results of the whole run (its steps and its FID)."""
    path = Path(run.config.out) / "metrics.json"
    if not path.exists():
        return False
    result = json.loads(path.read_text())
    if result.get("steps") != run.config.steps:
        return False
    return not run.config.eval_samples or result.get("metrics", {}).get("num_samples") == run.config.eval_samples


def read_runs(root: Path, runs: Sequence["RunSpec"]) -> List[Dict]:
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


def cell_key(config: Dict) -> Tuple:
    """(method, sparsity, block, drop fraction, exact k): what the seeds of one cell share."""
    if config["method"] == "dense":
        return ("dense", 0.0, None, None, False)
    moves = config["method"] in ("rigl", "magran")
    drop = config["drop_fraction"] if moves else None
    exact_k = moves and not settings_it_predates(config)["regrow_dropped"]
    return (config["method"], config["sparsity"], config["block_size"], drop, exact_k)


def label(row: Dict) -> str:
    """The method as tables and legends name it: ``rigl``, or ``rigl exact-k`` for the variant
    that grows only blocks dead before an update."""
    return row["method"] + (" exact-k" if row.get("exact_k") else "")


def _mean_std(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def summarize(records: List[Dict], timing: Optional[Dict[Tuple, float]] = None) -> Dict[str, List[Dict]]:
    """Per study, one row per cell (:func:`cell_key`): means over seeds."""
    studies = dict.fromkeys(r["study"] for r in records)
    return {study: cells([r for r in records if r["study"] == study], timing) for study in studies}


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
    return {tuple(r["key"]): r["ms_per_step"] / 1000 for r in payload["rows"]}, payload.get("environment", {})


def _retimed(curve: List[Dict], seconds_per_step: float) -> List[Dict]:
    """``curve`` with each evaluation's training wall-clock replaced by step x ``seconds_per_step``."""
    return [{**p, "own_wall_clock_s": p["wall_clock_s"], "wall_clock_s": p["step"] * seconds_per_step} for p in curve]


def cells(records: List[Dict], timing: Optional[Dict[Tuple, float]] = None) -> List[Dict]:
    """One row per cell of the finished ``records``: means and spreads over seeds, each seed's
    FID curve and whether its timing was clean. A cell in ``timing`` (:func:`load_timing`) is
    re-timed: its s / step is the one measured there and its wall-clocks are steps x that; its
    runs' own s / step stays in ``own_s_per_step``."""
    groups: Dict[Tuple, List[Dict]] = {}
    for r in records:
        if "results" in r:
            groups.setdefault(cell_key(r["config"]), []).append(r)
    rows = []
    for key, members in groups.items():
        results = [m["results"] for m in members]
        fids = [x.get("metrics", {}).get("fid") for x in results]
        fid, fid_std = _mean_std(fids)
        own_step, _ = _mean_std([x["seconds_per_step"] for x in results])
        memory, _ = _mean_std([x.get("state_bytes") for x in results])
        wall_clock, _ = _mean_std([x.get("wall_clock_s") for x in results])
        curves = [x["curve"] for x in results if x.get("curve")]
        step = (timing or {}).get(key)
        if step is not None:
            wall_clock = step * results[0]["steps"]
            curves = [_retimed(c, step) for c in curves]
        rows.append({
            "method": key[0], "sparsity": key[1], "block": key[2], "drop": key[3], "exact_k": key[4],
            "seeds": len(members), "fid": fid, "fid_std": fid_std, "fids": fids,
            "actual_sparsity": results[0]["sparsity"], "parameters": results[0]["parameters"],
            "flops": results[0]["flops_per_sample"], "s_per_step": own_step if step is None else step,
            "own_s_per_step": own_step, "retimed": step is not None, "wall_clock_s": wall_clock,
            "state_mb": memory / 2**20 if memory else None, "curves": curves,
            "clean": sum(bool(x.get("timing", {}).get("clean")) for x in results),
        })
    dense = [r for r in rows if r["method"] == "dense"]
    dense_step = dense[0]["s_per_step"] if dense else None
    for row in rows:
        row["speedup"] = dense_step / row["s_per_step"] if dense_step and row["s_per_step"] else None
    rows.sort(key=lambda r: (METHOD_ORDER.index(r["method"]), r["exact_k"], r["sparsity"], r["block"] or 0,
                             r["drop"] or 0))
    return rows


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def fid_text(row: Dict) -> str:
    """A row's FID: mean ± std over its seeds; a single FID has no spread to state."""
    if row["fid"] is None:
        return "-"
    evaluated = sum(f is not None and math.isfinite(f) for f in row["fids"])
    return f"{row['fid']:.1f}" if evaluated < 2 else f"{row['fid']:.1f} ± {row['fid_std']:.1f}"


def markdown_table(rows: List[Dict]) -> str:
    header = ("| method | sparsity (actual) | block | drop | seeds | FID (mean ± std) | parameters | MFLOPs / sample | "
              "s / step | speed-up vs dense | train state (MB) |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [header]
    for r in rows:
        fid = fid_text(r)
        lines.append(
            f"| {label(r)} | {r['sparsity']:.2f} ({r['actual_sparsity']:.2f}) | {_fmt(r['block'], 'd')} | {_fmt(r['drop'], 'g')} | "
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
        return f"{fid_text(r)} ({_fmt(r['speedup'], '.2f')}x)"

    lines = ["| method | " + " | ".join(f"sparsity {s:g}" for s in sparsities) + " |",
             "| --- |" + " ---: |" * len(sparsities)]
    if dense:
        lines.append("| dense | " + " | ".join(cell(dense) for _ in sparsities) + " |")
    names = dict.fromkeys(_line_name(r) for r in sparse)
    for name in names:
        by_sparsity = {r["sparsity"]: r for r in sparse if _line_name(r) == name}
        lines.append(f"| {name} | " + " | ".join(cell(by_sparsity.get(s)) for s in sparsities) + " |")
    return "\n".join(lines)


def _line_name(row: Dict) -> str:
    """A method with its drop fraction: one line of a plot or one row of the headline."""
    return label(row) + (f" (drop {row['drop']:g})" if row["drop"] is not None else "")


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

    def lines(ax, selected, x_key):
        for name in dict.fromkeys(_line_name(r) for r in selected):
            points = sorted((r[x_key], r) for r in selected if _line_name(r) == name and r["fid"] is not None)
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


# --------------------------------------------------------------------------- convergence
# Budgets of the equal-wall-clock comparison, as fractions of dense's training wall-clock, and
# the FID each cell must reach in the time-to-quality comparison (dense's final FID + 10%).
BUDGETS = (0.25, 0.5, 1.0)
TARGET_OVER_DENSE = 1.10


def _mean_curve(row: Dict) -> List[Tuple[int, float, float]]:
    """``(step, mean training wall-clock, mean FID)`` over the seeds, at the steps every seed
    evaluated."""
    steps = set.intersection(*({p["step"] for p in c if p.get("fid") is not None} for c in row["curves"]))
    points = []
    for step in sorted(steps):
        at = [next(p for p in c if p["step"] == step) for c in row["curves"]]
        points.append((step, sum(p["wall_clock_s"] for p in at) / len(at), sum(p["fid"] for p in at) / len(at)))
    return points


def _fid_by(curve: List[Dict], seconds: float) -> Optional[float]:
    """The FID of the last evaluation at or before ``seconds`` of training (None: none yet)."""
    done = [p for p in curve if p["wall_clock_s"] <= seconds and p.get("fid") is not None]
    return done[-1]["fid"] if done else None


def _time_to(curve: List[Dict], fid: float) -> Optional[float]:
    """Training seconds at the first evaluation with FID <= ``fid`` (None: never)."""
    return next((p["wall_clock_s"] for p in curve if p.get("fid") is not None and p["fid"] <= fid), None)


def _against_dense(row: Dict, dense: Dict) -> str:
    """``better`` / ``matches`` / ``worse``: the difference of mean final FIDs against two
    standard errors of that difference (seed standard deviations); ``-`` with a single seed."""
    if row["fid"] is None or dense["fid"] is None or min(row["seeds"], dense["seeds"]) < 2:
        return "-"
    error = math.sqrt(row["fid_std"] ** 2 / row["seeds"] + dense["fid_std"] ** 2 / dense["seeds"])
    difference = row["fid"] - dense["fid"]
    return "matches" if abs(difference) <= 2 * error else ("better" if difference < 0 else "worse")


def _where(row: Dict) -> str:
    return f"| {label(row)} | {row['sparsity']:g} | {_fmt(row['block'], 'd')} |"


def convergence_section(rows: List[Dict], folder: Path, name: str, timing_note: str = "") -> str:
    """The convergence questions, over the cells whose runs evaluated during training: final
    FID against dense within the seed noise; FID at equal training wall-clock; wall-clock to
    reach dense's final FID + 10%; the growth rule and the block size at equal sparsity. Writes
    the FID-vs-steps and FID-vs-wall-clock plots into ``folder``. ``timing_note`` says where the
    wall-clocks come from when the cells were re-timed (:func:`load_timing`)."""
    curved = [r for r in rows if r["curves"]]
    if not curved:
        return ""
    dense = next((r for r in curved if r["method"] == "dense"), None)
    retimed = any(r["retimed"] for r in curved)
    parts = [f"## Convergence ({name})\n",
             "Each run evaluated FID during training (metrics.json `curve`); wall-clock is training time only "
             "(evaluations excluded; data, optimizer, EMA, mask updates, sample grids and checkpoints included). "
             "\"vs dense\": |mean final FID - dense's| <= 2 standard errors of the difference (seed standard "
             "deviations) is \"matches\", else better / worse. Clean timing: seeds whose machine load stayed "
             "within the run's own threads + 0.75 (metrics.json `timing`); own s / step: the runs' own "
             "wall-clock, comparable between runs only when both were clean and on the same machine."
             + (f" {timing_note}" if timing_note else "") + "\n"]
    lines = ["| method | sparsity | block | seeds | final FID | vs dense | s / step | speed-up | "
             "wall-clock (min) | own s / step | clean timing |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in curved:
        fid = fid_text(r)
        versus = "-" if dense is None or r is dense else _against_dense(r, dense)
        minutes = r["wall_clock_s"] / 60 if r["wall_clock_s"] else None
        step = _fmt(r["s_per_step"], ".3f") + (" (own)" if retimed and not r["retimed"] else "")
        lines.append(f"{_where(r)} {r['seeds']} | {fid} | {versus} | {step} | {_fmt(r['speedup'], '.2f')} | "
                     f"{_fmt(minutes, '.1f')} | {_fmt(r['own_s_per_step'], '.3f')} | {r['clean']}/{r['seeds']} |")
    parts.append("At the end of training:\n\n" + "\n".join(lines) + "\n")
    if dense is not None and dense["wall_clock_s"]:
        budgets = [dense["wall_clock_s"] * f for f in BUDGETS]
        lines = ["| method | sparsity | block | " + " | ".join(f"FID by {b / 60:.1f} min" for b in budgets) + " |",
                 "| --- | ---: | ---: |" + " ---: |" * len(budgets)]
        best: List[Tuple[float, str]] = [(math.inf, "-")] * len(budgets)
        for r in curved:
            at_budget = []
            for i, budget in enumerate(budgets):
                fid, _ = _mean_std([_fid_by(c, budget) for c in r["curves"]])
                at_budget.append(_fmt(fid, ".1f"))
                if fid is not None and fid < best[i][0]:
                    best[i] = (fid, f"{label(r)} at sparsity {r['sparsity']:g}, block {_fmt(r['block'], 'd')}")
            lines.append(f"{_where(r)} " + " | ".join(at_budget) + " |")
        parts.append("At equal training wall-clock (the last evaluation by each budget, mean over seeds; budgets are "
                     f"{', '.join(f'{f:g}' for f in BUDGETS)} x dense's):\n\n" + "\n".join(lines) + "\n")
        parts.append("Best by each budget: " + "; ".join(
            f"{b / 60:.1f} min: " + (f"{who} ({fid:.1f})" if math.isfinite(fid) else "no evaluation yet")
            for b, (fid, who) in zip(budgets, best)) + ".\n")
    if dense is not None and dense["fid"] is not None:
        target = dense["fid"] * TARGET_OVER_DENSE
        lines = ["| method | sparsity | block | wall-clock to target (min) | seeds that reached it |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        for r in curved:
            times = [_time_to(c, target) for c in r["curves"]]
            reached = [t for t in times if t is not None]
            minutes = sum(reached) / len(reached) / 60 if reached else None
            lines.append(f"{_where(r)} {_fmt(minutes, '.1f')} | {len(reached)}/{len(times)} |")
        parts.append(f"Time to quality: target FID {target:.1f} (dense's final FID {dense['fid']:.1f} + 10%), at the "
                     "first evaluation at or below it (resolved to the evaluation interval):\n\n"
                     + "\n".join(lines) + "\n")
    parts.extend(_pivot(curved, "block", "Block size at equal sparsity (final FID)"))
    parts.extend(_pivot([r for r in curved if r["method"] in ("rigl", "magran")], "exact_k",
                        "Growth rule (final FID): the RigL paper's (exact_k False) against exactly k moved (True)"))
    for path in _curve_plots(curved, folder, name):
        parts.append(f"![{path.stem}](plots/{path.name})\n")
    return "\n".join(parts)


def _pivot(rows: List[Dict], column: str, title: str) -> List[str]:
    """A table of final FIDs with one column per value of ``column``, for the (method,
    sparsity) pairs that have more than one value of it."""
    values = sorted({r[column] for r in rows if r[column] is not None})
    lines = []
    for method, sparsity in dict.fromkeys((r["method"], r["sparsity"]) for r in rows):
        by = {r[column]: r for r in rows if (r["method"], r["sparsity"]) == (method, sparsity)}
        if len(by) > 1:
            lines.append(f"| {method} | {sparsity:g} | " + " | ".join(
                "-" if v not in by else fid_text(by[v])
                for v in values) + " |")
    if not lines:
        return []
    header = ["| method | sparsity | " + " | ".join(f"{column} {v}" for v in values) + " |",
              "| --- | ---: |" + " ---: |" * len(values)]
    return [f"{title}:\n\n" + "\n".join(header + lines) + "\n"]


def _curve_plots(rows: List[Dict], folder: Path, name: str) -> List[Path]:
    """FID against steps and against training wall-clock: one panel per sparsity (the main
    block size), one line per method, dense in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    block = main_block(rows)
    dense = [r for r in rows if r["method"] == "dense"]
    sparse = [r for r in rows if r["method"] != "dense" and r["block"] == block]
    sparsities = sorted({r["sparsity"] for r in sparse}) or [None]
    paths = []
    for x, x_label in (("steps", "training step"), ("wall-clock", "training wall-clock (min)")):
        figure, axes = plt.subplots(1, len(sparsities), figsize=(4 * len(sparsities), 3.6), squeeze=False,
                                    sharey=True)
        for ax, sparsity in zip(axes[0], sparsities):
            for r in dense + [r for r in sparse if r["sparsity"] == sparsity]:
                points = _mean_curve(r)
                xs = [p[0] if x == "steps" else p[1] / 60 for p in points]
                style = {"color": "black", "linestyle": "--"} if r["method"] == "dense" else {}
                ax.plot(xs, [p[2] for p in points], marker=".", label=_line_name(r), **style)
            ax.set(xlabel=x_label, title="dense" if sparsity is None else f"sparsity {sparsity:g}, block {block}")
            _legend(ax)
        axes[0][0].set_ylabel("FID (lower is better)")
        paths.append(_save(figure, folder / f"{name}-fid-vs-{x}.png"))
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


def _timing(grid: Dict, records: List[Dict]) -> Tuple[Optional[Dict[Tuple, float]], str]:
    """The grid's ``wall_clock_from`` (:func:`load_timing`) and a sentence saying where the
    report's wall-clocks come from; ``(None, "")`` for a grid without it."""
    path = grid.get("wall_clock_from")
    if not path:
        return None, ""
    cpus = sorted({r["results"].get("timing", {}).get("cpu") or "not recorded" for r in records if "results" in r})
    if not Path(path).is_file():
        return None, (f"The grid's wall_clock_from names {path}, which does not exist yet: s / step and "
                      "wall-clocks are the runs' own.")
    timing, machine = load_timing(path)
    finished = {cell_key(r["config"]) for r in records if "results" in r}
    missing = len(finished - set(timing))
    return timing, (
        f"Wall-clocks are re-timed: every cell's s / step was measured side by side in one process on one "
        f"machine ({machine.get('cpu', '?')}, {machine.get('torch_threads', '?')} threads, {str(machine.get('date', '?'))[:10]}; "
        f"{path}, from `python -m benchmarks.study_timing`), and a run's wall-clock at step s is s x that; its "
        f"own wall-clock (run on {len(cpus)} kind(s) of machine: {', '.join(cpus)}) is kept as own s / step."
        + (f" {missing} finished cell(s) are not in that file and keep their own (marked \"own\")." if missing else ""))


def write_report(root: Path, grid: Dict, runs: Sequence["RunSpec"]) -> Path:
    """report.md (a table per study, and the convergence questions over all studies when their
    runs evaluated during training) and plots/ in ``root``, from the run folders alone."""
    records = read_runs(root, runs)
    timing, timing_note = _timing(grid, records)
    tables = summarize(records, timing)
    done = sum("results" in r for r in records)
    strokes = any(r.get("config", {}).get("model") == "chirodiff" for r in records)
    parts = [f"# Experiment report: {root.name}\n",
             f"{done} of {len(records)} runs finished. Every number below is read from the run folders "
             "(config.json, metrics.json). FID: standard Inception features, samples against the test split"
             + (" (strokes rasterised at 64x64)" if strokes else "") + "; s / step: wall-clock of training; train state: parameters + "
             "gradients + optimizer state; speed-up: dense s / step over the row's."
             + (f" {timing_note}" if timing_note else "") + "\n"]
    if grid.get("description"):
        parts.append(str(grid["description"]).strip() + "\n")
    for study, rows in tables.items():
        if not rows:
            continue  # nothing finished yet: listed under "Not run yet"
        first = next((r["config"] for r in records if r["study"] == study and "config" in r), {})
        device = next((r["results"]["device"] for r in records if r["study"] == study and "results" in r), "-")
        parts.append(f"## {study}\n")
        parts.append(f"model {first.get('model')}, dataset {first.get('dataset')}, preset {first.get('preset')}, "
                     f"{first.get('steps')} steps of batch {first.get('batch_size')}, "
                     f"FID on {first.get('eval_samples')} samples against "
                     f"{first.get('eval_reference') or first.get('eval_samples')} test items, device {device}.\n")
        if any(r["method"] != "dense" for r in rows):
            parts.append(f"Headline: FID ± std over seeds (training speed-up vs dense), blocks of {main_block(rows)}.\n")
            parts.append(headline_table(rows) + "\n")
            parts.append("All runs:\n")
        parts.append(markdown_table(rows) + "\n")
        for path in _plots(study, rows, root / "plots"):
            parts.append(f"![{path.stem}](plots/{path.name})\n")
    convergence = convergence_section(cells(records, timing), root / "plots", root.name, timing_note)
    if convergence:
        parts.append(convergence)
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
