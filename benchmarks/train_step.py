"""One training step of a diffusers UNet2DModel: dense vs block-sparse, in one run.

    python -m benchmarks.train_step --out FILE.json     # GPU: a ~108 M-parameter latent UNet
    python -m benchmarks.train_step --device cpu        # CPU: a small UNet
    python -m benchmarks.train_step --preset demo --sparsities 0.5 0.75   # make demo's model

A step is forward, backward and AdamW on a batch of noisy latents (bf16 autocast on CUDA,
channels-last). Sparse models are sparsified with ERK at each sparsity and block size and
trained with RigL; the mask update (dense-gradient collection on the update step, then
the update itself) is amortised over ``update_interval`` steps. Memory is the bytes of
parameters + gradients + optimizer state (and, on CUDA, the peak allocated memory).
Targets on an H100 (bf16, batch 32 of 4x32x32 latents): at 75% sparsity at least 2x
faster per step than dense, parameter+gradient+optimizer memory at most 0.3 of dense,
and mask updates under 1% of training time at update_interval=100.
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import Dict, List

import torch
import torch.nn.functional as F

import sparse_diffusion as sd
from sparse_diffusion.models.unet import UNET_PRESETS

from .common import add_output_arguments, environment, parameters_of, print_table, result_path, write_json

PRESETS = {
    "gpu": {
        "unet": dict(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
        ),
        "batch": 32, "blocks": [32, 64],
    },
    "cpu": {
        "unet": dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=16, attention_head_dim=32,
        ),
        "batch": 4, "blocks": [32],
    },
    # make demo's model: the class-conditional pixel UNet on 28x28 Fashion-MNIST, batch 32, blocks of 16.
    "demo": {
        "unet": dict(sample_size=28, in_channels=1, out_channels=1, num_class_embeds=10, **UNET_PRESETS["demo"]),
        "batch": 32, "blocks": [16],
    },
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states = sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    return {"params": params, "grads": grads, "optimizer": states}


def measure(config: Dict, sparsity: float, block: int, args: argparse.Namespace, device: torch.device) -> Dict:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**config["unet"]).to(device)
    report = None
    if sparsity > 0:
        report = sd.sparsify(unet, sparsity, block_size=block, distribution="erk")
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01)
    algo = None
    if report is not None:
        algo = sd.RigL(unet, optimizer, total_steps=100 * args.update_interval, update_interval=args.update_interval)
    size, channels = config["unet"]["sample_size"], config["unet"]["in_channels"]
    latents = torch.randn(args.batch or config["batch"], channels, size, size, device=device)
    if device.type == "cuda":
        latents = latents.contiguous(memory_format=torch.channels_last)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), device=device)
    noise = torch.randn_like(latents)
    classes = config["unet"].get("num_class_embeds")
    labels = torch.randint(0, classes, (latents.shape[0],), device=device) if classes else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def train_step():
        with autocast:
            prediction = unet(latents + noise, timesteps, class_labels=labels).sample
            loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    for _ in range(2):  # warm up: kernels autotune, optimizer state appears
        train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = _median_seconds(train_step, device, args.repeats)
    row = {
        "sparsity": sparsity, "block": block if report else None, "step_ms": step_s * 1000,
        "params": sum(p.numel() for p in unet.parameters()),
    }
    memory = _state_bytes(unet, optimizer)
    row["state_mb"] = sum(memory.values()) / 2**20
    if device.type == "cuda":
        row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if algo is not None:
        def update_step():
            algo.set_step(args.update_interval - 1)  # the next step() updates the masks
            train_step()
            algo.step()

        update_s = _median_seconds(update_step, device, max(3, args.repeats // 2))
        extra = max(update_s - step_s, 0.0) / args.update_interval
        row["update_step_ms"] = update_s * 1000
        row["mask_update_fraction"] = extra / (step_s + extra)
        row["amortised_step_ms"] = (step_s + extra) * 1000
        row["global_sparsity"] = report.global_sparsity
    else:
        row["amortised_step_ms"] = row["step_ms"]
    return row


def run(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    config = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    blocks = args.blocks or config["blocks"]
    rows: List[Dict] = [measure(config, 0.0, 0, args, device)]
    for sparsity in args.sparsities:
        for block in blocks:
            rows.append(measure(config, sparsity, block, args, device))
    dense = rows[0]
    for r in rows:
        r["speedup_vs_dense"] = dense["amortised_step_ms"] / r["amortised_step_ms"]
        r["state_vs_dense"] = r["state_mb"] / dense["state_mb"]
        if device.type == "cuda" and r["sparsity"] == 0.75:
            r["meets_target"] = (
                r["speedup_vs_dense"] >= 2 and r["state_vs_dense"] <= 0.3 and r["mask_update_fraction"] < 0.01
            )
    params = parameters_of(args)
    params["unet"] = {k: list(v) if isinstance(v, tuple) else v for k, v in config["unet"].items()}
    params["batch"] = args.batch or config["batch"]
    return {"suite": "train_step", "environment": environment(device), "parameters": params, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, cpu otherwise")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--blocks", type=int, nargs="+", default=None)
    parser.add_argument("--update-interval", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median)")
    add_output_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    payload = run(args)
    env = payload["environment"]
    print(f"training step of a diffusers UNet2DModel on {env['device_name']}, torch {env['torch']}, "
          f"batch {payload['parameters']['batch']}, RigL every {args.update_interval} steps")
    print_table(payload["rows"], [
        "sparsity", "block", "params", "step_ms", "amortised_step_ms", "speedup_vs_dense", "state_mb",
        "state_vs_dense", "mask_update_fraction", "meets_target",
    ])
    write_json(result_path(args.out, args.out_dir, "train_step", env), payload)
    return payload


if __name__ == "__main__":
    main()
