"""Tiny training runs shared by the diffusion tests: a config, its command-line twin, and a
way to call the command line in-process."""
from sparse_diffusion import cli
from sparse_diffusion.train import TrainConfig


def tiny(out, **changes) -> TrainConfig:
    """A pixel UNet run on 64 Fashion-MNIST images of 16x16: a step takes milliseconds."""
    fields = dict(
        out=str(out), model="pixel", preset="tiny", dataset="fashion-mnist", image_size=16, steps=4,
        batch_size=4, update_interval=2, block_size=16, sample_steps=2, limit=64, checkpoint_every=2,
    )
    fields.update(changes)
    return TrainConfig(**fields)


# The same run's flags (with --steps 2) for `sparse-diffusion train`.
TINY_ARGS = ("--preset", "tiny", "--image-size", "16", "--steps", "2", "--batch-size", "4", "--limit", "64",
             "--sample-steps", "2", "--block-size", "16", "--update-interval", "2")


def run_cli(capsys, *argv):
    """``sparse-diffusion *argv`` in this process: ``(exit code, stdout, stderr)``."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
