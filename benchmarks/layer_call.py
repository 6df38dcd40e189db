"""What one call of a small block-sparse layer costs, forward and backward, against torch's layer.

    python -m benchmarks.layer_call --out-dir benchmarks/results

Small layers are where per-call overhead shows (a GRU step, an attention projection, a
7x7 convolution): ``BlockSparseLinear(256, 256)`` on ``[64, 256]`` and a 3x3
``BlockSparseConv2d(64, 64)`` on ``[8, 64, 16, 16]`` (NCHW and channels-last), density 0.5,
against ``nn.Linear`` / ``nn.Conv2d`` on the same input. The cases are timed in turns, a
round at a time, and the medians compared. Target: ``sparse_vs_dense <= 1.5`` for each.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List

import torch

import sparse_kernels as sk

from .common import (add_output_arguments, environment, parameters_of, print_table, result_path, time_in_turns,
                     write_json)


def _step(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    parameters = [p for p in module.parameters()]

    def run():
        y = module(x)
        torch.autograd.grad(y, [x, *parameters], torch.ones_like(y))

    return run


def cases(density: float) -> Dict[str, Dict[str, Callable[[], None]]]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 256)
    x = torch.randn(64, 256, requires_grad=True)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    image = torch.randn(8, 64, 16, 16, requires_grad=True)
    conv_cl = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
    image_cl = image.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    sparse_conv_cl = sk.BlockSparseConv2d.from_dense(conv_cl, 16, density).to(memory_format=torch.channels_last)
    return {
        "linear 256x256 on [64, 256]": {
            "dense": _step(linear, x), "sparse": _step(sk.BlockSparseLinear.from_dense(linear, 16, density), x)},
        "conv 3x3 64->64 on [8, 64, 16, 16]": {
            "dense": _step(conv, image), "sparse": _step(sk.BlockSparseConv2d.from_dense(conv, 16, density), image)},
        "conv 3x3 64->64 on [8, 64, 16, 16], channels-last": {
            "dense": _step(conv_cl, image_cl), "sparse": _step(sparse_conv_cl, image_cl)},
    }


def run(args: argparse.Namespace) -> Dict[str, object]:
    torch.set_num_threads(args.threads)
    rows: List[Dict[str, object]] = []
    for name, pair in cases(args.density).items():
        times = {kind: [t * 1e6 for t in values]
                 for kind, values in time_in_turns(pair, args.rounds, args.calls, warmup=20).items()}
        dense, sparse = statistics.median(times["dense"]), statistics.median(times["sparse"])
        rows.append({"case": name, "density": args.density, "dense_us": dense, "sparse_us": sparse,
                     "sparse_vs_dense": sparse / dense, "meets_target": sparse / dense <= 1.5,
                     "dense_range_us": [min(times["dense"]), max(times["dense"])],
                     "sparse_range_us": [min(times["sparse"]), max(times["sparse"])]})
    params = parameters_of(args)
    return {"suite": "layer_call", "environment": environment(torch.device("cpu")), "parameters": params, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=50, help="calls per timing")
    add_output_arguments(parser, threads=True)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    payload = run(args)
    env = payload["environment"]
    print(f"forward+backward of one layer call on {env['cpu']} ({env['torch_threads']} threads), torch {env['torch']}")
    print_table(payload["rows"], ["case", "density", "dense_us", "sparse_us", "sparse_vs_dense", "meets_target"])
    write_json(result_path(args.out, args.out_dir, "layer_call", env), payload)
    return payload


if __name__ == "__main__":
    main()
