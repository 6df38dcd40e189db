"""`sparse-diffusion train` under torchrun: one run, data split across ranks, equal to the
single-process run; exact resume after a kill; clear refusals. CPU, gloo, 2 processes."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from diffusion_runs import crashing_at_draw, run_cli, tiny

from sparse_diffusion.checkpoint import load_state
from sparse_diffusion.train import CHECKPOINT, Trainer

# A RigL run that moves blocks (blocks of 8, drop 0.5, an update at step 2) with EMA.
SETTINGS = dict(method="rigl", sparsity=0.5, block_size=8, drop_fraction=0.5, update_interval=2, steps=6,
                batch_size=8, checkpoint_every=3)
FLAGS = ["--model", "pixel", "--dataset", "fashion-mnist", "--preset", "tiny", "--image-size", "16", "--limit", "64",
         "--sample-steps", "2", "--method", "rigl", "--sparsity", "0.5", "--block-size", "8", "--drop-fraction", "0.5",
         "--update-interval", "2", "--steps", "6", "--batch-size", "8", "--checkpoint-every", "3"]


def torchrun_env(**extra):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_run(a, b, exact: bool):
    """Two checkpoints: the same losses, masks, weights and EMA (bit for bit, or within fp32
    reduction-order tolerance), and the same mask-update history."""
    close = (lambda x, y: torch.equal(x, y)) if exact else (
        lambda x, y: torch.allclose(x, y, rtol=1e-4, atol=1e-4))
    assert close(a["losses"], b["losses"]) if exact else torch.allclose(a["losses"], b["losses"], atol=1e-6)
    for key, tensor in a["model"].items():
        if tensor.is_floating_point():
            assert close(tensor, b["model"][key]), key
        else:
            assert torch.equal(tensor, b["model"][key]), key  # masks (row_idx, col_idx): identical
    for i, (x, y) in enumerate(zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"])):
        assert close(x, y), f"EMA shadow {i}"
    assert a["algo"]["history"] == b["algo"]["history"]


def test_torchrun_trains_one_run_split_in_two_equal_to_one_process(tmp_path):
    Trainer(tiny(tmp_path / "one", **SETTINGS)).train()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "sparse_diffusion", "train", *FLAGS, "--out", str(tmp_path / "two")]
    result = subprocess.run(command, capture_output=True, text=True, env=torchrun_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count('"steps": 6') == 1  # rank 0 alone prints the results

    one, two = load_state(tmp_path / "one" / CHECKPOINT), load_state(tmp_path / "two" / CHECKPOINT)
    assert sum(sum(r["moved"].values()) for r in one["algo"]["history"]) > 0
    assert_same_run(one, two, exact=False)
    assert two["world_size"] == 2 and json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    files = lambda run: sorted(str(p.relative_to(run)) for p in run.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one")  # rank 0 wrote the folder, once


# --------------------------------------------------------------------------- kill and resume, 2 ranks
def _signalled_worker(rank, port, config_fields, results):
    """Rank 0 alone gets SIGTERM during step 3; both ranks must stop after the same step.
    Counts the all-reduces the training loop makes itself (besides DDP's and the mask update's)."""
    import signal

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import sparse_diffusion.train as train_module
    from sparse_diffusion.config import TrainConfig

    draw_batch, calls = train_module.draw_batch, []

    def signal_rank_0(*args, **kwargs):
        calls.append(1)
        if rank == 0 and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return draw_batch(*args, **kwargs)

    all_reduce, loop_reductions = dist.all_reduce, []

    def counting_all_reduce(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("sparse_diffusion", "distributed.py")):
            loop_reductions.append(1)
        return all_reduce(*args, **kwargs)

    train_module.draw_batch, dist.all_reduce = signal_rank_0, counting_all_reduce
    try:
        train_module.train(TrainConfig(**config_fields))
        results.put((rank, "finished", None, len(loop_reductions)))
    except train_module.TrainingStopped as stop:
        results.put((rank, str(stop), stop.exit_code, len(loop_reductions)))


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    import dataclasses
    import signal

    config = tiny(tmp_path / "run", **{**SETTINGS, "checkpoint_every": 100})
    results = mp.get_context("spawn").Queue()
    mp.start_processes(_signalled_worker, args=(free_port(), dataclasses.asdict(config), results), nprocs=2,
                       start_method="spawn")
    outcome = dict((rank, (message, code, reductions))
                   for rank, message, code, reductions in (results.get(timeout=60) for _ in range(2)))
    assert outcome[0][1] == outcome[1][1] == 128 + signal.SIGTERM
    assert outcome[0][2] == outcome[1][2] == 3, outcome  # one per step: the loss mean and the stop flag together
    assert "stopped by SIGTERM after step 3" in outcome[0][0], outcome
    assert "stopped with a signalled rank after step 3" in outcome[1][0], outcome
    assert load_state(tmp_path / "run" / CHECKPOINT)["step"] == 3


def _worker(rank, port, config_fields, resume, kill_at_step):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import sparse_diffusion.train as train_module
    from sparse_diffusion.config import TrainConfig

    # Both ranks die at the same draw: nothing after the last checkpoint is saved.
    killed = crashing_at_draw(kill_at_step, SystemExit(9)) if kill_at_step is not None else contextlib.nullcontext()
    try:
        with killed:
            train_module.train(TrainConfig(**config_fields), resume=resume)
    except BaseException:  # noqa: BLE001
        if kill_at_step is None:
            raise
        # Killed: whatever the dying ranks' connections do now does not matter (as with kill -9);
        # the test checks what the checkpoint holds.


def run_two_ranks(config, resume=False, kill_at_step=None):
    import dataclasses

    mp.start_processes(_worker, args=(free_port(), dataclasses.asdict(config), resume, kill_at_step), nprocs=2,
                       start_method="spawn")


def test_a_two_rank_run_killed_and_resumed_equals_the_uninterrupted_one(tmp_path):
    run_two_ranks(tiny(tmp_path / "full", **SETTINGS))
    killed = tiny(tmp_path / "killed", **SETTINGS)
    run_two_ranks(killed, kill_at_step=5)
    assert load_state(tmp_path / "killed" / CHECKPOINT)["step"] == 3
    run_two_ranks(killed, resume=True)
    full, resumed = load_state(tmp_path / "full" / CHECKPOINT), load_state(tmp_path / "killed" / CHECKPOINT)
    assert resumed["step"] == 6 and resumed["world_size"] == 2
    assert_same_run(full, resumed, exact=True)


def test_a_resume_with_another_world_size_continues_the_same_run(tmp_path):
    """The global batch does not depend on the world size: a run trained 3 steps in one process
    and resumed on 2 ranks ends as the 1-process run does (within fp32 reduction order), and
    config.json records the change."""
    Trainer(tiny(tmp_path / "one", **SETTINGS)).train()
    split = tiny(tmp_path / "split", **SETTINGS)
    trainer = Trainer(split)
    for _ in range(3):
        trainer.train_step()
    trainer.save_checkpoint()
    run_two_ranks(split, resume=True)
    assert_same_run(load_state(tmp_path / "one" / CHECKPOINT), load_state(tmp_path / "split" / CHECKPOINT),
                    exact=False)
    changes = json.loads((tmp_path / "split" / "config.json").read_text())["changes"]
    assert changes == [{"step": 3, "changed": {"world_size": [1, 2]}}]


def _extending_worker(rank, port, config_fields, resume):
    """A 2-rank run whose evaluations are fast fakes with a collective in them (as generating the
    samples on every rank is): a rank that evaluates alone would hang the other."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    import sparse_diffusion.train as train_module
    from sparse_diffusion.config import TrainConfig

    def evaluate(state, num_samples, distributed):
        dist.barrier()
        return {"fid": 100.0 / state.step} if rank == 0 else {}

    train_module.evaluate = evaluate
    train_module.train(TrainConfig(**config_fields), resume=resume)


def test_a_two_rank_run_trained_longer_keeps_every_evaluation(tmp_path):
    import dataclasses

    config = tiny(tmp_path / "run", **{**SETTINGS, "steps": 4, "eval_every": 2, "eval_samples": 8})
    for fields, resume in ((config, False), (dataclasses.replace(config, steps=8), True)):
        context = mp.start_processes(_extending_worker, args=(free_port(), dataclasses.asdict(fields), resume),
                                     nprocs=2, start_method="spawn", join=False)
        deadline = time.monotonic() + 300
        while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # True once every rank is done
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail("the ranks did not finish: one waits in a collective the other never entered")
        if fields.steps == 4:
            first = json.loads((tmp_path / "run" / "metrics.json").read_text())["curve"]
    curve = json.loads((tmp_path / "run" / "metrics.json").read_text())["curve"]
    assert [p["step"] for p in first] == [2, 4]
    assert [p["step"] for p in curve] == [2, 4, 6, 8] and curve[:2] == first
    assert [p["fid"] for p in curve] == [50.0, 25.0, 100.0 / 6, 12.5]


# --------------------------------------------------------------------------- refusals
@pytest.fixture
def torchrun_of_two(monkeypatch):
    """The environment torchrun gives rank 0 of 2 (no process group is started: the settings
    are refused before)."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "7"], "--batch-size 7 (the global batch) is not divisible by the world size 2"),
    (["--dist-backend", "nccl", "--device", "cpu"], "--dist-backend nccl needs a GPU per rank (--device cpu)"),
    (["--device", "cuda:1"], "under torchrun each rank uses cuda:LOCAL_RANK"),
])
def test_settings_torchrun_cannot_run_are_one_line_errors(torchrun_of_two, tmp_path, capsys, flags, message):
    import torch.distributed as dist

    code, _, err = run_cli(capsys, "train", *FLAGS, *flags, "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_the_global_batch_and_its_noise_are_the_union_of_the_ranks_rows():
    from sparse_diffusion.diffusion import noise_and_timesteps
    from sparse_diffusion.distributed import SINGLE, Distributed
    from sparse_diffusion.tasks import build_task, draw_batch

    task, dataset = build_task(tiny("unused"), torch.device("cpu"))

    def draw(dist):
        random = dist.random(torch.Generator().manual_seed(7), 8)
        images, labels = draw_batch(dataset, 8, random, torch.device("cpu"))
        noise, timesteps = noise_and_timesteps(images, task.scheduler, random)
        after = torch.randn(3, generator=random.generator)  # the generator advanced as in one process
        return images, labels, noise, timesteps, after

    whole = draw(SINGLE)
    parts = [draw(Distributed(rank, 2)) for rank in range(2)]
    for i in range(4):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i]), i
    assert all(torch.equal(p[4], whole[4]) for p in parts)


def test_a_torchrun_job_of_one_process_trains_under_ddp(tmp_path, monkeypatch):
    """What a one-GPU machine runs to check the multi-GPU path (here with gloo on the CPU)."""
    import torch.distributed as dist

    import sparse_diffusion.train as train_module

    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo").items():
        monkeypatch.setenv(name, value)
    wrapped = []
    ddp = train_module.DistributedDataParallel
    monkeypatch.setattr(train_module, "DistributedDataParallel", lambda module, **kw: wrapped.append(1) or ddp(module, **kw))
    results = train_module.train(tiny(tmp_path / "run", method="rigl", steps=2, device="cpu"))
    assert wrapped == [1] and results["world_size"] == 1 and not dist.is_initialized()
