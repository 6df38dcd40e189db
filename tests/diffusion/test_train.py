"""End to end: tiny runs of every model and method, exact resume, atomic checkpoints, the CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusion_runs import TINY_ARGS, assert_same_training_state, crashing_at_draw, run_cli, tiny

from sparse_diffusion import cli
import sparse_diffusion.train as train_module
from sparse_diffusion.train import Trainer, train
from sparse_kernels import GroupNormSiLU


@pytest.fixture(autouse=True)
def _fast_and_private(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DIFFUSION_CACHE", str(tmp_path / "cache"))




RUN_FILES = ("checkpoint.safetensors", "config.json", "loss.png", "metrics.json", "summary.md")


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    from sparse_diffusion.autoencoder_training import train_autoencoder

    path = train_autoencoder("fashion-mnist", str(tmp_path_factory.mktemp("ae") / "ae"), preset="tiny",
                             image_size=16, steps=3, batch_size=4, limit=64)
    assert (path / "config.json").exists() and (path / "reconstructions.png").exists()
    return str(path)


MODELS = {
    "pixel": {},
    "ldm": {"model": "ldm"},
    "chirodiff": {"model": "chirodiff", "dataset": "kanjivg", "max_len": 16, "limit": 16},
}


@pytest.mark.parametrize("method", ["dense", "static", "rigl", "magran"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_with_every_method(tmp_path, autoencoder, model, method):
    changes = dict(MODELS[model], method=method)
    if model == "ldm":
        changes["autoencoder"] = autoencoder
    results = train(tiny(tmp_path / "run", **changes))
    for name in RUN_FILES:
        assert (tmp_path / "run" / name).exists(), name
    assert (tmp_path / "run" / "samples" / "step-0000004.png").exists()
    assert results["steps"] == 4 and results["flops_per_sample"] > 0
    assert (results["sparsity"] > 0.3) == (method != "dense")
    assert results.get("mask_updates", 0) == (1 if method in ("rigl", "magran") else 0)
    summary = (tmp_path / "run" / "summary.md").read_text()
    expected = "dense model (no sparsity)" if method == "dense" else "weight layers block-sparse"
    assert "## Sparsity" in summary and expected in summary


def test_the_loop_has_the_generic_speedups_and_times_its_phases(tmp_path):
    """Dense and sparse alike: channels-last image models with GroupNorm and SiLU fused, fused
    AdamW, a foreach EMA; and train_step() with timing on fills the phase timers the
    training-loop benchmark reads."""
    for method in ("dense", "rigl"):
        trainer = Trainer(tiny(tmp_path / method, method=method))
        state = trainer.state
        assert state.optimizer.defaults["fused"] and state.ema.foreach
        convs = [m for m in state.denoiser.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        assert any(isinstance(m, GroupNormSiLU) for m in state.denoiser.modules())
        trainer.timing = True
        loss = trainer.train_step()
        assert np.isfinite(loss) and state.step == 1
        phases = {"data", "forward", "backward", "optimizer", "ema"} | ({"mask_update"} if method == "rigl" else set())
        assert set(trainer.phase_seconds) == phases and all(v > 0 for v in trainer.phase_seconds.values())


def test_compile_trains_like_eager_across_mask_updates(tmp_path):
    """--compile: the same losses and masks as eager within fp32 rounding, across two RigL
    updates (the step before each runs eagerly, so that the hooks collect the dense gradients),
    with one graph compiled once: a mask update changes the index buffers, not their shapes."""
    from torch._dynamo.utils import counters

    from sparse_diffusion.algorithms import mask_fingerprint

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]  # other tests may have compiled before
    runs = {}
    for compiled in (False, True):
        trainer = Trainer(tiny(tmp_path / str(compiled), method="rigl", steps=6, block_size=4, compile=compiled))
        losses = [trainer.train_step() for _ in range(6)]
        runs[compiled] = (losses, trainer)
    (eager_losses, eager), (compiled_losses, compiled) = runs[False], runs[True]
    assert compiled.network is not compiled.eager_network and eager.network is eager.eager_network
    updates = compiled.state.algo.history
    assert [u["step"] for u in updates] == [2, 4] and sum(updates[0]["moved"].values()) > 0  # steps 3-6 on new masks
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4, atol=1e-6)
    assert mask_fingerprint(compiled.state.denoiser) == mask_fingerprint(eager.state.denoiser)
    assert counters["stats"]["unique_graphs"] - graphs == 1, dict(counters["stats"])


def test_chirodiff_transformer(tmp_path):
    results = train(tiny(tmp_path / "run", model="chirodiff", dataset="kanjivg", max_len=16, limit=16,
                         chirodiff_kind="transformer", method="rigl"))
    assert results["steps"] == 4 and results["sparsity"] > 0.3


def test_user_supplied_image_folder_and_quickdraw(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(4):
            pixels = np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    results = train(tiny(tmp_path / "img", dataset=f"images:{tmp_path / 'images'}", method="static"))
    assert results["steps"] == 4
    drawings = [{"drawing": [[[0, 10 + i, 20], [0, 5, 10]], [[5, 5], [0, 20]]]} for i in range(8)]
    (tmp_path / "cat.ndjson").write_text("\n".join(json.dumps(d) for d in drawings) + "\n")
    results = train(tiny(tmp_path / "qd", model="chirodiff", dataset=f"quickdraw:{tmp_path / 'cat.ndjson'}",
                         max_len=16, method="dense"))
    assert results["steps"] == 4


def test_resume_continues_exactly(tmp_path):
    full = Trainer(tiny(tmp_path / "full", method="rigl", steps=6, checkpoint_every=3))
    full.train()

    config = tiny(tmp_path / "crashed", method="rigl", steps=6, checkpoint_every=3)
    crashing = Trainer(config)
    with crashing_at_draw(5, KeyboardInterrupt("simulated crash")), pytest.raises(KeyboardInterrupt):
        crashing.train()
    resumed = Trainer(config, resume=True)
    assert resumed.state.step == 3
    resumed.train()
    assert_same_training_state(full.state, resumed.state)


def test_evaluations_during_training_make_a_curve_that_survives_a_crash(tmp_path, monkeypatch):
    """--eval-every N: a point every N steps and one at the end, each with the step and the
    training wall-clock so far; the evaluations' own time is not training time; a resume after
    a crash keeps the points made before its checkpoint."""
    import time

    # Each evaluation seems to take 100 s: the clock the loop reads jumps by that much while it
    # evaluates (real time otherwise, so the check holds whatever else the machine is doing).
    skew = {"seconds": 0.0}
    real_clock = time.perf_counter

    def evaluate(state, num_samples, dist):
        skew["seconds"] += 100.0
        return {"fid": 100.0 / state.step, "num_samples": num_samples}

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: real_clock() + skew["seconds"])
    config = tiny(tmp_path / "run", method="rigl", steps=6, checkpoint_every=2, eval_every=2, eval_samples=8)
    with crashing_at_draw(4, KeyboardInterrupt("simulated crash")), pytest.raises(KeyboardInterrupt):
        Trainer(config).train()
    resumed = Trainer(config, resume=True)
    assert resumed.state.step == 2 and [p["step"] for p in resumed.state.curve] == [2]
    results = resumed.train()
    curve = results["curve"]
    assert [p["step"] for p in curve] == [2, 4, 6] and [p["fid"] for p in curve] == [50.0, 25.0, 100.0 / 6]
    clocks = [p["wall_clock_s"] for p in curve]
    assert clocks == sorted(clocks) and clocks[-1] == results["wall_clock_s"]
    assert results["wall_clock_s"] < 100.0, "the 100 s evaluations were counted as training"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["curve"] == curve
    timing = results["timing"]
    assert timing["max_load_1min"] >= 0 and timing["clean"] == (timing["max_load_1min"] <= timing["cpu_threads"] + 0.75)


def fake_evaluations(monkeypatch):
    """The loop's evaluations, recorded and fast: FID 100 / step. Returns the steps evaluated."""
    steps = []

    def evaluate(state, num_samples, dist):
        steps.append(state.step)
        return {"fid": 100.0 / state.step, "num_samples": num_samples}

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    return steps


def test_training_a_finished_run_longer_keeps_every_evaluation(tmp_path, monkeypatch):
    """Two evaluation intervals, then --resume with twice the steps: the curve holds all four
    points, the first two unchanged; the last step is evaluated once and kept in the checkpoint."""
    import dataclasses

    evaluated = fake_evaluations(monkeypatch)
    config = tiny(tmp_path / "run", method="rigl", steps=4, eval_every=2, eval_samples=8)
    first = Trainer(config).train()["curve"]
    assert [p["step"] for p in first] == [2, 4] and evaluated == [2, 4]
    longer = Trainer(dataclasses.replace(config, steps=8), resume=True).train()["curve"]
    assert [p["step"] for p in longer] == [2, 4, 6, 8] and longer[:2] == first and evaluated == [2, 4, 6, 8]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["curve"] == longer
    assert Trainer(dataclasses.replace(config, steps=8), resume=True).train()["curve"] == longer  # nothing to do


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from sparse_diffusion import checkpoint, io

    trainer = Trainer(tiny(tmp_path / "run"))
    trainer.train()
    path = tmp_path / "run" / "checkpoint.safetensors"
    before = path.read_bytes()

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full_disk)
    with pytest.raises(io.DiskFullError, match=f"disk full while writing {path}"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert checkpoint.load_state(path)["step"] == 4


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_feeds_the_unet_bounded_batches_and_gives_the_same_samples(tmp_path, sampler):
    """An evaluation's thousands of samples go through the UNet ``batch_size`` at a time (the
    memory stays bounded); the sampler steps them together, so the samples are those of one call
    (within float32 rounding: a convolution's kernel may depend on the batch size)."""
    from sparse_diffusion.tasks import build_task

    task, _ = build_task(tiny(tmp_path), torch.device("cpu"))
    task.eval()
    sizes = []
    task.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    one_call = task.sample(10, torch.Generator().manual_seed(0), sampler=sampler, steps=3, batch_size=10)
    assert sizes == [10] * 3
    sizes.clear()
    batched = task.sample(10, torch.Generator().manual_seed(0), sampler=sampler, steps=3, batch_size=4)
    assert sizes == [4, 4, 2] * 3
    torch.testing.assert_close(batched, one_call, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        task.sample(2, torch.Generator(), batch_size=0)


# --------------------------------------------------------------------------- CLI
def test_cli_train_sample_and_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", *TINY_ARGS, "--method", "rigl", "--out", str(run))
    assert code == 0, err
    assert json.loads(out)["steps"] == 2
    code, _, err = run_cli(capsys, "sample", "--run", str(run), "--num", "4", "--out", str(tmp_path / "grid.png"))
    assert code == 0 and (tmp_path / "grid.png").exists(), err
    code, out, err = run_cli(capsys, "evaluate", "--run", str(run), "--num-samples", "8")
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert {"fid", "kid_mean", "fd_local"} <= set(metrics) and metrics["num_samples"] == 8


def test_cli_trains_and_resumes_a_run_of_vector_blocks(tmp_path, capsys):
    """--block-size 16x1: the layers hold (16, 1) blocks, the run folder says so, a resume and an
    export read it back."""
    run = tmp_path / "run"
    args = ("train", *TINY_ARGS, "--method", "rigl", "--drop-fraction", "0.5", "--out", str(run))
    code, _, err = run_cli(capsys, *args[:-2], "--block-size", "16x1", "--steps", "4", *args[-2:])
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["block_size"] == "16x1"
    assert "| block_size | 16x1 |" in (run / "summary.md").read_text()
    code, _, err = run_cli(capsys, *args[:-2], "--block-size", "16x1", "--steps", "6", "--resume", *args[-2:])
    assert code == 0, err
    from sparse_diffusion.run import load_run

    state = load_run(str(run)).state
    layers = [m for m in state.denoiser.modules() if hasattr(m, "layout")]
    assert layers and {m.block_size for m in layers} == {(16, 1)} and state.step == 6
    assert sum(sum(u["dropped"].values()) for u in state.algo.history) > 0  # a mask update ran on them
    code, _, err = run_cli(capsys, *args[:-2], "--block-size", "16", "--steps", "8", "--resume", *args[-2:])
    assert code == 2 and "block_size: checkpoint '16x1' vs now 16" in err


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--model", "ldm"), "--autoencoder"),
        (("--model", "chirodiff"), "stroke dataset"),
        (("--data-dir", "{tmp}/nothing-here"), "apt-get install -y dataset-fashion-mnist"),
        (("--steps", "1", "--method", "rigl"), r"--steps \(1\) must be at least --update-interval"),
        (("--eval-every", "2"), r"--eval-every 2 needs --eval-samples"),
    ],
)
def test_cli_argument_errors(tmp_path, capsys, extra, match):
    import re

    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, *extra, "--out", str(tmp_path / "run"))
    assert code == 2 and re.search(match, err), err


def test_cli_refuses_unwritable_output_and_bad_resumes(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--out", str(blocker / "run"))
    assert code == 2 and "cannot write to the output folder" in err
    run = str(tmp_path / "run")
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--resume", "--out", run)
    assert code == 2 and "no checkpoint" in err
    assert run_cli(capsys, "train", *TINY_ARGS, "--method", "rigl", "--out", run)[0] == 0
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--method", "rigl", "--out", run)
    assert code == 2 and "already holds a run" in err
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--method", "rigl", "--sparsity", "0.75", "--resume",
                           "--out", run)
    assert code == 2 and "cannot resume" in err and "sparsity" in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--method", "snip", "--out", run])


def test_demo_quick(tmp_path, capsys):
    from sparse_diffusion.demo import run_demo

    results = run_demo(str(tmp_path / "demo"), quick=True)
    assert set(results) == {"dense", "rigl-50%"}
    assert results["rigl-50%"]["parameters"] < 0.7 * results["dense"]["parameters"]
    table = (tmp_path / "demo" / "summary.md").read_text()
    assert "| dense |" in table and "| rigl-50% |" in table and "FID@16" in table
    assert Path(tmp_path / "demo" / "dense" / "samples").exists()
