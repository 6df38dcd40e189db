"""Run folders a user can trust: no code runs from a file, and the folder is the truth (a
copied run samples, evaluates, exports and resumes; reading a run writes nothing in it).
Faults and bad input: test_run_faults.py; folders of older versions: test_migrations.py."""
import json
import os
import pickle
import shutil

import pytest
import torch
from diffusion_runs import TINY_ARGS, assert_one_line_error, run_cli, tiny, trained_run  # noqa: F401

import sparse_diffusion as sd
import sparse_kernels as sk
from sparse_diffusion.checkpoint import load_state, save_state
from sparse_diffusion.run import load_run
from sparse_diffusion.train import CHECKPOINT, Trainer


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DIFFUSION_CACHE", str(tmp_path / "cache"))


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
    loaded = load_run(str(copy))
    for a, b in zip(loaded.state.ema.shadow_params, original_weights):
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
    expected = load_run(str(run)).state.task.autoencoder.state_dict()
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(autoencoder)
    shutil.rmtree(run)

    code, _, err = run_cli(capsys, "sample", "--run", copy, "--num", 2, "--out", tmp_path / "grid.png")
    assert code == 0 and (tmp_path / "grid.png").is_file(), err
    loaded = load_run(str(copy)).state.task.autoencoder.state_dict()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    resumed = Trainer(tiny(copy, model="ldm", autoencoder=str(autoencoder), method="static", steps=3), resume=True)
    resumed.train()
    assert resumed.state.step == 3 and not autoencoder.exists()


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
