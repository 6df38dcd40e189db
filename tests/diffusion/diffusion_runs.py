"""Tiny training runs shared by the diffusion tests: a config, its command-line twin, a way to
call the command line in-process and check its one-line errors, a finished run, a crash
between checkpoints, and the comparison of two runs."""
import contextlib
import re

import pytest
import torch

import sparse_diffusion.train as train_module
from sparse_diffusion import cli
from sparse_diffusion.train import TrainConfig, Trainer


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


def message_lines(err):
    """The lines of ``err`` besides tqdm's progress bar (``run:  33%|...``)."""
    return [line for line in err.splitlines() if line.strip() and not re.match(r"run:\s+\d+%\|", line)]


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = message_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])


@pytest.fixture
def trained_run(tmp_path):
    """A finished 2-step RigL run; returns its folder."""
    run = tmp_path / "run"
    Trainer(tiny(run, method="rigl", steps=2)).train()
    return run


@contextlib.contextmanager
def crashing_at_draw(call: int, error: BaseException):
    """Within it, the training loop's ``call``-th batch draw raises ``error``: a crash between
    checkpoints, after which only the last checkpoint is left."""
    draw_batch, calls = train_module.draw_batch, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return draw_batch(*args, **kwargs)

    train_module.draw_batch = crashing
    try:
        yield
    finally:
        train_module.draw_batch = draw_batch


def assert_same_training_state(full, resumed) -> None:
    """Two TrainStates are bit-identical: losses, model tensors, EMA shadows, optimizer state
    and mask-update history."""
    assert resumed.losses == full.losses
    for (name, a), b in zip(full.denoiser.state_dict().items(), resumed.denoiser.state_dict().values()):
        assert torch.equal(a, b), name
    for i, (a, b) in enumerate(zip(full.ema.shadow_params, resumed.ema.shadow_params)):
        assert torch.equal(a, b), f"EMA shadow {i}"
    for p, q in zip(full.optimizer.state.values(), resumed.optimizer.state.values()):
        for key in p:
            assert torch.equal(torch.as_tensor(p[key]), torch.as_tensor(q[key])), key
    assert full.algo.history == resumed.algo.history
