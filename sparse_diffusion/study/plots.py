"""The report's figures (PNG files in its ``plots/`` folder), drawn with matplotlib from the
cells of :func:`.results.cells`: per study FID against sparsity and block size and the
speed-up (:func:`study_plots`); over the grid FID against steps and training wall-clock
(:func:`curve_plots`) and final FID against block size (:func:`block_plot`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .results import block_order, block_weights, differing_in, label, line_name, main_block

# The block axis: weights per block and kernel tap, so that unstructured (1), vector blocks (16x1: 16)
# and square blocks (16: 256, 32: 1024) share one scale; its ticks name the blocks.
BLOCK_AXIS = "block (log of weights per block; 1 = unstructured)"
# The FID axis is logarithmic (FIDs run from about 40 to a few hundred early in training), its
# ticks round numbers about 20-25% apart (those inside the axis show).
FID_LABEL = "FID (log scale, lower is better)"
FID_TICKS = [m * 10 ** e for e in range(4) for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)]
# Ticks of a log wall-clock axis in minutes.
MINUTE_TICKS = [m * 10 ** e for e in range(-1, 4) for m in (1, 2, 3, 5)]


def block_axis(ax, blocks) -> None:
    """A log2 axis of weights per block, a tick named after each block shape of ``blocks``."""
    ax.set_xscale("log", base=2)
    ax.set_xticks([block_weights(b) for b in blocks], [str(b) for b in blocks])
    ax.minorticks_off()
    ax.set_xlabel(BLOCK_AXIS)


def _pyplot():
    """matplotlib's pyplot, drawing to files only (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def study_plots(study: str, rows: List[Dict], folder: Path) -> List[Path]:
    """FID vs sparsity per method, FID vs block size (with more than one), speed-up vs sparsity:
    PNG files."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    sparse = [r for r in rows if r["method"] != "dense"]
    dense = [r for r in rows if r["method"] == "dense"]
    blocks = sorted({r["block"] for r in sparse}, key=block_order)
    paths = []
    if not sparse:
        return paths
    block = main_block(rows)
    top_sparsity = max(r["sparsity"] for r in sparse)

    def lines(ax, selected, x_key):
        x_of = (lambda r: block_weights(r["block"])) if x_key == "block" else (lambda r: r[x_key])
        for name in dict.fromkeys(line_name(r) for r in selected):
            points = sorted(((x_of(r), r) for r in selected if line_name(r) == name and r["fid"] is not None),
                            key=lambda point: point[0])
            if points:
                ax.errorbar([p[0] for p in points], [p[1]["fid"] for p in points],
                            yerr=[p[1]["fid_std"] for p in points], marker="o", capsize=3, label=name)

    def dense_line(ax):
        if dense and dense[0]["fid"] is not None:
            ax.axhline(dense[0]["fid"], color="black", linestyle="--", label=label(dense[0]))

    figure, ax = plt.subplots(figsize=(7, 4))
    lines(ax, [r for r in sparse if r["block"] == block], "actual_sparsity")
    dense_line(ax)
    fid_axis(ax)
    ax.set(xlabel="sparsity reached", title=f"{study}: FID vs sparsity (block {block})")
    legend(ax)
    paths.append(save_figure(figure, folder / f"{study}-fid-vs-sparsity.png"))

    if len(blocks) > 1:  # one block size has no block-size axis
        figure, ax = plt.subplots(figsize=(7, 4))
        lines(ax, [r for r in sparse if r["sparsity"] == top_sparsity], "block")
        dense_line(ax)
        block_axis(ax, blocks)
        fid_axis(ax)
        ax.set(title=f"{study}: FID vs block size (target sparsity {top_sparsity:g})")
        legend(ax)
        paths.append(save_figure(figure, folder / f"{study}-fid-vs-block.png"))

    figure, ax = plt.subplots(figsize=(7, 4))
    for block in blocks:
        for name in dict.fromkeys(line_name(r) for r in sparse if r["block"] == block):
            points = sorted((r["actual_sparsity"], r["speedup"]) for r in sparse
                            if r["block"] == block and line_name(r) == name and r["speedup"])
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=f"{name}, block {block}")
    ax.axhline(1.0, color="black", linestyle="--", label=label(dense[0]) if dense else "dense")
    timed = ("s / step re-timed on one machine" if any(r["retimed"] for r in sparse) else "the runs' own s / step")
    ax.set(xlabel="sparsity reached", ylabel="training speed-up vs dense", title=f"{study}: speed-up vs sparsity")
    ax.text(0.01, 0.01, f"dense s / step over the cell's ({timed})", transform=ax.transAxes, fontsize=7)
    legend(ax)
    paths.append(save_figure(figure, folder / f"{study}-speedup-vs-sparsity.png"))
    return paths


def curve_plots(rows: List[Dict], folder: Path, name: str) -> List[Path]:
    """FID against steps and against training wall-clock: one panel per sparsity (the main
    block size), one line per method, dense in every panel."""
    plt = _pyplot()
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
                points = mean_curve(r)
                xs = [p[0] if x == "steps" else p[1] / 60 for p in points]
                style = {"color": "black", "linestyle": "--"} if r["method"] == "dense" else {}
                ax.plot(xs, [p[2] for p in points], marker=".", label=line_name(r), **style)
            ax.set(xlabel=x_label, title="dense" if sparsity is None else f"sparsity {sparsity:g}, block {block}")
            fid_axis(ax, FID_LABEL if ax is axes[0][0] else "")
        legend(axes[0][-1])
        paths.append(save_figure(figure, folder / f"{name}-fid-vs-{x}.png"))
    return paths


def block_plot(rows: List[Dict], folder: Path, name: str) -> List[Path]:
    """Final FID against block size, over every study: one panel per sparsity, one line per
    group of cells that differ in block size alone, dense in every panel; none without such a group."""
    groups = differing_in(rows, "block")
    if not groups:
        return []
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    dense = next((r for r in rows if r["method"] == "dense" and r["fid"] is not None), None)
    sparsities = sorted({next(iter(by.values()))["sparsity"] for by in groups})
    figure, axes = plt.subplots(1, len(sparsities), figsize=(4 * len(sparsities), 3.6), squeeze=False, sharey=True)
    for ax, sparsity in zip(axes[0], sparsities):
        for by in groups:
            points = sorted(((block_weights(b), r) for b, r in by.items() if r["sparsity"] == sparsity
                             and r["fid"] is not None), key=lambda point: point[0])
            if points:
                ax.errorbar([b for b, _ in points], [r["fid"] for _, r in points], yerr=[r["fid_std"] for _, r in points],
                            marker="o", capsize=3, label=line_name(points[0][1]))
        if dense is not None:
            ax.axhline(dense["fid"], color="black", linestyle="--", label=label(dense))
        block_axis(ax, sorted({b for by in groups for b in by}, key=block_order))
        fid_axis(ax, "final " + FID_LABEL if ax is axes[0][0] else "")
        ax.set(title=f"target sparsity {sparsity:g}")
    legend(axes[0][-1])
    return [save_figure(figure, folder / f"{name}-final-fid-vs-block.png")]


def structure_plot(rows: List[Dict], folder: Path, name: str, methods: Sequence[str]) -> List[Path]:
    """FID against training wall-clock, one panel per sparsity with more than one block shape and
    per method of ``methods`` (the paper's rules), one line per block shape, dense in every panel."""
    dense = [r for r in rows if r["method"] == "dense"]
    rows = [r for r in rows if r["method"] in methods and not r["exact_k"]]
    shapes = {(r["sparsity"], r["method"]): set() for r in rows}
    for r in rows:
        shapes[(r["sparsity"], r["method"])].add(r["block"])
    sparsities = sorted({s for (s, _), blocks in shapes.items() if len(blocks) > 1})
    if not sparsities:
        return []
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(len(sparsities), len(methods), figsize=(4 * len(methods), 3.2 * len(sparsities)),
                                squeeze=False, sharex=True, sharey=True)
    for i, sparsity in enumerate(sparsities):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            cells = sorted((r for r in rows if r["sparsity"] == sparsity and r["method"] == method),
                           key=lambda r: block_order(r["block"]))
            for r in dense + cells:
                points = mean_curve(r)
                style = {"color": "black", "linestyle": "--"} if r["method"] == "dense" else {}
                ax.plot([p[1] / 60 for p in points], [p[2] for p in points], marker=".",
                        label="dense" if r["method"] == "dense" else f"block {r['block']}", **style)
            ax.set(title=f"{method}, sparsity {sparsity:g}",
                   xlabel="training wall-clock (min)" if i == len(sparsities) - 1 else "")
            fid_axis(ax, FID_LABEL if j == 0 else "")
        legend(axes[i][-1])
    return [save_figure(figure, folder / f"{name}-fid-vs-wall-clock-by-block.png")]


def frontier_plot(rows: List[Dict], best: List[Dict], envelope: List[Tuple[float, float]], folder: Path,
                  name: str, with_model: bool = False) -> List[Path]:
    """Every cell's mean FID curve against training wall-clock (grey; dense dashed black), the
    curves of the ``best`` cells (those on the frontier) in colour, and the frontier ``envelope``
    (``(seconds, FID)`` points) as a thick line."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    figure, ax = plt.subplots(figsize=(8, 4.5))
    best = {id(r) for r in best}
    models = list(dict.fromkeys(r["model"] for r in rows))
    for r in sorted(rows, key=lambda r: id(r) in best):
        points = mean_curve(r)
        xs, ys = [p[1] / 60 for p in points], [p[2] for p in points]
        model = f"{r['model']} " if with_model else ""
        if r["method"] == "dense":  # a line style per model size
            style = ("--", ":", "-.")[models.index(r["model"]) % 3]
            ax.plot(xs, ys, color="black", linestyle=style, marker=".", label=f"{model}dense", zorder=3)
        elif id(r) in best:
            ax.plot(xs, ys, marker=".", label=f"{model}{line_name(r)} {r['sparsity']:g}, block {r['block']}", zorder=3)
        else:
            ax.plot(xs, ys, color="0.8", linewidth=0.8, zorder=1)
    ax.plot([s / 60 for s, _ in envelope], [f for _, f in envelope], color="tab:red", linewidth=4, alpha=0.3,
            label="frontier (best by each budget)", zorder=2)
    ax.set(xlabel="training wall-clock (min, log scale)", title=f"{name}: FID vs training wall-clock, all cells")
    ax.set_xscale("log")
    _log_axis(ax.xaxis, MINUTE_TICKS)
    fid_axis(ax)
    legend(ax)
    return [save_figure(figure, folder / f"{name}-frontier.png")]


def _plain():
    """Tick labels as plain numbers (40, 150), not powers of ten."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


def mean_curve(row: Dict) -> List[Tuple[int, float, float]]:
    """``(step, mean training wall-clock, mean FID)`` over the seeds, at the steps every seed
    evaluated."""
    steps = set.intersection(*({p["step"] for p in c if p.get("fid") is not None} for c in row["curves"]))
    points = []
    for step in sorted(steps):
        at = [next(p for p in c if p["step"] == step) for c in row["curves"]]
        points.append((step, sum(p["wall_clock_s"] for p in at) / len(at), sum(p["fid"] for p in at) / len(at)))
    return points


def fid_axis(ax, text: str = FID_LABEL) -> None:
    """A log-scaled FID axis with plain numbers on its ticks: FIDs run from the best cells' 40 to
    a few hundred early in training, and a linear axis flattens the region the comparison is about."""
    ax.set_yscale("log")
    _log_axis(ax.yaxis, FID_TICKS)
    ax.set_ylabel(text)


def _log_axis(axis, ticks) -> None:
    """Ticks of a log-scaled ``axis`` at the round numbers ``ticks``, labelled as plain numbers
    (40, 150), with no minor ticks or labels."""
    from matplotlib.ticker import FixedLocator, NullLocator

    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(_plain())
    axis.set_minor_locator(NullLocator())


def legend(ax) -> None:
    """The axis's legend outside it, on the right, so that it never covers a line; "no data" on an
    axis with no line."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:  # no FID in these runs (eval_samples: 0)
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")


def save_figure(figure, path: Path) -> Path:
    """Writes ``figure`` to ``path`` (PNG) and closes it."""
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
