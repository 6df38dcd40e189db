"""Run folders a user can trust: no code runs from a file, the folder is the truth, exact
resume with the EMA, faults that lose nothing, and one-line errors for bad input."""
import json
import os
import pickle
import re
import shutil
import signal
import warnings

import pytest
import torch
from diffusion_runs import TINY_ARGS, assert_same_training_state, crashing_at_draw, run_cli, tiny

import sparse_diffusion as sd
import sparse_kernels as sk
import sparse_diffusion.train as train_module
from sparse_diffusion.checkpoint import CheckpointError, load_state, save_state
from sparse_diffusion.train import CHECKPOINT, Trainer, load_run


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DIFFUSION_CACHE", str(tmp_path / "cache"))








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


class _Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious_pickle(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Payload(marker)}, path)  # a zip pickle, as torch.save writes
    return path


# --------------------------------------------------------------------------- no code from files
@pytest.mark.parametrize("where", ["checkpoint", "legacy checkpoint", "bare pickle"])
def test_a_crafted_checkpoint_runs_no_code(trained_run, tmp_path, capsys, where):
    marker = tmp_path / "pwned"
    (trained_run / CHECKPOINT).unlink()
    if where == "checkpoint":
        path = write_malicious_pickle(trained_run / CHECKPOINT, marker)
    elif where == "legacy checkpoint":
        path = write_malicious_pickle(trained_run / "checkpoint.pt", marker)
    else:
        path = trained_run / CHECKPOINT
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    for argv in (("sample", "--run", trained_run, "--num", 2, "--out", tmp_path / "grid.png"),
                 ("evaluate", "--run", trained_run, "--num-samples", 8),
                 ("train", *TINY_ARGS, "--method", "rigl", "--steps", 4, "--resume", "--out", trained_run)):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, path)
        assert "pickle" in err
        assert not marker.exists(), argv


def test_crafted_metric_caches_run_no_code(trained_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    cache = tmp_path / "cache"
    code, _, err = run_cli(capsys, "evaluate", "--run", trained_run, "--num-samples", 8)
    assert code == 0, err
    caches = sorted(p for p in cache.iterdir() if p.suffix in (".safetensors", ".npz"))
    assert {p.suffix for p in caches} == {".safetensors", ".npz"}
    for path in caches:
        for bare in (False, True):
            if bare:
                path.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
            else:
                write_malicious_pickle(path, marker)
            code, _, err = run_cli(capsys, "evaluate", "--run", trained_run, "--num-samples", 8)
            assert not marker.exists()
            if code != 0:  # a file that is no cache at all; a zip without its arrays is recomputed
                assert_one_line_error(code, err, path, "delete it to recompute")
            path.unlink(missing_ok=True)


def test_checkpoints_hold_no_pickle_and_round_trip_bit_for_bit(tmp_path):
    state = {"a": torch.randn(3, 4).to(memory_format=torch.contiguous_format), "ints": {0: torch.arange(3), 7: None},
             "betas": (0.9, 0.999), "nested": [1, 2.5, "x", True, None, float("inf")],
             "bf16": torch.randn(5).bfloat16(), "empty": torch.empty(0, 2), "view": torch.arange(10.0)[2:5]}
    path = tmp_path / "state.safetensors"
    save_state(state, path)
    assert b"__reduce__" not in path.read_bytes() and path.read_bytes()[:2] != b"PK"
    loaded = load_state(path)
    assert loaded["betas"] == (0.9, 0.999) and loaded["nested"] == state["nested"]
    assert set(loaded["ints"]) == {0, 7} and loaded["ints"][7] is None
    for key in ("a", "bf16", "empty", "view"):
        assert loaded[key].dtype == state[key].dtype and torch.equal(loaded[key], state[key]), key
    assert torch.equal(loaded["ints"][0], state["ints"][0])


# --------------------------------------------------------------------------- the folder is the truth
def test_a_copied_run_whose_original_is_deleted_samples_evaluates_and_resumes(trained_run, tmp_path, capsys):
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(trained_run, copy)
    original_weights = load_state(trained_run / CHECKPOINT)["ema"]["shadow_params"]
    shutil.rmtree(trained_run)

    code, _, err = run_cli(capsys, "sample", "--run", copy, "--num", 4, "--out", tmp_path / "grid.png")
    assert code == 0 and (tmp_path / "grid.png").is_file(), err
    assert not trained_run.exists()  # nothing re-created where the run used to be
    trainer = train_module.load_run(str(copy))
    for a, b in zip(trainer.ema.shadow_params, original_weights):
        assert torch.equal(a, b)

    code, _, err = run_cli(capsys, "evaluate", "--run", copy, "--num-samples", 8)
    assert code == 0, err
    assert json.loads((copy / "metrics.json").read_text())["metrics"]["num_samples"] == 8
    assert not trained_run.exists()

    code, out, err = run_cli(capsys, "train", *TINY_ARGS, "--method", "rigl", "--steps", 4, "--resume", "--out", copy)
    assert code == 0, err
    assert json.loads(out)["steps"] == 4 and not trained_run.exists()


def test_a_latent_run_keeps_its_own_autoencoder(tmp_path, capsys):
    """A latent run copies its autoencoder into RUN/autoencoder and reads that one: the run
    still samples and resumes with the original autoencoder folder and run deleted."""
    from sparse_diffusion.models.autoencoder import build_autoencoder

    autoencoder = tmp_path / "ae"
    torch.manual_seed(0)
    build_autoencoder("tiny", 16, 1).save_pretrained(autoencoder)
    run = tmp_path / "ldm"
    Trainer(tiny(run, model="ldm", autoencoder=str(autoencoder), method="static", steps=2)).train()
    assert sorted(p.name for p in (run / "autoencoder").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    expected = train_module.load_run(str(run)).task.autoencoder.state_dict()
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(autoencoder)
    shutil.rmtree(run)

    code, _, err = run_cli(capsys, "sample", "--run", copy, "--num", 2, "--out", tmp_path / "grid.png")
    assert code == 0 and (tmp_path / "grid.png").is_file(), err
    loaded = train_module.load_run(str(copy)).task.autoencoder.state_dict()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    resumed = Trainer(tiny(copy, model="ldm", autoencoder=str(autoencoder), method="static", steps=3), resume=True)
    resumed.train()
    assert resumed.step == 3 and not autoencoder.exists()


def test_export_from_the_command_line(trained_run, tmp_path, capsys):
    from diffusers import UNet2DModel

    before = snapshot(trained_run)
    code, out, err = run_cli(capsys, "export", "--run", trained_run, "--out", tmp_path / "dense")
    assert code == 0 and f"wrote {tmp_path / 'dense'}" in out, err
    assert sorted(p.name for p in (tmp_path / "dense").iterdir()) == ["README.md", "scheduler", "unet"]
    assert type(UNet2DModel.from_pretrained(tmp_path / "dense", subfolder="unet")) is UNet2DModel
    code, _, err = run_cli(capsys, "export", "--run", trained_run, "--out", tmp_path / "sparse", "--sparse")
    assert code == 0, err
    sparse = sd.load_pretrained(tmp_path / "sparse", "unet")
    assert any(isinstance(m, sk.BlockSparseModule) for m in sparse.modules())
    code, _, err = run_cli(capsys, "export", "--run", trained_run, "--out", tmp_path / "dense")
    assert_one_line_error(code, err, "exists and is not an empty folder")
    assert snapshot(trained_run) == before  # export reads the run, writes nothing there


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*"))


def test_sample_and_evaluate_with_out_write_nothing_in_the_run(trained_run, tmp_path, capsys):
    before = snapshot(trained_run)
    code, _, err = run_cli(capsys, "sample", "--run", trained_run, "--num", 2, "--out", tmp_path / "grid.png")
    assert code == 0, err
    code, _, err = run_cli(capsys, "evaluate", "--run", trained_run, "--num-samples", 8,
                           "--out", tmp_path / "metrics.json")
    assert code == 0, err
    assert snapshot(trained_run) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_can_be_sampled_and_evaluated_elsewhere(trained_run, tmp_path, capsys):
    before = sorted(p.name for p in trained_run.rglob("*"))
    os.chmod(trained_run, 0o555)
    try:
        code, _, err = run_cli(capsys, "sample", "--run", trained_run, "--num", 2, "--out", tmp_path / "grid.png")
        assert code == 0, err
        code, _, err = run_cli(capsys, "evaluate", "--run", trained_run, "--num-samples", 8)
        assert_one_line_error(code, err, trained_run)
        code, _, err = run_cli(capsys, "evaluate", "--run", trained_run, "--num-samples", 8,
                               "--out", tmp_path / "metrics.json")
        assert code == 0, err
        assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["num_samples"] == 8
    finally:
        os.chmod(trained_run, 0o755)
    assert sorted(p.name for p in trained_run.rglob("*")) == before


def test_a_resume_with_new_settings_records_them(trained_run, capsys):
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--method", "rigl", "--steps", 4, "--lr", "0.002",
                           "--checkpoint-every", 2, "--resume", "--out", trained_run)
    assert code == 0, err
    config = json.loads((trained_run / "config.json").read_text())
    assert config["steps"] == 4 and config["lr"] == 0.002
    assert config["changes"] == [{"step": 2, "changed": {"steps": [2, 4], "lr": [0.001, 0.002]}}]
    assert "from step 2: steps 2 -> 4, lr 0.001 -> 0.002" in (trained_run / "summary.md").read_text()
    assert load_state(trained_run / CHECKPOINT)["changes"] == config["changes"]


def test_a_rigl_run_from_before_regrow_dropped_goes_on_as_it_was_trained(trained_run, capsys):
    """Run folders written before ``regrow_dropped`` existed grew only blocks dead before an
    update: they load that way, and a resume must say so. Other settings added since take
    their defaults, which are the behaviour from before they existed: no change to record."""
    newer = ("regrow_dropped", "eval_every", "eval_reference")
    config = json.loads((trained_run / "config.json").read_text())
    for name in newer:
        del config[name]
    (trained_run / "config.json").write_text(json.dumps(config))
    state = load_state(trained_run / CHECKPOINT)
    for name in newer:
        del state["config"][name]
    del state["algo"]["config"]["regrow_dropped"]
    save_state(state, trained_run / CHECKPOINT)
    loaded = load_run(str(trained_run))
    assert loaded.config.regrow_dropped is False and loaded.algo.regrow_dropped is False
    args = ("train", *TINY_ARGS, "--method", "rigl", "--steps", 4, "--checkpoint-every", 2, "--resume", "--out", trained_run)
    assert_one_line_error(*run_cli(capsys, *args)[::2], "regrow_dropped: checkpoint False vs now True")
    code, _, err = run_cli(capsys, *args, "--no-regrow-dropped")
    assert code == 0, err
    changes = json.loads((trained_run / "config.json").read_text())["changes"]
    assert changes == [{"step": 2, "changed": {"steps": [2, 4]}}]


def test_a_grid_changed_and_run_again_records_the_new_settings(tmp_path, monkeypatch):
    import yaml

    from sparse_diffusion.study.runner import run_grid

    grid = {"out": str(tmp_path / "grid"), "defaults": dict(
        model="pixel", preset="tiny", dataset="fashion-mnist", image_size=16, steps=2, batch_size=4,
        block_size=16, sample_steps=2, limit=64, update_interval=2),
        "studies": [{"name": "s", "grid": {"method": ["static"], "sparsity": [0.5]}}]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    run_grid(str(path))
    grid["defaults"]["steps"] = 4
    path.write_text(yaml.safe_dump(grid))
    run_grid(str(path))
    (config_path,) = (tmp_path / "grid").rglob("config.json")
    config = json.loads(config_path.read_text())
    assert config["steps"] == 4 and config["changes"][0]["changed"] == {"steps": [2, 4]}
    assert json.loads((config_path.parent / "metrics.json").read_text())["steps"] == 4


def test_a_resume_cannot_go_backwards(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny(run, method="static", steps=3)).train()
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--method", "static", "--steps", 2, "--resume", "--out", run)
    assert_one_line_error(code, err, "the run is at step 3")


# --------------------------------------------------------------------------- exact resume, EMA included
def test_resume_after_a_kill_is_bit_exact_ema_and_regrown_blocks_included(tmp_path):
    settings = dict(method="rigl", steps=8, checkpoint_every=3, block_size=8, drop_fraction=0.5, update_interval=2)
    full = Trainer(tiny(tmp_path / "full", **settings))
    full.train()
    moved_after_resume = [r for r in full.algo.history if r["step"] > 3 and sum(r["moved"].values())]
    assert moved_after_resume  # the test must regrow blocks after the resume point

    config = tiny(tmp_path / "killed", **settings)
    killed = Trainer(config)
    with crashing_at_draw(5, SystemExit("killed")), pytest.raises(SystemExit):
        killed.train()  # nothing after the step-3 checkpoint is saved
    resumed = Trainer(config, resume=True)
    assert resumed.step == 3
    resumed.train()
    assert_same_training_state(full, resumed)


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
        train_module.load_run(str(trained_run))


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
    weights = [p.detach().clone() for p in trainer.denoiser.parameters()]
    shadows = [s.clone() for s in trainer.ema.shadow_params]
    loss = trainer.task.loss
    monkeypatch.setattr(trainer.task, "loss", lambda *a, **k: loss(*a, **k) * float("inf"))
    with pytest.warns(RuntimeWarning, match="the loss is"):
        trainer.train_step()
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.denoiser.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(shadows, trainer.ema.shadow_params))


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
