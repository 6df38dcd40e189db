"""The report of a grid (``report.md`` and ``plots/`` in its output folder), built from the run
folders alone: each run's ``config.json`` and ``metrics.json``.

Per study: a table of every (method, sparsity, block, drop fraction, growth rule) averaged over
seeds, a headline table, and plots of FID against sparsity and block size and of the speed-up; a
study without a dense run compares with the dense run of a study trained the same way.
Runs that evaluated during training (``eval_every``) add the convergence questions of
:func:`convergence_section`: FID against steps and against training wall-clock, whether each
cell matches dense within the seed noise, which is best at equal wall-clock, and how long each
needs to reach a fixed FID.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from .convergence import convergence_section
from .results import (cell_key, cells, fid_text, fmt, label, legend, line_name, load_timing, main_block, read_runs,
                      save_figure, summarize)

if TYPE_CHECKING:
    from .experiment import RunSpec


def markdown_table(rows: List[Dict]) -> str:
    header = ("| method | sparsity (actual) | block | drop | seeds | FID (mean ± std) | parameters | MFLOPs / sample | "
              "s / step | speed-up vs dense | train state (MB) |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [header]
    for r in rows:
        fid = fid_text(r)
        lines.append(
            f"| {label(r)} | {r['sparsity']:.2f} ({r['actual_sparsity']:.2f}) | {fmt(r['block'], 'd')} | {fmt(r['drop'], 'g')} | "
            f"{r['seeds']} | {fid} | {r['parameters']:,} | {r['flops'] / 1e6:.1f} | {fmt(r['s_per_step'], '.3f')} | "
            f"{fmt(r['speedup'], '.2f')} | {fmt(r['state_mb'], '.2f')} |"
        )
    return "\n".join(lines)


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
        return f"{fid_text(r)} ({fmt(r['speedup'], '.2f')}x)"

    lines = ["| method | " + " | ".join(f"sparsity {s:g}" for s in sparsities) + " |",
             "| --- |" + " ---: |" * len(sparsities)]
    if dense:
        lines.append(f"| {label(dense)} | " + " | ".join(cell(dense) for _ in sparsities) + " |")
    names = dict.fromkeys(line_name(r) for r in sparse)
    for name in names:
        by_sparsity = {r["sparsity"]: r for r in sparse if line_name(r) == name}
        lines.append(f"| {name} | " + " | ".join(cell(by_sparsity.get(s)) for s in sparsities) + " |")
    return "\n".join(lines)


def _plots(study: str, rows: List[Dict], folder: Path) -> List[Path]:
    """FID vs sparsity per method, FID vs block size (with more than one), speed-up vs sparsity:
    PNG files."""
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
        for name in dict.fromkeys(line_name(r) for r in selected):
            points = sorted((r[x_key], r) for r in selected if line_name(r) == name and r["fid"] is not None)
            if points:
                ax.errorbar([p[0] for p in points], [p[1]["fid"] for p in points],
                            yerr=[p[1]["fid_std"] for p in points], marker="o", capsize=3, label=name)

    def dense_line(ax):
        if dense and dense[0]["fid"] is not None:
            ax.axhline(dense[0]["fid"], color="black", linestyle="--", label=label(dense[0]))

    figure, ax = plt.subplots(figsize=(6, 4))
    lines(ax, [r for r in sparse if r["block"] == block], "sparsity")
    dense_line(ax)
    ax.set(xlabel="sparsity", ylabel="FID (lower is better)", title=f"{study}: FID vs sparsity (block {block})")
    legend(ax)
    paths.append(save_figure(figure, folder / f"{study}-fid-vs-sparsity.png"))

    if len(blocks) > 1:  # one block size has no block-size axis
        figure, ax = plt.subplots(figsize=(6, 4))
        lines(ax, [r for r in sparse if r["sparsity"] == top_sparsity], "block")
        dense_line(ax)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="block size (1 = unstructured)", ylabel="FID (lower is better)",
               title=f"{study}: FID vs block size (sparsity {top_sparsity:g})")
        legend(ax)
        paths.append(save_figure(figure, folder / f"{study}-fid-vs-block.png"))

    figure, ax = plt.subplots(figsize=(6, 4))
    for block in blocks:
        by_sparsity: Dict[float, List[float]] = {}
        for r in sparse:
            if r["block"] == block and r["speedup"]:
                by_sparsity.setdefault(r["sparsity"], []).append(r["speedup"])
        xs = sorted(by_sparsity)
        ax.plot(xs, [sum(by_sparsity[x]) / len(by_sparsity[x]) for x in xs], marker="o", label=f"block {block}")
    ax.axhline(1.0, color="black", linestyle="--", label=label(dense[0]) if dense else "dense")
    ax.set(xlabel="sparsity", ylabel="training speed-up vs dense (s/step)", title=f"{study}: speed-up vs sparsity")
    legend(ax)
    paths.append(save_figure(figure, folder / f"{study}-speedup-vs-sparsity.png"))
    return paths


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
        borrowed = next((r["from_study"] for r in rows if r.get("from_study")), None)
        if borrowed:
            parts.append(f"No dense run of its own: dense is study {borrowed}'s, trained and evaluated the same way.\n")
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
