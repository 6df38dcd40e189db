"""The training wall-clock of every cell of an experiment grid, measured side by side on one machine.

    python -m benchmarks.study_timing experiments/steps-6000.yaml --out experiments/results/steps-6000/timing.json

A long study's runs land on whatever machine each stretch of work gets, and may share it with
other work: comparing their own wall-clocks would compare machines and loads, not methods. This
times one seed of every cell of the grid (the grid's own settings: model, batch, block size,
update interval, checkpoint interval) as :class:`sparse_diffusion.train.Trainer` steps,
interleaved in one process with :func:`benchmarks.train_loop.interleave`: ``--rounds`` rounds of
``--steps`` steps each, rotating, so that whatever else the machine does falls on all cells
alike; ms/step is the median over rounds plus the checkpoint save amortised over the grid's
``checkpoint_every``. With the default 10 x 10 steps every RigL and MagRan cell makes one mask
update (the grid's ``update_interval`` of 100), amortised as in training.

A grid that names this file as ``wall_clock_from`` has its report re-time every run: the
wall-clock of an FID evaluation at step s is s x its cell's ms/step from here, so that FID-vs-
wall-clock curves, budgets and times to a target FID compare cells on one machine. Evaluations
are not timed (they are not training).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from typing import Dict, List

import torch

from .common import add_output_arguments, environment, parameters_of, print_table, result_path, write_json
from .train_loop import interleave


def cells(grid_path: str) -> Dict[str, object]:
    """One run per cell of the grid (its first seed), keyed ``study/name`` without the seed."""
    from sparse_diffusion.study.grid import expand, load_grid
    from sparse_diffusion.study.results import cell_key

    chosen: Dict[tuple, object] = {}
    for run in expand(load_grid(grid_path)):
        chosen.setdefault(cell_key(dataclasses.asdict(run.config)), run)
    return {f"{run.study}/{run.name.rsplit('-seed', 1)[0]}": run for run in chosen.values()}


def run(args: argparse.Namespace) -> Dict[str, object]:
    from sparse_diffusion.study.results import cell_key
    from sparse_diffusion.train import Trainer

    torch.set_num_threads(args.threads)
    selected = cells(args.grid)
    if args.only:
        selected = {name: spec for name, spec in selected.items() if any(part in name for part in args.only)}
    if not selected:
        raise SystemExit(f"--only {' '.join(args.only or [])}: no cell of {args.grid} matches")
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory() as folder:
        trainers = {name: Trainer(dataclasses.replace(spec.config, out=f"{folder}/{i}", eval_samples=0, eval_every=0,
                                                      sample_every=0))
                    for i, (name, spec) in enumerate(selected.items())}
        env = environment(next(iter(trainers.values())).device)  # the grid's own device (auto: a GPU if any)
        for row in interleave(trainers, args.rounds, args.steps, args.warmup, label="cells"):
            key = cell_key(dataclasses.asdict(selected[row["run"]].config))
            rows.append({**row, "key": list(key), "nominal_sparsity": key[1], "block_size": key[2],
                         "checkpoint_every": selected[row["run"]].config.checkpoint_every})
    dense = {r["key"][5]: r["ms_per_step"] for r in rows if r["method"] == "dense"}  # per model size
    for row in rows:
        step = dense.get(row["key"][5])
        row["speedup_vs_dense"] = step / row["ms_per_step"] if step else None
    return {"suite": "study_timing", "environment": env, "parameters": parameters_of(args), "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="the experiment grid, e.g. experiments/steps-6000.yaml")
    parser.add_argument("--only", nargs="+", help="time only the cells whose study/name contains one of these")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="steps of each cell per round")
    parser.add_argument("--warmup", type=int, default=3)
    add_output_arguments(parser, threads=True)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    payload = run(args)
    env = payload["environment"]
    print(f"\n{args.grid}: training step of every cell on {env['cpu']} ({env['torch_threads']} threads), "
          f"{args.rounds} rounds x {args.steps} steps")
    print_table(payload["rows"], ["run", "sparsity", "ms_per_step", "min_ms", "max_ms", "speedup_vs_dense",
                                  "mask_updates", "mask_update_ms", "io_ms_per_step"])
    write_json(result_path(args.out, args.out_dir, "study_timing", env), payload)
    return payload


if __name__ == "__main__":
    main()
