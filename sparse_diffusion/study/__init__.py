"""The research study: grids of training runs (``sparse-diffusion experiment GRID.yaml``) and
the report read back from their run folders. It uses the training layer (``train``,
``TrainConfig``); the training layer never imports it.

Files, each importing only those above it::

    grid.py         RunSpec; load_grid, expand: a grid file checked and crossed into its runs
    launch.py       the command line of a run (train_command), under torchrun too
    results.py      run folders read back: finished, read_runs, cell_key, cells, summarize, load_timing
    tables.py       the markdown tables of a study's cells; fmt, fid_text
    plots.py        the report's matplotlib figures (plots/*.png)
    convergence.py  the convergence questions: FID against steps and wall-clock, budgets, targets
    frontier.py     the FID-vs-wall-clock frontier: the best cell by each training budget
    report.py       write_report: report.md and plots/ from the run folders alone
    runner.py       run_grid: trains what is missing, records failures, then the report

Import the names from their files (``from sparse_diffusion.study.runner import run_grid``):
importing this package loads nothing.
"""
