"""Data parallel: two CPU processes (gloo) keep identical masks through RigL and MagRan updates."""
import datetime
import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _worker(rank, world_size, init_file, algo_name, results):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: containers may resolve the host name elsewhere
    import sparse_diffusion as sd

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)  # the same initial model and masks on every rank
        model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 32))
        sd.sparsify(model, 0.5, block_size=16, keep_dense=[])
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        algo = getattr(sd, algo_name)(ddp, optimizer, total_steps=12, update_interval=2, drop_fraction=0.5,
                                      anneal="constant", stop=1.0)
        for step in range(8):
            generator = torch.Generator().manual_seed(1000 * rank + step)  # different data per rank
            x = torch.randn(8, 32, generator=generator)
            (ddp(x) - x.flip(1)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            algo.step()
            sd.assert_masks_synced(model)
        moved = sum(sum(r["moved"].values()) for r in algo.history)
        results.put((rank, sd.mask_fingerprint(model), moved))
        # No rank may tear down its gloo pairs while the other still talks to them, and DDP's
        # reference to the group must be gone before it is destroyed: either aborted a rank at
        # exit ("terminate called without an active exception").
        del ddp, algo, optimizer
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("algo_name", ["RigL", "MagRan"])
def test_two_ranks_keep_identical_masks(algo_name):
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        mp.start_processes(_worker, args=(2, init_file, algo_name, results), nprocs=2, start_method="spawn")
    outcome = sorted(results.get(timeout=60) for _ in range(2))
    (_, fingerprint_0, moved_0), (_, fingerprint_1, moved_1) = outcome
    assert fingerprint_0 == fingerprint_1
    assert moved_0 == moved_1 > 0


def _diverging_worker(rank, world_size, init_file, results):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import sparse_diffusion as sd

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 32))
        sd.sparsify(model, 0.5, block_size=16, keep_dense=[])
        if rank == 1:  # one slot of the middle layer points at another block on this rank only
            layer = model[2]
            dead = (~layer.layout.block_mask()).nonzero()[0]
            with torch.no_grad():
                layer.row_idx[0], layer.col_idx[0] = dead[0], dead[1]
            layer.rebuild_index()
        try:
            sd.assert_masks_synced(model)
            results.put((rank, None))
        except AssertionError as error:
            results.put((rank, str(error)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_masks_that_differ_across_ranks_are_named_by_layer():
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_diverging_worker, args=(2, os.path.join(folder, "init"), results), nprocs=2,
                           start_method="spawn")
    messages = dict(results.get(timeout=60) for _ in range(2))
    assert "layer 2 on rank 0 is not the same as 2 on rank 1" in messages[0]
    assert "layer 2 on rank 1 is not the same as 2 on rank 0" in messages[1]


def test_assert_masks_synced_is_a_no_op_outside_distributed():
    import sparse_diffusion as sd
    import sparse_kernels as sk

    sd.assert_masks_synced(nn.Sequential(sk.BlockSparseLinear(32, 32, block_size=16)))
