"""Runs that lose nothing: exact resume with the EMA, faults (damaged checkpoints, signals,
non-finite losses, killed saves) and one-line errors for bad input."""
import json
import os
import signal
import warnings

import pytest
import torch
from diffusion_runs import (  # noqa: F401
    TINY_ARGS, assert_one_line_error, assert_same_training_state, crashing_at_draw, message_lines, run_cli, tiny,
    trained_run,
)

import sparse_diffusion as sd
import sparse_diffusion.train as train_module
from sparse_diffusion.checkpoint import CheckpointError, load_state, save_state
from sparse_diffusion.run import load_run
from sparse_diffusion.train import CHECKPOINT, Trainer


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DIFFUSION_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- exact resume, EMA included
def test_resume_after_a_kill_is_bit_exact_ema_and_regrown_blocks_included(tmp_path):
    settings = dict(method="rigl", steps=8, checkpoint_every=3, block_size=8, drop_fraction=0.5, update_interval=2)
    full = Trainer(tiny(tmp_path / "full", **settings))
    full.train()
    moved_after_resume = [r for r in full.state.algo.history if r["step"] > 3 and sum(r["moved"].values())]
    assert moved_after_resume  # the test must regrow blocks after the resume point

    config = tiny(tmp_path / "killed", **settings)
    killed = Trainer(config)
    with crashing_at_draw(5, SystemExit("killed")), pytest.raises(SystemExit):
        killed.train()  # nothing after the step-3 checkpoint is saved
    resumed = Trainer(config, resume=True)
    assert resumed.state.step == 3
    resumed.train()
    assert_same_training_state(full.state, resumed.state)


def test_an_ema_loaded_after_the_algorithm_still_gets_regrown_blocks_zeroed():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    sd.sparsify(model, 0.5, block_size=16, keep_dense=[])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMAModel(model.parameters(), decay=0.9)
    algo = sd.MagRan(model, optimizer, total_steps=10, update_interval=1, drop_fraction=0.5, ema=ema)
    ema.load_state_dict(ema.state_dict())  # new shadow tensors (diffusers deep-copies)
    layer = model[1]
    before = {(int(r), int(c)) for r, c in zip(layer.row_idx, layer.col_idx)}
    algo.step()
    shadow = dict(zip((id(p) for p in model.parameters()), ema.shadow_params))[id(layer.values)]
    regrown = [s for s, (r, c) in enumerate(zip(layer.row_idx, layer.col_idx)) if (int(r), int(c)) not in before]
    assert regrown
    for slot in regrown:
        assert torch.count_nonzero(shadow[slot]) == 0


# --------------------------------------------------------------------------- faults
@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "json"])
def test_a_damaged_checkpoint_is_a_one_line_error(trained_run, tmp_path, capsys, damage):
    path = trained_run / CHECKPOINT
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "random bytes": os.urandom(4096), "empty": b"",
                      "json": b'{"step": 2}'}[damage])
    for argv in (("sample", "--run", trained_run, "--num", 2, "--out", tmp_path / "grid.png"),
                 ("train", *TINY_ARGS, "--method", "rigl", "--steps", 4, "--resume", "--out", trained_run)):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, path)


def test_non_finite_weights_in_a_checkpoint_are_refused(trained_run, tmp_path, capsys):
    path = trained_run / CHECKPOINT
    state = load_state(path)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name].view(-1)[0] = float("nan")
    save_state(state, path)
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--method", "rigl", "--steps", 4, "--resume",
                           "--out", trained_run)
    assert_one_line_error(code, err, path, "non-finite", name)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_run(str(trained_run))


def test_stale_temporary_files_of_killed_saves_are_removed(trained_run):
    stale = trained_run / f".{CHECKPOINT}.a1b2c3.tmp"
    stale.write_bytes(b"half a checkpoint")
    half_folder = trained_run / ".autoencoder.x9y8.tmp"  # what a killed atomic_write_folder leaves
    half_folder.mkdir()
    (half_folder / "config.json").write_text("{")
    Trainer(tiny(trained_run, method="rigl", steps=4), resume=True)
    assert not stale.exists() and not half_folder.exists()
    assert (trained_run / CHECKPOINT).is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_stops_with_one_line(tmp_path, capsys, monkeypatch, signum):
    draw_batch, calls = train_module.draw_batch, []

    def signal_during_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return draw_batch(*args, **kwargs)

    monkeypatch.setattr(train_module, "draw_batch", signal_during_step_two)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--steps", 6, "--checkpoint-every", 100, "--method", "rigl",
                           "--out", run)
    assert code == 128 + signum
    lines = message_lines(err)
    assert len(lines) == 1 and f"stopped by {signal.Signals(signum).name} after step 2" in lines[0], err
    assert load_state(run / CHECKPOINT)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    monkeypatch.setattr(train_module, "draw_batch", draw_batch)
    code, out, err = run_cli(capsys, "train", *TINY_ARGS, "--steps", 6, "--checkpoint-every", 100, "--method", "rigl",
                             "--resume", "--out", run)
    assert code == 0 and json.loads(out)["steps"] == 6, err


def test_a_loss_that_stays_non_finite_stops_the_run(tmp_path, capsys, monkeypatch):
    from sparse_diffusion.diffusion import ImageDiffusion

    loss = ImageDiffusion.loss
    monkeypatch.setattr(ImageDiffusion, "loss", lambda self, *a, **k: loss(self, *a, **k) * float("nan"))
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--steps", 50, "--method", "rigl", "--out", run)
    assert code == 1
    lines = message_lines(err)
    assert len(lines) == 1 and "not finite for 10 steps in a row" in lines[0], err
    assert not (run / "metrics.json").exists()


def test_a_non_finite_step_leaves_the_weights_and_the_ema_unchanged(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path / "run", method="static"))
    trainer.train_step()
    state = trainer.state
    weights = [p.detach().clone() for p in state.denoiser.parameters()]
    shadows = [s.clone() for s in state.ema.shadow_params]
    loss = state.task.loss
    monkeypatch.setattr(state.task, "loss", lambda *a, **k: loss(*a, **k) * float("inf"))
    with pytest.warns(RuntimeWarning, match="the loss is"):
        trainer.train_step()
    assert all(torch.equal(a, b) for a, b in zip(weights, state.denoiser.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(shadows, state.ema.shadow_params))


# --------------------------------------------------------------------------- bad input
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--device", "cuda", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "--device cuda", "no usable CUDA device")


def test_a_missing_autoencoder_folder_never_becomes_a_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    missing = tmp_path / "nonexistent" / "ae"
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--model", "ldm", "--autoencoder", missing,
                           "--out", tmp_path / "run")
    assert_one_line_error(code, err, missing, "no AutoencoderKL folder")
    assert "huggingface" not in err


@pytest.mark.parametrize("num", [0, -3])
def test_sample_refuses_a_count_below_one(trained_run, tmp_path, capsys, num):
    code, _, err = run_cli(capsys, "sample", "--run", trained_run, "--num", num, "--out", tmp_path / "g.png")
    assert_one_line_error(code, err, "--num must be at least 1")


def test_sample_to_an_unwritable_place_is_a_one_line_error(trained_run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "sample", "--run", trained_run, "--num", 2, "--out", blocker / "grid.png")
    assert_one_line_error(code, err, blocker)


def test_static_needs_no_update_interval(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", *TINY_ARGS, "--method", "static", "--steps", 15,
                             "--update-interval", 100, "--out", tmp_path / "run")
    assert code == 0 and json.loads(out)["steps"] == 15, err


@pytest.mark.parametrize("flag, value", [("--ema-decay", 2), ("--ema-decay", -0.1), ("--sparsity", 1.0),
                                         ("--lr", 0), ("--checkpoint-every", -1)])
def test_out_of_range_settings_are_one_line_errors(tmp_path, capsys, flag, value):
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, flag, value, "--out", tmp_path / "run")
    assert_one_line_error(code, err, flag)


def test_an_update_that_can_move_nothing_warns_once(tmp_path):
    trainer = Trainer(tiny(tmp_path / "run", method="rigl", steps=8, update_interval=2))
    with pytest.warns(RuntimeWarning, match="moves no block") as caught:
        trainer.train()
    assert len([w for w in caught if "moves no block" in str(w.message)]) == 1


def test_fid_from_few_samples_carries_a_caveat_and_updates_the_summary(trained_run, capsys):
    code, out, err = run_cli(capsys, "evaluate", "--run", trained_run, "--num-samples", 8)
    assert code == 0, err
    metrics = json.loads((trained_run / "metrics.json").read_text())["metrics"]
    assert "fewer than 2048" in metrics["caveat"] and "caveat" in err
    summary = (trained_run / "summary.md").read_text()
    assert "## Sample quality" in summary and "fewer than 2048" in summary


def test_a_dense_summary_lists_no_sparsity_and_the_loss_axis_names_the_target(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labels = []
    set_ylabel = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, label, *a, **k: (labels.append(label),
                                                                          set_ylabel(self, label, *a, **k))[1])
    Trainer(tiny(tmp_path / "dense", method="dense", prediction="v", steps=2)).train()
    summary = (tmp_path / "dense" / "summary.md").read_text()
    assert "| sparsity | - (dense run) |" in summary and "| sparsity | 0.5 |" not in summary
    assert labels == ["v-prediction MSE"]
