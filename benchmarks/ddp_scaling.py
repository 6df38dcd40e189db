"""Data parallel on one machine: N processes x T threads against 1 process x N*T threads.

    python -m benchmarks.ddp_scaling --out-dir benchmarks/results       # 2 x 1 against 1 x 2
    python -m benchmarks.ddp_scaling --rounds 1 --steps 5                # a quick look

Each measurement is the real training loop (:class:`sparse_diffusion.train.Trainer`: data,
forward, backward, fused AdamW, mask updates, EMA) of one model, dense and sparse, at the same
global batch: one process with ``--threads`` threads, or ``--nproc`` processes under
``torchrun`` with ``threads / nproc`` threads each (gloo, DDP; each rank trains on its share of
every batch). A measurement is a fresh launch: ``--warmup`` steps, then ``--steps`` timed
steps between barriers. The launches run in rounds, in a rotating order, so that whatever else
the machine does falls on all of them alike; the table shows the median and range over rounds
of seconds per step, and samples per second (global batch / seconds per step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from .common import add_output_arguments, environment, parameters_of, print_table, result_path, write_json

# make demo's model: the class-conditional pixel UNet on 28x28 Fashion-MNIST.
MODEL = dict(model="pixel", dataset="fashion-mnist", preset="demo", lr=2e-3, ema_decay=0.995, prediction="v")


def worker(args: argparse.Namespace) -> None:
    """One measurement (every rank runs this under torchrun); rank 0 writes ``args.result``."""
    from sparse_diffusion.distributed import from_environment
    from sparse_diffusion.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads_per_process)
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(out=f"{folder}/run", method=args.method, sparsity=args.sparsity, steps=100_000,
                             batch_size=args.batch_size, block_size=args.block_size, checkpoint_every=0,
                             update_interval=args.update_interval, seed=0, device="cpu", **MODEL)
        dist = from_environment("cpu", None, config.batch_size)
        try:
            trainer = Trainer(config, dist=dist)
            for _ in range(args.warmup):
                trainer.train_step()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            dist.barrier()
            seconds = (time.perf_counter() - start) / args.steps
        finally:
            dist.close()
    if dist.is_main:
        Path(args.result).write_text(json.dumps({"seconds_per_step": seconds, "world_size": dist.world_size}))


def launch(args: argparse.Namespace, nproc: int, method: str, sparsity: float, result: Path) -> float:
    """Runs one measurement in fresh processes; returns its seconds per step."""
    threads = args.threads // nproc
    options = ["--worker", "--result", str(result), "--method", method, "--sparsity", str(sparsity),
               "--threads-per-process", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
               "--update-interval", str(args.update_interval)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "benchmarks.ddp_scaling", *options]
    else:
        command = [sys.executable, "-m", "benchmarks.ddp_scaling", *options]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())["seconds_per_step"]


def run(args: argparse.Namespace) -> Dict[str, object]:
    variants = [(nproc, method, sparsity) for method, sparsity in (("dense", 0.0), (args.method, args.sparsity))
                for nproc in (1, args.nproc)]
    times: Dict[tuple, List[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            order = variants[round_index % len(variants):] + variants[:round_index % len(variants)]
            for nproc, method, sparsity in order:
                seconds = launch(args, nproc, method, sparsity, Path(folder) / "result.json")
                times[(nproc, method, sparsity)].append(seconds)
                print(f"round {round_index + 1}: {nproc} x {args.threads // nproc} threads, {method} {sparsity}: "
                      f"{seconds * 1000:.1f} ms/step", flush=True)
    rows = []
    for (nproc, method, sparsity), values in times.items():
        median = statistics.median(values)
        single = statistics.median(times[(1, method, sparsity)])
        rows.append({
            "processes": nproc, "threads_per_process": args.threads // nproc, "method": method,
            "sparsity": sparsity, "ms_per_step": median * 1000, "min_ms": min(values) * 1000,
            "max_ms": max(values) * 1000, "samples_per_s": args.batch_size / median,
            "speedup_vs_1_process": single / median, "all_ms": [v * 1000 for v in values],
        })
    return {"suite": "ddp_scaling", "environment": environment(torch.device("cpu")), "parameters": parameters_of(args),
            "model": MODEL, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel launch")
    parser.add_argument("--threads", type=int, default=2, help="threads in all, per launch")
    parser.add_argument("--method", default="rigl", help="the sparse method, against dense")
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--update-interval", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    add_output_arguments(parser)
    worker_options = parser.add_argument_group("one measurement (used by the runner itself)")
    worker_options.add_argument("--worker", action="store_true")
    worker_options.add_argument("--result")
    worker_options.add_argument("--threads-per-process", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    payload = run(args)
    env = payload["environment"]
    print(f"\ndata parallel on {env['cpu']}, torch {env['torch']}, demo UNet, global batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print_table(payload["rows"], ["processes", "threads_per_process", "method", "sparsity", "ms_per_step", "min_ms",
                                  "max_ms", "samples_per_s", "speedup_vs_1_process"])
    env["device_name"] = f"{env['cpu']} ({args.threads} threads)"
    write_json(result_path(args.out, args.out_dir, "ddp_scaling", env), payload)
    return payload


if __name__ == "__main__":
    main()
