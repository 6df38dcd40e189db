"""``sparse-diffusion``: train, sample and evaluate sparse diffusion models.

    sparse-diffusion train --model pixel --dataset fashion-mnist --method rigl --sparsity 0.5 --out runs/rigl
    sparse-diffusion train-autoencoder --dataset images:PATH --out runs/ae
    sparse-diffusion train --model ldm --autoencoder runs/ae --dataset images:PATH --out runs/ldm
    sparse-diffusion sample --run runs/rigl --num 64 --out grid.png
    sparse-diffusion evaluate --run runs/rigl --num-samples 1000
    sparse-diffusion export --run runs/rigl --out exported/rigl    # a folder plain diffusers loads
    sparse-diffusion demo                     # dense vs RigL-50% on Fashion-MNIST, on a CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from .allocator import keep_freed_memory
from .io import DiskFullError, one_line
from .config import TrainConfig, flag, setting_type
from .train import TrainingStopped

# Errors a user can cause: reported in one line, without a traceback (CheckpointError is a
# ValueError).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, DiskFullError)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (``x_y`` as ``--x-y``, :func:`_flag_options`);
    ``--out`` comes last and is required, and ``--resume`` is the command's own."""
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for name, field in fields.items():
        if name != "out":
            parser.add_argument(flag(name), **_flag_options(field))
    parser.add_argument("--out", required=True, help=fields["out"].metadata["help"])
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")


def _flag_options(field: dataclasses.Field) -> dict:
    """``add_argument`` options of a TrainConfig field: its default, help and choices, its type
    from the annotation; a boolean is ``--x`` / ``--no-x``."""
    options = {"default": field.default, "help": field.metadata["help"]}
    kind = setting_type(field)
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif "parse" in field.metadata:
        options["type"] = _argument_type(kind)
    elif kind is not str:
        options["type"] = kind
    if "choices" in field.metadata:
        options["choices"] = field.metadata["choices"]
    return options


def _argument_type(parse):
    """``parse`` as an argparse type: its ``ValueError`` becomes argparse's one-line error."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-diffusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_arguments(commands.add_parser("train", help="train a (sparse) diffusion model"))

    autoencoder = commands.add_parser("train-autoencoder", help="train an AutoencoderKL for latent diffusion")
    autoencoder.add_argument("--dataset", default="fashion-mnist")
    autoencoder.add_argument("--out", required=True, help="the diffusers folder to write")
    autoencoder.add_argument("--preset", choices=["tiny", "demo", "paper"], default="demo")
    autoencoder.add_argument("--image-size", type=int, default=None)
    autoencoder.add_argument("--steps", type=int, default=2000)
    autoencoder.add_argument("--batch-size", type=int, default=64)
    autoencoder.add_argument("--lr", type=float, default=1e-3)
    autoencoder.add_argument("--seed", type=int, default=0)
    autoencoder.add_argument("--data-dir", default=None)
    autoencoder.add_argument("--limit", type=int, default=None)
    autoencoder.add_argument("--device", default="auto")

    sample = commands.add_parser("sample", help="draw a grid of samples from a run (EMA weights)")
    sample.add_argument("--run", required=True)
    sample.add_argument("--num", type=int, default=64)
    sample.add_argument("--out", required=True, help="PNG file")
    sample.add_argument("--sampler", choices=["ddim", "ddpm"], default=None)
    sample.add_argument("--steps", type=int, default=None)
    sample.add_argument("--seed", type=int, default=1234)
    sample.add_argument("--device", default="auto")

    evaluate = commands.add_parser("evaluate", help="FID / KID of a run's samples; updates its metrics.json")
    evaluate.add_argument("--run", required=True)
    evaluate.add_argument("--num-samples", type=int, default=1000,
                          help="samples to generate (FID from fewer than 2048 carries a caveat)")
    evaluate.add_argument("--out", default=None,
                          help="JSON file for the results (default: the run's metrics.json and summary.md)")
    evaluate.add_argument("--device", default="auto")

    export = commands.add_parser("export", help="write a run's EMA model as a folder plain diffusers loads")
    export.add_argument("--run", required=True)
    export.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    export.add_argument("--sparse", action="store_true",
                        help="keep the block-sparse form (load it with sparse_diffusion.load_pretrained)")
    export.add_argument("--device", default="cpu")

    experiment = commands.add_parser(
        "experiment", help="run a grid of trainings from a YAML file (resumable), then write its report")
    experiment.add_argument("grid", help="the grid file, e.g. experiments/cpu-small.yaml")
    experiment.add_argument("--out", default=None, help="output folder (default: the grid's 'out')")
    experiment.add_argument("--report-only", action="store_true", help="only rebuild the report from the run folders")
    experiment.add_argument("--dry-run", action="store_true", help="list the runs and which are done; train nothing")
    experiment.add_argument("--nproc-per-node", type=int, default=1,
                            help="train each run under torchrun with N processes (data parallel)")
    experiment.add_argument("--print-commands", action="store_true",
                            help="print one command per autoencoder and run still to do (for a cluster scheduler); "
                                 "train nothing")
    demo = commands.add_parser("demo", help="dense vs RigL at 50%% on Fashion-MNIST, trained and compared here")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="training steps per model")
    demo.add_argument("--eval-samples", type=int, default=None, help="samples per model for FID")
    demo.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline")
    demo.add_argument("--data-dir", default=None)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .metrics.inception import MetricUnavailableError

    args = build_parser().parse_args(argv)
    try:
        keep_freed_memory()
        return _run(args)
    except TrainingStopped as stop:
        print(f"sparse-diffusion {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except USER_ERRORS + (MetricUnavailableError,) as error:
        print(f"sparse-diffusion {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """One line; an OSError as ``file: reason`` rather than its ``[Errno N]`` form."""
    if isinstance(error, OSError) and error.strerror:
        return one_line(f"{error.filename}: {error.strerror}" if error.filename else error.strerror)
    return one_line(error)


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from .train import train

        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
        results = train(config, resume=args.resume)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
            print(json.dumps(results, indent=2))
    elif args.command == "train-autoencoder":
        from .autoencoder_training import train_autoencoder

        path = train_autoencoder(**{k: v for k, v in vars(args).items() if k != "command"})
        print(f"autoencoder written to {path}; use it with --model ldm --autoencoder {path}")
    elif args.command == "sample":
        from .io import save_image_grid
        from .metrics.raster import rasterize_strokes
        from .run import load_run
        from .sampling import generate

        if args.num < 1:
            raise ValueError(f"--num must be at least 1, got {args.num}")
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        out = Path(args.out)
        _check_can_write(out)
        loaded = load_run(args.run, args.device)
        if args.sampler:
            loaded.run.config.sampler = args.sampler
        if args.steps:
            loaded.run.config.sample_steps = args.steps
        samples = generate(loaded.state, args.num, seed=args.seed)
        if isinstance(samples, tuple):
            samples = rasterize_strokes(samples[0].cpu(), samples[1].cpu(), size=64)
        save_image_grid(samples.cpu(), out)
        print(f"wrote {out}")
    elif args.command == "evaluate":
        from .run import load_run
        from .sampling import evaluate
        from .summary import write_summary

        run = Path(args.run)
        path = Path(args.out) if args.out else run / "metrics.json"
        _check_can_write(path)
        loaded = load_run(args.run, args.device)
        metrics = evaluate(loaded.state, args.num_samples)
        previous = run / "metrics.json"
        results = json.loads(previous.read_text()) if previous.is_file() else {}
        results["metrics"] = metrics
        path.write_text(json.dumps(results, indent=2) + "\n")
        if not args.out:
            write_summary(loaded.run, loaded.state, results)
        print(json.dumps(metrics, indent=2))
        if "caveat" in metrics:
            print(f"caveat: FID {metrics['caveat']}", file=sys.stderr)
        print(f"wrote {path}")
    elif args.command == "export":
        from .export import export_run
        from .run import load_run

        folder = export_run(load_run(args.run, args.device), Path(args.out), sparse=args.sparse)
        print(f"wrote {folder}")
    elif args.command == "experiment":
        from .study.runner import run_grid

        run_grid(args.grid, out=args.out, report_only=args.report_only, dry_run=args.dry_run,
                 nproc_per_node=args.nproc_per_node, print_commands=args.print_commands)
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, steps=args.steps, eval_samples=args.eval_samples, quick=args.quick, data_dir=args.data_dir)
    return 0


def _check_can_write(path: Path) -> None:
    """``PermissionError`` naming ``path`` unless its folder exists (or can be made) and takes a
    new file: checked before any work is done."""
    from .io import check_writable

    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file name")
    check_writable(path.parent if str(path.parent) else Path("."))


if __name__ == "__main__":
    sys.exit(main())
