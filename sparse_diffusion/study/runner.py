"""``sparse-diffusion experiment GRID.yaml``: trains what is left of a grid, then writes its report.

Finished runs (a metrics.json with their FID) are skipped, interrupted ones resume from their
checkpoint, so the command can be run again until it completes; a study's reused runs
(``runs_from``) are checked and read, never trained. A run that fails writes
error.txt and the grid goes on; SIGINT / SIGTERM stop the grid (the run saves its checkpoint).
The report (:mod:`.report`) is built from the run folders alone, also with ``--report-only``.
"""
from __future__ import annotations

import shlex
import traceback
from pathlib import Path
from typing import Dict, Optional

from ..train import CHECKPOINT, TrainingStopped, train
from .grid import expand, load_grid, pending_autoencoders
from .launch import autoencoder_command, run_under_torchrun, train_command
from .report import write_report
from .results import check_reused, finished


def run_grid(path: str, out: Optional[str] = None, report_only: bool = False, dry_run: bool = False,
             nproc_per_node: int = 1, print_commands: bool = False) -> Path:
    """Runs what is left of the grid in ``path``, then writes the report. Returns its path.

    ``nproc_per_node`` > 1 trains each run under torchrun with that many processes.
    ``print_commands`` trains nothing and prints one shell command per step left to do: the
    studies' autoencoders first, then one per run (for a cluster scheduler; run
    ``--report-only`` once they are done)."""
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    grid = load_grid(path)
    root = Path(out or grid["out"])
    runs = expand(grid, str(root))
    check_reused(runs)
    pending = [r for r in runs if not r.reused and not finished(r)]
    if print_commands:
        for folder, options in pending_autoencoders(grid, root):
            print(shlex.join(autoencoder_command(folder, options)))
        for run in pending:
            resume = (Path(run.config.out) / CHECKPOINT).exists()
            print(shlex.join(train_command(run.config, resume, nproc_per_node)))
        return root / "report.md"
    print(f"{path}: {len(runs)} runs in {len(grid['studies'])} studies, {len(pending)} to do, output {root}")
    elsewhere = [r for r in runs if r.reused and not finished(r)]
    if elsewhere:
        print(f"  {len(elsewhere)} reused runs are not finished where they live (the grid that owns them trains them): "
              + ", ".join(r.config.out for r in elsewhere))
    if dry_run:
        for run in runs:
            state = "todo" if run in pending else "elsewhere" if run in elsewhere else "done"
            print(f"  {state}  {run.study}/{run.name}")
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
                    train(run.config, resume=resume)
                (folder / "error.txt").unlink(missing_ok=True)
            except TrainingStopped as stop:
                if stop.exit_code > 128:  # Ctrl-C / SIGTERM: the run saved its checkpoint; the grid stops
                    raise
                _record_failure(folder)
            except Exception:  # noqa: BLE001 (one failed run must not stop the grid; the report lists it)
                _record_failure(folder)
    return write_report(root, grid, runs)


def _record_failure(folder: Path) -> None:
    """error.txt in the run's folder (the report lists it); the grid goes on."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.txt").write_text(traceback.format_exc())
    print(f"   failed: see {folder / 'error.txt'}")


def _train_autoencoders(grid: Dict, root: Path) -> None:
    from ..autoencoder_training import train_autoencoder

    for path, options in pending_autoencoders(grid, root):
        print(f"== training the autoencoder into {path}")
        train_autoencoder(out=str(path), **options)
