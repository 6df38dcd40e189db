"""GroupNorm + SiLU, forward and backward: the fused op against torch's GroupNorm then SiLU.

    python -m benchmarks.group_norm_silu --out-dir benchmarks/results

The shapes are those of the demo UNet (channels 32 / 64 / 64 at 28 / 14 / 7 pixels, 8 groups)
and the small one (64 / 128 / 256, 32 groups; its up blocks' norms see the concatenated
channels too), batch 32, channels-last as the trainer runs them. Per shape, the two are timed
in turns, a round at a time; the medians and ranges over rounds are compared.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import sparse_kernels as sk

from .common import (add_output_arguments, environment, parameters_of, print_table, result_path, time_in_turns,
                     write_json)

# (model, channels, size, groups)
SHAPES = [("demo", 32, 28, 8), ("demo", 64, 14, 8), ("demo", 64, 7, 8), ("demo", 128, 14, 8),
          ("small", 64, 28, 32), ("small", 128, 14, 32), ("small", 256, 7, 32), ("small", 384, 14, 32)]


def _step(fn: Callable, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> Callable[[], None]:
    def run():
        y = fn(x, weight, bias, groups)
        torch.autograd.grad(y, (x, weight, bias), torch.ones_like(y))

    return run


def _torch(x, weight, bias, groups):
    return F.silu(F.group_norm(x, groups, weight, bias, 1e-5))


def run(args: argparse.Namespace) -> Dict[str, object]:
    torch.set_num_threads(args.threads)
    rows: List[Dict[str, object]] = []
    for model, channels, size, groups in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(args.batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
        weight, bias = torch.randn(channels, requires_grad=True), torch.randn(channels, requires_grad=True)
        steps = {"torch": _step(_torch, x, weight, bias, groups), "fused": _step(sk.group_norm_silu, x, weight, bias, groups)}
        times = {kind: [t * 1e3 for t in values]
                 for kind, values in time_in_turns(steps, args.rounds, args.calls, warmup=3).items()}
        fused, plain = statistics.median(times["fused"]), statistics.median(times["torch"])
        rows.append({"model": model, "shape": f"[{args.batch}, {channels}, {size}, {size}]", "groups": groups,
                     "torch_ms": plain, "fused_ms": fused, "fused_vs_torch": fused / plain,
                     "torch_range_ms": [min(times["torch"]), max(times["torch"])],
                     "fused_range_ms": [min(times["fused"]), max(times["fused"])]})
    return {"suite": "group_norm_silu", "environment": environment(torch.device("cpu")),
            "parameters": parameters_of(args), "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="forward + backward calls per timing")
    add_output_arguments(parser, threads=True)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    payload = run(args)
    env = payload["environment"]
    print(f"GroupNorm + SiLU, forward + backward, on {env['cpu']} ({env['torch_threads']} threads, {env.get('cpu_isa')}), "
          f"torch {env['torch']}")
    print_table(payload["rows"], ["model", "shape", "groups", "torch_ms", "fused_ms", "fused_vs_torch"])
    write_json(result_path(args.out, args.out_dir, "group_norm_silu", env), payload)
    return payload


if __name__ == "__main__":
    main()
