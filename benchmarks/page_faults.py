"""Page faults per training step, in fresh processes: glibc's defaults against the thresholds
that ``sparse-diffusion`` fixes (:mod:`sparse_diffusion.allocator`).

    python -m benchmarks.page_faults --out-dir benchmarks/results     # demo, 5 processes per setting
    python -m benchmarks.page_faults --models small --processes 3

Each process is one ``benchmarks.train_loop`` (dense and RigL at one sparsity, interleaved in
rounds: as close to one training run per process as a comparison with dense allows; four
trainers in one process fault more, from the mix of their heaps) with ``--malloc keep`` or
``--malloc system``; the settings alternate (keep, system, system, keep, ...), each with a
process per sparsity, so that whatever else the machine does falls on both alike. Whether glibc
hands memory back each step depends on the heap's layout, which differs from process to
process: one process proves nothing. Per setting and run: the median and range over processes
of the minor page faults per step and of ms per step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

from sparse_diffusion.config import block_shape

from .common import (add_output_arguments, environment, parameters_of, print_table, result_path, run_command,
                     write_json)
from .train_loop import MODELS

SETTINGS = ("keep", "system")


def order(processes: int) -> List[str]:
    """The settings of ``processes`` processes each: keep, system, system, keep, keep, system, ..."""
    pairs = [SETTINGS if i % 2 == 0 else SETTINGS[::-1] for i in range(processes)]
    return [setting for pair in pairs for setting in pair]


def one_process(setting: str, sparsity: float, args: argparse.Namespace, folder: str,
                index: int) -> List[Dict[str, object]]:
    """The rows of one fresh ``benchmarks.train_loop`` process: dense and RigL at ``sparsity``."""
    out = Path(folder) / f"{index}-{setting}-{sparsity}.json"
    command = [sys.executable, "-m", "benchmarks.train_loop", "--models", *args.models, "--methods", "rigl",
               "--sparsities", str(sparsity), "--block-sizes", *map(str, args.block_sizes),
               "--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--memory-repeats", "0", "--threads", str(args.threads), "--malloc", setting, "--out", str(out)]
    run_command(command)
    payload = json.loads(out.read_text())
    return [{**row, "malloc": setting, "fixed": payload["environment"]["malloc_thresholds_fixed"]}
            for row in payload["rows"]]


def summarize(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """One row per (setting, model, run): medians and ranges over the processes."""
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((row["malloc"], row["model"], row["run"]), []).append(row)
    table = []
    for (setting, model, run), group in groups.items():
        faults = [row["page_faults_per_step"] for row in group]
        ms = [row["ms_per_step"] for row in group]
        table.append({
            "malloc": setting, "thresholds_fixed": all(row["fixed"] for row in group), "model": model, "run": run,
            "sparsity": group[0]["nominal_sparsity"], "processes": len(group),
            "faults_per_step": statistics.median(faults), "faults_min": min(faults), "faults_max": max(faults),
            "faults_per_process": faults,
            "ms_per_step": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms),
        })
    return table


def run(args: argparse.Namespace) -> Dict[str, object]:
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory() as folder:
        for index, setting in enumerate(order(args.processes)):
            for sparsity in args.sparsities:
                last = one_process(setting, sparsity, args, folder, index)
                rows += last
                print(f"  process {index + 1}/{2 * args.processes} ({setting}, {sparsity}), faults per step: "
                      + ", ".join(f"{row['model']} {row['run']} {row['page_faults_per_step']:.0f}" for row in last),
                      flush=True)
    params = parameters_of(args)
    params["models"] = {name: MODELS[name] for name in args.models}
    return {"suite": "page_faults", "environment": env, "parameters": params, "rows": summarize(rows)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["demo"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--block-sizes", nargs="+", type=block_shape, default=[16],
                        help="block shapes: N (N x N) or BOxBI such as 16x1")
    parser.add_argument("--processes", type=int, default=5, help="fresh processes per setting and sparsity")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps of each run per round")
    parser.add_argument("--warmup", type=int, default=3)
    add_output_arguments(parser, threads=True)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    payload = run(args)
    env = payload["environment"]
    print(f"\npage faults per training step on {env['cpu']} ({env['torch_threads']} threads), "
          f"{args.processes} fresh processes per setting, {args.rounds} rounds x {args.steps} steps each")
    print_table(payload["rows"], ["malloc", "model", "run", "faults_per_step", "faults_min", "faults_max",
                                  "ms_per_step", "ms_min", "ms_max"])
    write_json(result_path(args.out, args.out_dir, "page_faults", env), payload)
    return payload


if __name__ == "__main__":
    main()
