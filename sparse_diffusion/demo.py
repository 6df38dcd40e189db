"""``sparse-diffusion demo`` (``make demo``): dense vs RigL-DM at 50% sparsity, side by side.

Both train the same small class-conditional pixel-space UNet on Fashion-MNIST (28x28,
on a 2-core CPU in a few minutes each), sample a grid, and are scored with FID (the
standard Inception network) and FD in a small network trained here on Fashion-MNIST.
Runs already finished in ``out`` are reused, unfinished ones resumed.

Larger settings for a GPU, e.g.:
    sparse-diffusion train --model pixel --preset small --image-size 32 --dataset fashion-mnist \\
        --method rigl --sparsity 0.75 --block-size 32 --steps 20000 --batch-size 256 \\
        --precision bf16 --eval-samples 10000 --out runs/fmnist-rigl75
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from .config import TrainConfig
from .run import CHECKPOINT
from .sampling import evaluate
from .train import Trainer

DEMO_STEPS = 600
DEMO_EVAL_SAMPLES = 200


def demo_configs(out: str, steps: int, data_dir: Optional[str]) -> Dict[str, TrainConfig]:
    base = dict(
        model="pixel", dataset="fashion-mnist", preset="demo", steps=steps, batch_size=32, lr=2e-3,
        ema_decay=0.995, prediction="v", sample_steps=25, checkpoint_every=max(steps // 3, 1), data_dir=data_dir,
        seed=0,
    )
    interval = max(1, min(100, steps // 4))
    return {
        "dense": TrainConfig(out=str(Path(out) / "dense"), method="dense", **base),
        "rigl-50%": TrainConfig(
            out=str(Path(out) / "rigl-50"), method="rigl", sparsity=0.5, block_size=16, distribution="erk",
            drop_fraction=0.3, update_interval=interval, **base,
        ),
    }


def run_demo(out: str = "runs/demo", steps: Optional[int] = None, eval_samples: Optional[int] = None,
             quick: bool = False, data_dir: Optional[str] = None) -> Dict[str, Dict]:
    """Trains (or reuses) both runs, scores them, prints and writes the comparison."""
    steps = steps or (8 if quick else DEMO_STEPS)
    eval_samples = eval_samples or (16 if quick else DEMO_EVAL_SAMPLES)
    results = {}
    for name, config in demo_configs(out, steps, data_dir).items():
        resume = (Path(config.out) / CHECKPOINT).exists()
        trainer = Trainer(config, resume=resume)
        print(f"\n== {name}: {config.steps} steps of batch {config.batch_size} "
              f"({'resuming at step ' + str(trainer.state.step) if resume else 'from scratch'})")
        metrics_path = trainer.run.metrics_path
        if trainer.state.step < config.steps or not metrics_path.exists():
            trainer.train()
        result = json.loads(metrics_path.read_text())
        if result.get("metrics", {}).get("num_samples") != eval_samples:
            print(f"   scoring {eval_samples} samples (FID and local FD)...")
            result["metrics"] = evaluate(trainer.state, eval_samples)
            metrics_path.write_text(json.dumps(result, indent=2) + "\n")
        results[name] = result
    table = comparison_table(results, eval_samples)
    print("\n" + table)
    grids = {name: sorted((Path(c.out) / "samples").glob("step-*.png"))[-1] for name, c in demo_configs(out, steps, data_dir).items()}
    summary = Path(out) / "summary.md"
    summary.write_text(
        "# Demo: dense vs RigL-DM at 50% sparsity on Fashion-MNIST\n\n" + table + "\n\n"
        + "\n".join(f"## {name}\n\n![{name}]({path.relative_to(out)})\n" for name, path in grids.items())
    )
    print(f"\nsample grids: {', '.join(str(p) for p in grids.values())}; summary: {summary}")
    return results


def comparison_table(results: Dict[str, Dict], eval_samples: int) -> str:
    """A Markdown table: quality, size, cost and time of each run."""
    rows = [
        "| run | sparsity | parameters | GFLOPs / sample | s / step | wall-clock | speed vs dense | "
        f"FID@{eval_samples} | FD (local) | KID |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dense = results.get("dense", {}).get("wall_clock_s")
    for name, r in results.items():
        m = r.get("metrics", {})
        speed = f"{dense / r['wall_clock_s']:.2f}x" if dense and r["wall_clock_s"] else "-"
        rows.append(
            f"| {name} | {r['sparsity']:.2f} | {r['parameters']:,} | {r['flops_per_sample'] / 1e9:.3f} | "
            f"{r['seconds_per_step']:.3f} | {r['wall_clock_s'] / 60:.1f} min | {speed} | "
            f"{m.get('fid', float('nan')):.1f} | {m.get('fd_local', float('nan')):.2f} | {m.get('kid_mean', float('nan')):.4f} |"
        )
    return "\n".join(rows)
