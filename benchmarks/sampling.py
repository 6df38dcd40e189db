"""Sampling, dense against sparse: what a sparse model saves after training.

    python -m benchmarks.sampling --out-dir benchmarks/results
    python -m benchmarks.sampling --models demo --batch-sizes 1 --rounds 3

Two paths per model and sparsity (RigL's ERK masks, blocks of 16; dense is sparsity 0):
``sparse-diffusion sample``'s own (``sparse_diffusion.sampling.generate`` on the run's state:
its EMA weights, its sampler) and that of a ``--sparse`` export opened with
``sd.load_pretrained`` and run by a plain DDIM loop (diffusers' ``DDIMScheduler``), which is what
a user of the exported model runs. 25 DDIM steps, batch 1 and 64; the runs take turns, a round
at a time, and each row is the median over rounds (the range is kept). The weights are the
initial ones: sampling time does not depend on their values.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import torch

from .common import add_output_arguments, environment, parameters_of, print_table, result_path, write_json
from .train_loop import MODELS


def _states(model: str, args: argparse.Namespace, folder: str) -> Dict[float, object]:
    from sparse_diffusion.state import TrainState
    from sparse_diffusion.train import TrainConfig

    states = {}
    for sparsity in [0.0, *args.sparsities]:
        config = TrainConfig(**MODELS[model], out=f"{folder}/{model}-{sparsity}", method="rigl" if sparsity else "dense",
                             sparsity=sparsity or 0.5, block_size=args.block_size, sampler="ddim",
                             sample_steps=args.steps, seed=0)
        states[sparsity] = TrainState(config, torch.device("cpu"))
    return states


def _cli_path(state, batch: int) -> Callable[[], object]:
    from sparse_diffusion.sampling import generate

    return lambda: generate(state, batch, seed=0)


def _exported(state, folder: str):
    """The model that ``sd.save_pretrained`` wrote and ``sd.load_pretrained`` read, and its DDIM scheduler."""
    from diffusers import DDIMScheduler

    import sparse_diffusion as sd

    sd.save_pretrained(state.denoiser, folder)
    return sd.load_pretrained(folder), DDIMScheduler.from_config(state.task.scheduler.config)  # the training schedule


def _export_path(unet, scheduler, batch: int, steps: int) -> Callable[[], object]:
    """A plain DDIM loop over an exported model."""
    size, channels = unet.config.sample_size, unet.config.in_channels
    labels = torch.arange(batch) % unet.config.num_class_embeds if unet.config.num_class_embeds else None

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(steps)
        x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
        return x

    return run


def measure_model(model: str, args: argparse.Namespace, folder: str) -> List[Dict[str, object]]:
    torch.manual_seed(0)
    states = _states(model, args, folder)
    exported = {sparsity: _exported(state, f"{folder}/export-{model}-{sparsity}") for sparsity, state in states.items()}
    cases: Dict[tuple, Callable[[], object]] = {}
    for batch in args.batch_sizes:
        for sparsity, state in states.items():
            cases[("sample", batch, sparsity)] = _cli_path(state, batch)
            cases[("export", batch, sparsity)] = _export_path(*exported[sparsity], batch, args.steps)
    for case in cases.values():  # warm up
        case()
    times: Dict[tuple, List[float]] = {key: [] for key in cases}
    keys = list(cases)
    for round_index in range(args.rounds):
        for key in keys[round_index % len(keys):] + keys[:round_index % len(keys)]:
            start = time.perf_counter()
            cases[key]()
            times[key].append((time.perf_counter() - start) * 1000)
        print(f"  {model} round {round_index + 1}/{args.rounds}", flush=True)
    rows = []
    for (path, batch, sparsity), values in times.items():
        dense = statistics.median(times[(path, batch, 0.0)])
        ms = statistics.median(values)
        rows.append({"model": model, "path": path, "batch": batch, "sparsity": sparsity,
                     "actual_sparsity": states[sparsity].report.global_sparsity if states[sparsity].report else 0.0,
                     "ms": ms, "ms_min": min(values), "ms_max": max(values), "ms_per_image": ms / batch,
                     "speedup_vs_dense": dense / ms})
    return rows


def run(args: argparse.Namespace) -> Dict[str, object]:
    from sparse_diffusion.allocator import keep_freed_memory

    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    env["malloc_thresholds_fixed"] = keep_freed_memory()  # as sparse-diffusion sample runs
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            rows += measure_model(model, args, folder)
    params = parameters_of(args)
    params["models"] = {name: MODELS[name] for name in args.models}
    return {"suite": "sampling", "environment": env, "parameters": params, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["demo", "small"], default=["demo"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--rounds", type=int, default=5)
    add_output_arguments(parser, threads=True)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    payload = run(args)
    env = payload["environment"]
    print(f"\nsampling ({args.steps} DDIM steps) on {env['cpu']} ({env['torch_threads']} threads), torch {env['torch']}")
    print_table(payload["rows"], ["model", "path", "batch", "sparsity", "ms", "ms_min", "ms_max", "ms_per_image",
                                  "speedup_vs_dense"])
    write_json(result_path(args.out, args.out_dir, "sampling", env), payload)
    return payload


if __name__ == "__main__":
    main()
