"""The convergence questions of a grid's report, over the cells whose runs evaluated FID during
training (``eval_every``): FID against steps and against training wall-clock, whether each cell
matches dense within the seed noise (Welch's t-test), which is best at equal wall-clock, and
how long each needs to reach a fixed FID (both read from the curves interpolated between
evaluations).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .plots import block_plot, curve_plots, mean_curve, structure_plot
from .results import block_order, block_text, differing_in, label, mean_std
from .tables import fid_text, fmt

# Budgets of the equal-wall-clock comparison, as fractions of dense's training wall-clock, and
# the FID each cell must reach in the time-to-quality comparison (dense's final FID + 10%).
BUDGETS = (0.25, 0.5, 1.0)
TARGET_OVER_DENSE = 1.10
# Earlier targets of the time-to-quality question: dense's FID at these fractions of its training.
EARLIER_TARGETS = (1 / 3, 2 / 3)


def fid_at(curve: List[Dict], seconds: float) -> Optional[float]:
    """The FID at ``seconds`` of training, read from the curve linearly interpolated between
    evaluations (so that a cut-off just before or after an evaluation reads nearly the same);
    the last FID once training has ended; None before the first evaluation."""
    points = [p for p in curve if p.get("fid") is not None]
    if not points or seconds < points[0]["wall_clock_s"]:
        return None
    for before, after in zip(points, points[1:]):
        if seconds <= after["wall_clock_s"]:
            span = after["wall_clock_s"] - before["wall_clock_s"]
            share = (seconds - before["wall_clock_s"]) / span if span > 0 else 1.0
            return before["fid"] + share * (after["fid"] - before["fid"])
    return points[-1]["fid"]


def fid_by(row: Dict, seconds: float) -> Optional[float]:
    """The cell's FID after ``seconds`` of training, the mean over its seeds of each curve read
    between evaluations (:func:`fid_at`); None until every seed has evaluated, so that no cell
    is read from its luckiest seeds alone."""
    fids = [fid_at(curve, seconds) for curve in row["curves"]]
    return None if not fids or any(f is None for f in fids) else mean_std(fids)[0]


def time_to(curve: List[Dict], fid: float) -> Optional[float]:
    """Training seconds at which the curve, linearly interpolated between evaluations, first
    reaches ``fid``: the first evaluation's time if that one already has (None: never)."""
    points = [p for p in curve if p.get("fid") is not None]
    for i, p in enumerate(points):
        if p["fid"] <= fid:
            if i == 0:
                return p["wall_clock_s"]
            before = points[i - 1]
            share = (before["fid"] - fid) / (before["fid"] - p["fid"])
            return before["wall_clock_s"] + share * (p["wall_clock_s"] - before["wall_clock_s"])
    return None


def welch(row: Dict, dense: Dict, confidence: float = 0.95) -> Optional[Tuple[float, float, float]]:
    """Welch's t-test of the row's final FIDs against dense's (unequal variances): the gap of
    the means (row - dense), the half-width of its ``confidence`` interval, and the
    Welch-Satterthwaite degrees of freedom. None with fewer than two seeds on a side or no
    spread on either."""
    from scipy import stats

    if row["fid"] is None or dense["fid"] is None or min(row["seeds"], dense["seeds"]) < 2:
        return None
    a, b = row["fid_std"] ** 2 / row["seeds"], dense["fid_std"] ** 2 / dense["seeds"]
    if a + b == 0:
        return None
    freedom = (a + b) ** 2 / (a ** 2 / (row["seeds"] - 1) + b ** 2 / (dense["seeds"] - 1))
    half_width = stats.t.ppf(0.5 + confidence / 2, freedom) * math.sqrt(a + b)
    return row["fid"] - dense["fid"], half_width, freedom


def _against_dense(row: Dict, dense: Dict) -> str:
    """The final FID's gap to dense with its 95% interval and Welch's degrees of freedom, and
    ``better`` / ``worse`` where the interval excludes 0, ``within noise`` where it does not;
    ``-`` where :func:`welch` cannot tell."""
    test = welch(row, dense)
    if test is None:
        return "- | - | -"
    gap, half_width, freedom = test
    verdict = "within noise" if abs(gap) <= half_width else ("better" if gap < 0 else "worse")
    return f"{gap:+.1f} ± {half_width:.1f} | {freedom:.1f} | {verdict}"


def minutes_to(row: Dict, fid: float) -> Tuple[Optional[float], int]:
    """Mean training minutes of the row's seeds that reached ``fid`` (None: none did), and how many did."""
    reached = [t for t in (time_to(c, fid) for c in row["curves"]) if t is not None]
    return (sum(reached) / len(reached) / 60 if reached else None), len(reached)


def dense_targets(dense: Dict, final_margin: float = TARGET_OVER_DENSE) -> List[Tuple[str, float]]:
    """The FIDs of the time-to-quality question, from dense's curve (mean over its seeds): its FID
    at the evaluations nearest :data:`EARLIER_TARGETS` of its training, and its final FID x
    ``final_margin`` (+ 10% by default)."""
    points = mean_curve(dense)
    targets = []
    for fraction in EARLIER_TARGETS:
        step, _, fid = min(points, key=lambda p: abs(p[0] - fraction * points[-1][0]))
        if step != points[-1][0] and all(f != fid for _, f in targets):
            targets.append((f"dense's FID at step {step:,}", fid))
    margin = "" if final_margin == 1 else f" + {(final_margin - 1) * 100:.0f}%"
    return targets + [(f"dense's final FID {dense['fid']:.1f}{margin}", dense["fid"] * final_margin)]


def _sooner(rows: List[Dict], dense: Dict, targets: List[Tuple[str, float]]) -> str:
    """A sentence per target naming the sparse cells whose every seed reached it sooner than
    dense's mean time to it, or saying that none did."""
    sentences = []
    for _, target in targets:
        dense_minutes, _ = minutes_to(dense, target)
        if dense_minutes is None:
            sentences.append(f"FID {target:.1f}: no seed of dense reaches it, no cell is compared")
            continue
        sooner = []
        for r in rows:
            minutes, reached = minutes_to(r, target)
            if r is not dense and minutes is not None and reached == len(r["curves"]) and minutes < dense_minutes:
                sooner.append(f"{label(r)} at sparsity {r['sparsity']:g}, block {block_text(r['block'])} "
                              f"({minutes:.1f} min)")
        sentences.append(f"FID {target:.1f} (dense {dense_minutes:.1f} min): "
                         + ("; ".join(sooner) if sooner else "no sparse cell"))
    return "Sooner than dense, every seed: " + ". ".join(sentences) + ".\n"


def _network(row: Dict) -> Optional[str]:
    """The one local network all of a row's seeds name, or None (not recorded, or several)."""
    return next(iter(row["local_networks"])) if len(row["local_networks"]) == 1 else None


def _local_fd(rows: List[Dict], dense: Dict) -> List[str]:
    """Final Inception FID beside the final local FD, each mean above or below dense's, and the
    cells the two put on opposite sides of dense; a local FD is compared with dense's only when both come
    from one recorded local network (each machine's cache trains its own, and an FD is on its
    network's scale)."""
    if dense["fd_local"] is None:
        return []

    def side(value: Optional[float], reference: Optional[float]) -> str:
        return "-" if value is None or reference is None else ("lower" if value < reference else "higher")

    lines = ["| method | sparsity | block | final FID | than dense's | final local FD | than dense's | network |",
             "| --- | ---: | ---: | ---: | --- | ---: | --- | --- |"]
    disagree, unknown, compared = [], 0, 0
    for r in rows:
        comparable = r is not dense and _network(r) is not None and _network(r) == _network(dense)
        unknown += r is not dense and not comparable
        compared += comparable
        by_fid = "-" if r is dense else side(r["fid"], dense["fid"])
        by_local = side(r["fd_local"], dense["fd_local"]) if comparable else "-"
        if "-" not in (by_fid, by_local) and by_fid != by_local:
            disagree.append(f"{label(r)} at sparsity {r['sparsity']:g}, block {block_text(r['block'])}")
        networks = ", ".join(sorted(n or "not recorded" for n in r["local_networks"]))
        lines.append(f"{_where(r)} {fmt(r['fid'], '.1f')} | {by_fid} | {fmt(r['fd_local'], '.4g')} | {by_local} | "
                     f"{networks} |")
    verdict = (f"They put these cells on opposite sides of dense: {'; '.join(disagree)}." if disagree
               else "Where both compare, they put every cell on the same side of dense." if compared
               else "No cell shares dense's recorded network, so none is compared on the local FD.")
    if unknown:
        verdict += (f" {unknown} cell(s) do not share dense's recorded network (runs made before results named "
                    "their network record none), so their local FDs are shown but not compared.")
    return ["Inception FID and the local FD (FD in the features of a small network trained on the test split; "
            "every machine's cache trains its own, and an FD is on its network's scale, so two runs' local FDs "
            "compare only when their results name the same network). Means over seeds, at the end of "
            "training:\n\n" + "\n".join(lines) + "\n", verdict + "\n"]


def _where(row: Dict) -> str:
    return f"| {label(row)} | {row['sparsity']:g} | {block_text(row['block'])} |"


def convergence_section(rows: List[Dict], folder: Path, name: str, timing_note: str = "") -> str:
    """The convergence questions, over the cells whose runs evaluated during training: final
    FID against dense within the seed noise; FID at equal training wall-clock; wall-clock to
    reach dense's final FID + 10%; the growth rule, and the block size at equal target
    sparsity. Writes the FID-vs-steps, FID-vs-wall-clock and final-FID-vs-block-size plots into
    ``folder`` (:mod:`.plots`). ``timing_note`` says where the wall-clocks come from when the cells were re-timed
    (:func:`.results.load_timing`)."""
    curved = [r for r in rows if r["curves"]]
    if not curved:
        return ""
    dense = next((r for r in curved if r["method"] == "dense"), None)
    retimed = any(r["retimed"] for r in curved)
    parts = [f"## Convergence ({name})\n",
             "Each run evaluated FID during training (metrics.json `curve`); wall-clock is training time only "
             "(evaluations excluded; data, optimizer, EMA, mask updates, sample grids and checkpoints included). "
             "Gap: mean final FID less dense's, ± the half-width of its 95% confidence interval from Welch's t-test "
             "over the seeds (df: its Welch-Satterthwaite degrees of freedom; with two seeds a side about 1-2, so "
             "only large gaps resolve); \"vs dense\": better / worse where the interval excludes 0, else \"within "
             "noise\" (not resolved by these seeds, which is not the same as equal). Clean timing: seeds whose machine load stayed "
             "within the run's own threads + 0.75 (metrics.json `timing`); own s / step: the runs' own "
             "wall-clock, comparable between runs only when both were clean and on the same machine."
             + (f" {timing_note}" if timing_note else "") + "\n"]
    lines = ["| method | sparsity | block | seeds | final FID | gap to dense (95% CI) | df | vs dense | s / step | "
             "speed-up | wall-clock (min) | own s / step | clean timing |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in curved:
        fid = fid_text(r)
        versus = "- | - | -" if dense is None or r is dense else _against_dense(r, dense)
        minutes = r["wall_clock_s"] / 60 if r["wall_clock_s"] else None
        step = fmt(r["s_per_step"], ".3f") + (" (own)" if retimed and not r["retimed"] else "")
        lines.append(f"{_where(r)} {r['seeds']} | {fid} | {versus} | {step} | {fmt(r['speedup'], '.2f')} | "
                     f"{fmt(minutes, '.1f')} | {fmt(r['own_s_per_step'], '.3f')} | {r['clean']}/{r['seeds']} |")
    parts.append("At the end of training:\n\n" + "\n".join(lines) + "\n")
    if dense is not None and dense["wall_clock_s"]:
        budgets = [dense["wall_clock_s"] * f for f in BUDGETS]
        lines = ["| method | sparsity | block | " + " | ".join(f"FID by {b / 60:.1f} min" for b in budgets) + " |",
                 "| --- | ---: | ---: |" + " ---: |" * len(budgets)]
        best: List[Tuple[float, str]] = [(math.inf, "-")] * len(budgets)
        for r in curved:
            at_budget = []
            for i, budget in enumerate(budgets):
                fid = fid_by(r, budget)
                at_budget.append(fmt(fid, ".1f"))
                if fid is not None and fid < best[i][0]:
                    best[i] = (fid, f"{label(r)} at sparsity {r['sparsity']:g}, block {block_text(r['block'])}")
            lines.append(f"{_where(r)} " + " | ".join(at_budget) + " |")
        parts.append("At equal training wall-clock (each seed's FID curve read at the budget, linearly interpolated "
                     "between evaluations, its final FID once it has finished; mean over seeds, as on the frontier below; "
                     "\"-\": a seed has not evaluated yet; budgets are "
                     f"{', '.join(f'{f:g}' for f in BUDGETS)} x dense's):\n\n" + "\n".join(lines) + "\n")
        parts.append("Best by each budget: " + "; ".join(
            f"{b / 60:.1f} min: " + (f"{who} ({fid:.1f})" if math.isfinite(fid) else "no evaluation yet")
            for b, (fid, who) in zip(budgets, best)) + ".\n")
    if dense is not None and dense["fid"] is not None:
        targets = dense_targets(dense)
        lines = ["| method | sparsity | block | " + " | ".join(f"to FID {fid:.1f}" for _, fid in targets) + " |",
                 "| --- | ---: | ---: |" + " ---: |" * len(targets)]
        for r in curved:
            times = [minutes_to(r, fid) for _, fid in targets]
            lines.append(f"{_where(r)} " + " | ".join(f"{fmt(minutes, '.1f')} ({reached}/{len(r['curves'])})"
                                                      for minutes, reached in times) + " |")
        parts.append("Time to quality: training minutes to each target FID (" + "; ".join(
            f"{fid:.1f}: {name}" for name, fid in targets) + "), at the time a seed's FID curve, linearly "
            "interpolated between evaluations, first reaches it; mean over the seeds that did (how many in "
            "brackets):\n\n" + "\n".join(lines) + "\n")
        parts.append(_sooner(curved, dense, targets))
        target = targets[-1][1]
        parts.extend(_structures(curved, dense, target))
    if dense is not None:
        parts.extend(_local_fd(curved, dense))
    blocks = sorted({r["block"] for r in curved if r["block"] is not None}, key=block_order)
    parts.extend(_pivot(curved, "block", "Block size at equal target sparsity (final FID, the sparsity reached in "
                        "brackets; block 1 is unstructured)", {b: f"block {b}" for b in blocks}))
    parts.extend(_pivot([r for r in curved if r["method"] in ("rigl", "magran")], "exact_k",
                        "Growth rule (final FID): the RigL paper's against exactly k blocks moved per update",
                        {False: "paper rule", True: "exact k"}))
    plots = curve_plots(curved, folder, name) + structure_plot(curved, folder, name, METHODS)
    for path in plots + block_plot(curved, folder, name):
        parts.append(f"![{path.stem}](plots/{path.name})\n")
    return "\n".join(parts)




METHODS = ("static", "rigl", "magran")


def _structures(rows: List[Dict], dense: Dict, target: float) -> List[str]:
    """The block shapes side by side at each sparsity that has more than one (the paper's rule,
    Static / RigL / MagRan): final FID, speed-up and minutes to ``target``, dense on top."""
    rows = [r for r in rows if r["method"] in METHODS and not r["exact_k"]]
    shapes: Dict[Tuple[float, object], Dict[str, Dict]] = {}
    for r in rows:
        shapes.setdefault((r["sparsity"], r["block"]), {})[r["method"]] = r
    sparsities = sorted({s for s, _ in shapes if sum(key[0] == s for key in shapes) > 1})
    if not sparsities:
        return []

    def each(by: Dict[str, Dict], text) -> str:
        return " / ".join(text(by[m]) if m in by else "-" for m in METHODS)

    dense_minutes, _ = minutes_to(dense, target)
    lines = ["| sparsity | block | final FID | speed-up | minutes to target |", "| ---: | ---: | ---: | ---: | ---: |",
             f"| 0 | dense | {fmt(dense['fid'], '.1f')} | 1.00 | {fmt(dense_minutes, '.1f')} |"]
    for sparsity in sparsities:
        for block in sorted({b for s, b in shapes if s == sparsity}, key=block_order):
            by = shapes[(sparsity, block)]
            lines.append(f"| {sparsity:g} | {block_text(block)} | {each(by, lambda r: fmt(r['fid'], '.1f'))} | "
                         f"{each(by, lambda r: fmt(r['speedup'], '.2f'))} | "
                         f"{each(by, lambda r: fmt(minutes_to(r, target)[0], '.1f'))} |")
    return [f"Structures side by side (each cell Static / RigL / MagRan, mean over seeds; minutes to target FID "
            f"{target:.1f} as above, \"-\" where no seed reached it; block 1 is unstructured):\n\n"
            + "\n".join(lines) + "\n"]


def _fid_in(row: Dict, column: str) -> str:
    """A cell's final FID in a table by ``column``; by block size with the sparsity the cell
    reached, which large blocks on small layers can leave below its target."""
    return fid_text(row) + (f" ({row['actual_sparsity']:.2f})" if column == "block" else "")


def _pivot(rows: List[Dict], column: str, title: str, names: Dict) -> List[str]:
    """A table of final FIDs with one column per value of ``column`` (headed ``names[value]``),
    one row per group of cells that differ in ``column`` alone and have more than one value of it."""
    values = sorted({r[column] for r in rows if r[column] is not None}, key=block_order if column == "block" else None)
    shown = [k for k in ("block", "drop") if k != column]
    text = {"block": block_text, "drop": lambda drop: fmt(drop, "g")}
    lines = []
    for by in differing_in(rows, column):
        first = next(iter(by.values()))
        method = first["method"] if column == "exact_k" else label(first)
        lines.append(f"| {method} | {first['sparsity']:g} | " + " | ".join(text[k](first[k]) for k in shown)
                     + " | " + " | ".join("-" if v not in by else _fid_in(by[v], column) for v in values) + " |")
    if not lines:
        return []
    header = ["| method | sparsity | " + " | ".join(shown) + " | " + " | ".join(names[v] for v in values) + " |",
              "| --- | ---: |" + " ---: |" * (len(shown) + len(values))]
    return [f"{title}:\n\n" + "\n".join(header + lines) + "\n"]
