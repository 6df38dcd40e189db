"""The FID-vs-wall-clock frontier of a grid: for every training budget, the cell with the best FID
by then, over all cells (every model size, dense and sparse, every structure). It answers the
question a user asks of sparse training: which model and sparsity gives the best samples for the
hours I have?
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .convergence import dense_targets, fid_by, minutes_to
from .plots import frontier_plot
from .results import block_text, label
from .tables import fmt

# Budgets the frontier is read at: this many, spaced evenly on a log scale from the time every
# cell has evaluated once to the end of the longest training.
FRONTIER_BUDGETS = 24


def cell_name(row: Dict, with_model: bool = False) -> str:
    """``dense`` or ``static 0.5 16x1``, after the model (``pixel small static 0.5 16x1``) where the
    frontier spans several: a cell as the frontier names it."""
    name = "dense" if row["method"] == "dense" else f"{label(row)} {row['sparsity']:g} {block_text(row['block'])}"
    return f"{row['model']} {name}" if with_model else name


def budgets(rows: List[Dict]) -> List[float]:
    """:data:`FRONTIER_BUDGETS` training budgets in seconds, log-spaced from the time every seed
    of every cell has evaluated once (before that a cell would lead for lack of rivals, not for
    its FID) to the end of the longest run."""
    starts = [p["wall_clock_s"] for r in rows for c in r["curves"] for p in c[:1]]
    ends = [p["wall_clock_s"] for r in rows for c in r["curves"] for p in c[-1:]]
    if not starts or min(starts) <= 0:
        return []
    low, high = math.log(max(starts)), math.log(max(ends))
    return [math.exp(low + (high - low) * i / (FRONTIER_BUDGETS - 1)) for i in range(FRONTIER_BUDGETS)]


def frontier(rows: List[Dict]) -> List[Tuple[float, Dict, float]]:
    """``(budget seconds, best cell, its FID)`` at each of :func:`budgets`."""
    points = []
    for budget in budgets(rows):
        scored = [(fid_by(r, budget), i) for i, r in enumerate(rows)]
        scored = [(fid, i) for fid, i in scored if fid is not None]
        if scored:
            fid, i = min(scored)
            points.append((budget, rows[i], fid))
    return points


def frontier_section(rows: List[Dict], folder: Path, name: str) -> List[str]:
    """The frontier as ranges of budgets with one best cell each (its FID and the best dense
    cell's at the end of the range, its largest lead on that over the range), a sentence on
    whether a sparse cell is ever on it, and its plot. Over several model sizes the cells are
    named with their model and "dense" is the best dense cell of any size by then."""
    curved = [r for r in rows if r["curves"]]
    points = frontier(curved)
    if not points:
        return []
    dense = [r for r in curved if r["method"] == "dense"]
    with_model = len({r["model"] for r in curved}) > 1

    def dense_by(seconds: float) -> Optional[float]:
        return min((f for f in (fid_by(r, seconds) for r in dense) if f is not None), default=None)

    ranges: List[List] = []  # [first budget, last budget, best cell, its FID at the last, its leads on dense]
    for budget, row, fid in points:
        dense_fid = dense_by(budget)
        leads = [] if dense_fid is None else [dense_fid - fid]
        if ranges and ranges[-1][2] is row:
            ranges[-1][1], ranges[-1][3] = budget, fid
            ranges[-1][4] += leads
        else:
            ranges.append([budget, budget, row, fid, leads])
    lines = ["| budget (min) | best cell | its FID | dense's FID | largest lead on dense |",
             "| --- | --- | ---: | ---: | ---: |"]
    sparse_wins = []
    for start, end, row, fid, leads in ranges:
        lead = max(leads, default=None)
        span = f"{start / 60:.1f}" if start == end else f"{start / 60:.1f} - {end / 60:.1f}"
        lines.append(f"| {span} | {cell_name(row, with_model)} | {fid:.1f} | {fmt(dense_by(end), '.1f')} | "
                     f"{fmt(lead, '.1f')} |")
        if row["method"] != "dense":
            sparse_wins.append(f"{cell_name(row, with_model)} from {start / 60:.1f} to {end / 60:.1f} min"
                               + (f" (by up to {lead:.1f} FID)" if lead is not None else ""))
    verdict = ("Sparse cells on the frontier: " + "; ".join(sparse_wins) + "." if sparse_wins
               else "No sparse cell is on the frontier at any budget.")
    text = (f"## FID-vs-wall-clock frontier ({name})\n\nAt {len(points)} training budgets spaced evenly on a log "
            "scale, from the time every cell has evaluated once to the end of the longest run, the cell with the best "
            "FID by then (each seed's curve read between evaluations, mean over seeds; a run that has finished keeps "
            "its final FID)" + (", over every model size" if with_model else "") + ". Consecutive budgets with one "
            "best cell are merged: its FID and dense's at the end of the range"
            + (" (the best dense model by then)" if with_model else "") + ", and its largest lead on dense over the "
            "range. These are means over seeds: read a lead against the seed spread in the tables above.\n\n"
            + "\n".join(lines) + "\n")
    plots = frontier_plot(curved, [best[2] for best in ranges], [(budget, fid) for budget, _, fid in points],
                          folder, name, with_model)
    return ([text, verdict + "\n"] + [f"![{path.stem}](plots/{path.name})\n" for path in plots]
            + (quality_across_models(curved, dense) if with_model else []))


def quality_across_models(rows: List[Dict], dense: List[Dict]) -> List[str]:
    """Time to quality over every model size: the training minutes each cell needs to reach each
    dense model's FIDs (at a third and two thirds of its training, and its final FID), read from
    the curves between evaluations, and per target the cell that gets there first with every seed."""
    targets = sorted({fid: f"{r['model']} {what}" for r in dense for what, fid in dense_targets(r, 1.0)}.items(),
                     reverse=True)
    if not targets:
        return []
    lines = ["| cell | " + " | ".join(f"to FID {fid:.1f}" for fid, _ in targets) + " |",
             "| --- |" + " ---: |" * len(targets)]
    times = {cell_name(r, True): ([minutes_to(r, fid) for fid, _ in targets], len(r["curves"])) for r in rows}
    for name, (each, seeds) in times.items():
        lines.append(f"| {name} | " + " | ".join(f"{fmt(minutes, '.1f')} ({reached}/{seeds})" for minutes, reached in each)
                     + " |")
    firsts = []
    for i, (fid, what) in enumerate(targets):
        every_seed = [(each[i][0], name) for name, (each, seeds) in times.items() if each[i][1] == seeds]
        firsts.append(f"{fid:.1f} ({what}): " + ("{1} at {0:.1f} min".format(*min(every_seed)) if every_seed
                                                   else "no cell with every seed"))
    return ["Time to quality across model sizes: training minutes to each dense model's FIDs ("
            + "; ".join(f"{fid:.1f}: {what}" for fid, what in targets) + "), at the time a seed's FID curve, "
            "linearly interpolated between evaluations, first reaches it; mean over the seeds that did (how many in "
            "brackets):\n\n" + "\n".join(lines) + "\n",
            "First to each target, every seed: " + "; ".join(firsts) + ".\n"]
