"""One whole-model mask update: the compiled op vs the pure-torch reference, in one run.

    python -m benchmarks.masks --out FILE.json
    python -m benchmarks.masks --device cpu --quick

A UNet-like model: 100 layers whose block grids cycle through 16x16 ... 128x128 (256 to
16,384 blocks), density 0.25, blocks of 32x32 fp32 values with two Adam states. Each
update drops ``drop_fraction`` of every layer's blocks, regrows as many among the inactive
ones (the RigL paper's rule; ``--exact-k``: among the blocks dead before) and zeroes the
reused slots of the values and both states. Methods:
  compiled            sk.prune_and_regrow: every layer in one call (one CUDA launch)
  compiled_per_layer  the same op called once per layer
  reference           sparse_kernels.masks.prune_and_regrow_reference (pure torch, host syncs)
Targets: on a GPU a whole-model update under 2 ms and >= 10x faster than the reference;
on a CPU the compiled op >= 5x faster than the reference.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, List

import torch

import sparse_kernels as sk
from sparse_kernels import LayerUpdate
from sparse_kernels.masks import prune_and_regrow_reference

from .common import (
    add_output_arguments,
    environment,
    parameters_of,
    print_table,
    result_path,
    time_step,
    write_json,
)

GRIDS = [(16, 16), (16, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]


def build_model(layers: int, density: float, block: int, drop_fraction: float, device: torch.device) -> List[LayerUpdate]:
    """The layers' updates: random masks and scores, values and two optimizer states."""
    generator = torch.Generator().manual_seed(0)
    updates = []
    for i in range(layers):
        grid = GRIDS[i % len(GRIDS)]
        nnz = max(1, round(density * grid[0] * grid[1]))
        flat = torch.randperm(grid[0] * grid[1], generator=generator)[:nnz]
        layout = sk.BlockSparseLayout.from_indices(flat // grid[1], flat % grid[1], grid, block).to(device)
        tensors = [torch.randn(nnz, block, block, generator=generator).to(device) for _ in range(3)]
        updates.append(LayerUpdate(
            layout,
            torch.rand(nnz, generator=generator).to(device),
            torch.rand(grid, generator=generator).to(device),
            math.floor(drop_fraction * nnz),
            tensors,
        ))
    return updates


def run(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    env = environment(device)
    env["compiled_extension"] = sk.extension.build_info()
    updates = build_model(args.layers, args.density, args.block, args.drop_fraction, device)
    regrow = not args.exact_k
    methods = {
        "compiled": lambda: sk.prune_and_regrow(updates, regrow),
        "compiled_per_layer": lambda: [sk.prune_and_regrow([u], regrow) for u in updates],
        "reference": lambda: prune_and_regrow_reference(updates, regrow),
    }
    if not sk.extension.has_compiled_kernel("prune_and_regrow", device.type):
        print(f"note: no compiled prune_and_regrow for {device.type}; 'compiled' runs the reference")
    rows = []
    for name, step in methods.items():
        ms, error = time_step(step, device, args.min_seconds)
        rows.append({"method": name, "ms": ms, "error": error})
    reference_ms = next(r["ms"] for r in rows if r["method"] == "reference")
    for r in rows:
        r["speedup_vs_reference"] = reference_ms / r["ms"] if r["ms"] and reference_ms else None
    compiled = rows[0]
    if device.type == "cuda":
        compiled["target"] = "ms < 2 and speedup_vs_reference >= 10"
        compiled["meets_target"] = compiled["ms"] < 2 and compiled["speedup_vs_reference"] >= 10
    else:
        compiled["target"] = "speedup_vs_reference >= 5"
        compiled["meets_target"] = compiled["speedup_vs_reference"] >= 5
    params = parameters_of(args)
    params["blocks_total"] = sum(u.layout.grid[0] * u.layout.grid[1] for u in updates)
    params["nnz_total"] = sum(u.layout.nnz for u in updates)
    return {"suite": "masks", "environment": env, "parameters": params, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--block", type=int, default=32, help="block side of the values and optimizer states")
    parser.add_argument("--drop-fraction", type=float, default=0.3)
    parser.add_argument("--exact-k", action="store_true",
                        help="grow only among the blocks dead before an update (regrow_dropped=False)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timing budget per method")
    parser.add_argument("--quick", action="store_true", help="a 0.3 s timing budget")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.min_seconds = min(args.min_seconds, 0.3)
    return args


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    payload = run(args)
    env, params = payload["environment"], payload["parameters"]
    print(f"mask update benchmark on {env['device_name']}, torch {env['torch']}: {args.layers} layers, "
          f"{params['blocks_total']} blocks, {params['nnz_total']} live, drop fraction {args.drop_fraction}")
    print_table(payload["rows"], ["method", "ms", "speedup_vs_reference", "meets_target", "error"])
    write_json(result_path(args.out, args.out_dir, "masks", env), payload)
    return payload


if __name__ == "__main__":
    main()
