"""The report of a grid (``report.md`` and ``plots/`` in its output folder), built from the run
folders alone: each run's ``config.json`` and ``metrics.json``.

Per study: a table of every (method, sparsity, block, drop fraction, growth rule) averaged over
seeds, a headline table (:mod:`.tables`), and plots of FID against sparsity and block size and of
the speed-up (:mod:`.plots`); a study without a dense run compares with the dense run of a study
trained the same way. Runs that evaluated during training (``eval_every``) add the convergence
questions of :func:`.convergence.convergence_section`: FID against steps and against training
wall-clock, whether each cell matches dense within the seed noise, which is best at equal
wall-clock, and how long each needs to reach a fixed FID.

With the grid's ``wall_clock_from`` (the JSON of ``python -m benchmarks.study_timing GRID.yaml``,
every cell's training step timed side by side on one machine) its wall-clocks are steps x those
times, so that runs made on different machines, or alongside other work, compare fairly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .convergence import convergence_section
from .frontier import frontier_section
from .grid import RunSpec
from .plots import study_plots
from .results import cell_key, cells, load_timing, main_block, read_runs, summarize
from .tables import headline_table, markdown_table


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


def write_report(root: Path, grid: Dict, runs: Sequence[RunSpec]) -> Path:
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
        for path in study_plots(study, rows, root / "plots"):
            parts.append(f"![{path.stem}](plots/{path.name})\n")
    rows = cells(records, timing)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:  # each model against its own dense
        name = root.name if len(models) == 1 else f"{root.name}-{model.replace(' ', '-')}"
        convergence = convergence_section([r for r in rows if r["model"] == model], root / "plots", name, timing_note)
        if convergence:
            parts.append(convergence)
    parts.extend(frontier_section(rows, root / "plots", root.name))
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
