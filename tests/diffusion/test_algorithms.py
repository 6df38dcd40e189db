"""Static, RigL and MagRan: the semantics of DESIGN.md, checkpoints, EMA, and a diffusers UNet."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import sparse_diffusion as sd
import sparse_kernels as sk


def two_block_layer(small=(0, 0), large=(1, 1)):
    """BlockSparseLinear 32 -> 32, blocks 16, live (0,0) with a small norm and (1,1) with a large one."""
    mask = torch.zeros(2, 2, dtype=torch.bool)
    mask[small] = mask[large] = True
    layer = sk.BlockSparseLinear(32, 32, bias=False, block_size=16, block_mask=mask)
    with torch.no_grad():
        slots = {(int(r), int(c)): s for s, (r, c) in enumerate(zip(layer.row_idx, layer.col_idx))}
        layer.values[slots[small]].fill_(0.01)
        layer.values[slots[large]].fill_(1.0)
    return layer


def rigl_step(layer, x_weights, y_weights, algo_cls=sd.RigL, **kwargs):
    """One optimizer step whose dense weight gradient in block (r, c) is proportional to
    ``y_weights[r] * x_weights[c]``."""
    model = nn.Sequential(layer)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    algo = algo_cls(model, optimizer, total_steps=4, update_interval=1, drop_fraction=0.5, anneal="constant",
                    stop=1.0, **kwargs)
    x = torch.tensor(x_weights, dtype=torch.float32).repeat_interleave(16).expand(4, 32)
    weights = torch.tensor(y_weights, dtype=torch.float32).repeat_interleave(16).expand(4, 32)
    (model(x) * weights).sum().backward()
    optimizer.step()
    record = algo.step()
    return model, optimizer, algo, record


def live_blocks(layer):
    return sorted(zip(layer.row_idx.tolist(), layer.col_idx.tolist()))


def test_rigl_drops_the_smallest_and_grows_the_largest_gradient():
    layer = two_block_layer()
    slot_of_small = 0  # (0,0) sits in slot 0: row-major slot order
    # Every block has a gradient, so both live slots have Adam state; (0,1) has the largest
    # gradient among the inactive blocks (the dropped (0,0) has half of it) and grows.
    _, optimizer, _, record = rigl_step(layer, x_weights=(0.5, 1.0), y_weights=(2.0, 1.0))
    assert live_blocks(layer) == [(0, 1), (1, 1)]
    assert record["dropped"] == record["moved"] == {"0": 1}
    assert layer.nnz == 2
    assert (layer.row_idx[slot_of_small], layer.col_idx[slot_of_small]) == (0, 1)
    assert torch.count_nonzero(layer.values[slot_of_small]) == 0
    state = optimizer.state[layer.values]
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(state[name][slot_of_small]) == 0
        assert torch.count_nonzero(state[name][1]) > 0  # the kept slot keeps its state


def test_rigl_regrows_a_dropped_block_with_the_largest_gradient_as_the_paper_does():
    """The RigL paper's algorithm grows among all blocks inactive after the drop."""
    layer = two_block_layer()
    # The largest dense gradient is at (0,0), the live block with the smallest norm: it is
    # dropped (k = floor(0.5 x 2) = 1) and, with the best grow score, comes straight back,
    # with its values and Adam state, as if it had not been dropped.
    model = nn.Sequential(layer)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    algo = sd.RigL(model, optimizer, total_steps=4, update_interval=1, drop_fraction=0.5, anneal="constant", stop=1.0)
    x = torch.tensor((1.0, 0.0)).repeat_interleave(16).expand(4, 32)
    (model(x) * x).sum().backward()
    optimizer.step()
    values, state = layer.values.detach().clone(), copy.deepcopy(optimizer.state[layer.values])
    record = algo.step()
    assert live_blocks(layer) == [(0, 0), (1, 1)]
    assert record["dropped"] == {"0": 1} and record["moved"] == {"0": 0}
    assert torch.equal(layer.values, values) and torch.count_nonzero(values[0]) > 0
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[layer.values][name], state[name])


@pytest.mark.parametrize("algo_cls", [sd.RigL, sd.MagRan])
def test_regrow_dropped_false_grows_only_blocks_dead_before_the_update(algo_cls):
    layer = two_block_layer()
    # As above, but growth is among the blocks dead before the update: (0,0) cannot come
    # back; the dead blocks tie at zero gradient, so RigL grows the lowest index.
    _, _, _, record = rigl_step(layer, x_weights=(1.0, 0.0), y_weights=(1.0, 0.0), algo_cls=algo_cls,
                                regrow_dropped=False)
    assert (0, 0) not in live_blocks(layer) and (1, 1) in live_blocks(layer)
    if algo_cls is sd.RigL:
        assert live_blocks(layer) == [(0, 1), (1, 1)]
    assert record["dropped"] == record["moved"] == {"0": 1}


def test_magran_can_regrow_the_block_it_dropped():
    """MagRan grows at random among the same candidates as RigL: over seeds, a dropped block
    sometimes comes back (1 of 3 inactive blocks), and then nothing moves."""
    outcomes = set()
    for seed in range(12):
        layer = two_block_layer()
        _, _, _, record = rigl_step(layer, x_weights=(1.0, 1.0), y_weights=(1.0, 1.0), algo_cls=sd.MagRan, seed=seed)
        assert record["dropped"] == {"0": 1}
        outcomes.add(record["moved"]["0"])
        assert (1, 1) in live_blocks(layer) and layer.nnz == 2
    assert outcomes == {0, 1}


def test_k_is_the_floor_of_the_fraction_of_live_blocks():
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[0] = False  # 12 live blocks, 4 dead
    layer = sk.BlockSparseLinear(64, 64, bias=False, block_size=16, block_mask=mask)
    model = nn.Sequential(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # 0.29 x 12 = 3.48: the paper's reference truncates to 3 (rounding would give 3 too) ...
    # 0.32 x 12 = 3.84: 3, where rounding would give 4.
    algo = sd.RigL(model, optimizer, total_steps=4, update_interval=1, drop_fraction=0.32, anneal="constant",
                   stop=1.0, regrow_dropped=False)
    x = torch.randn(4, 64)
    model(x).square().sum().backward()
    optimizer.step()
    assert algo.step()["moved"] == {"0": 3}


def test_rigl_hooks_its_layers_only_for_the_step_before_an_update():
    """The dense-gradient collectors cost every call of a layer: they are there for the step
    that feeds an update, and gone on the other steps."""
    layer = sk.BlockSparseLinear(32, 32, block_size=16, density=0.5)
    model = nn.Sequential(layer)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    algo = sd.RigL(model, optimizer, total_steps=12, update_interval=3, stop=1.0)
    hooked = []
    for _ in range(6):
        hooked.append(len(layer._forward_hooks))
        model(torch.randn(4, 32)).sum().backward()
        optimizer.step()
        algo.step()
    assert hooked == [0, 0, 1, 0, 0, 1]  # steps 3 and 6 update the masks
    assert [record["step"] for record in algo.history] == [3, 6]


def test_rigl_keeps_each_layers_block_norms_not_its_dense_gradient():
    """Once a layer's backward is done, RigL holds its block norms ([R, C]) and no dense
    gradient: an update step costs no more memory than any other."""
    torch.manual_seed(0)
    model = nn.Sequential(sk.BlockSparseLinear(64, 64, block_size=16, density=0.5),
                          sk.BlockSparseLinear(64, 32, block_size=16, density=0.5))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    algo = sd.RigL(model, optimizer, total_steps=4, update_interval=2, drop_fraction=0.5, anneal="constant", stop=1.0)
    x = torch.randn(8, 64)
    model(x).square().sum().backward()
    optimizer.step()
    algo.step()  # step 1: arms the layers for the next backward
    optimizer.zero_grad()
    dense_model = sd.densify(copy.deepcopy(model))
    model(x).square().sum().backward()
    assert algo._dense_grads == {}
    assert [tuple(algo._grow_norms[i].shape) for i in range(2)] == [(4, 4), (2, 4)]
    dense_model(x).square().sum().backward()  # the dense weight gradients, from a dense copy
    for i in range(2):
        torch.testing.assert_close(algo._grow_norms[i], sk.block_norms(dense_model[i].weight.grad, (16, 16)))
    optimizer.step()
    record = algo.step()  # step 2: the update, from those norms
    assert sum(record["moved"].values()) > 0 and algo._grow_norms == {}


def test_static_never_changes_the_mask():
    torch.manual_seed(0)
    model = nn.Sequential(sk.BlockSparseLinear(32, 32, block_size=16, density=0.5))
    before = live_blocks(model[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sd.Static(model, optimizer, total_steps=10, update_interval=1)
    for _ in range(10):
        model(torch.randn(3, 32)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert algo.step() is None
    assert live_blocks(model[0]) == before and algo.history == []


def test_schedule():
    model = nn.Sequential(sk.BlockSparseLinear(32, 32, block_size=16, density=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sd.MagRan(model, optimizer, total_steps=1000, update_interval=100, drop_fraction=0.3, stop=0.75)
    assert algo.drop_fraction_at(0) == pytest.approx(0.3)
    assert algo.drop_fraction_at(375) == pytest.approx(0.15)
    assert algo.drop_fraction_at(750) == pytest.approx(0.0, abs=1e-12)
    assert algo.drop_fraction_at(800) == 0.0
    assert [t for t in range(1, 1001) if algo.is_update_step(t)] == [100, 200, 300, 400, 500, 600, 700]
    linear = sd.RigL(model, optimizer, total_steps=1000, drop_fraction=0.3, anneal="linear", stop=0.5)
    assert linear.drop_fraction_at(250) == pytest.approx(0.15)
    constant = sd.RigL(model, optimizer, total_steps=1000, drop_fraction=0.3, anneal="constant")
    assert constant.drop_fraction_at(700) == 0.3


def train(model, optimizer, algo, steps, seed=0):
    """Deterministic toy regression; returns the losses."""
    losses = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(seed * 1000 + algo.step_count)
        x = torch.randn(8, 32, generator=generator)
        loss = (model(x) - x.flip(1)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        algo.step()
        losses.append(loss.item())
    return losses


def make_run(algo_cls, seed=0, mask_seed=0, **kwargs):
    torch.manual_seed(mask_seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 32))
    sd.sparsify(model, 0.5, block_size=16, keep_dense=[])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    settings = dict(total_steps=12, update_interval=3, drop_fraction=0.5, anneal="constant", stop=1.0, seed=seed)
    settings.update(kwargs)
    return model, optimizer, algo_cls(model, optimizer, **settings)


@pytest.mark.parametrize("algo_cls", [sd.RigL, sd.MagRan])
def test_resume_equals_an_uninterrupted_run(algo_cls):
    model, optimizer, algo = make_run(algo_cls)
    full = train(model, optimizer, algo, 12)
    full_masks = sd.mask_fingerprint(model)
    assert len(algo.history) == 4 and all(sum(r["moved"].values()) > 0 for r in algo.history)

    model, optimizer, algo = make_run(algo_cls)
    first = train(model, optimizer, algo, 6)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "algo": algo.state_dict()}
    model, optimizer, algo = make_run(algo_cls, mask_seed=123)  # another initial mask
    assert sd.mask_fingerprint(model) != full_masks
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    algo.load_state_dict(checkpoint["algo"])
    second = train(model, optimizer, algo, 6)
    assert first + second == full
    assert sd.mask_fingerprint(model) == full_masks


def test_magran_is_reproducible_from_its_seed():
    fingerprints = []
    for seed in (7, 7, 8):
        model, optimizer, algo = make_run(sd.MagRan, seed=seed)
        train(model, optimizer, algo, 6)
        fingerprints.append(sd.mask_fingerprint(model))
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_statistics_and_in_time_overparameterisation():
    model, optimizer, algo = make_run(sd.RigL)
    start = algo.itop_rate()
    assert start == pytest.approx(0.5, abs=0.05)
    train(model, optimizer, algo, 12)
    record = algo.history[-1]
    assert set(record["moved"]) == {"0", "2", "4"} and record["itop_rate"] == algo.itop_rate() > start


def test_non_finite_gradients_skip_the_update():
    model, optimizer, algo = make_run(sd.MagRan, update_interval=3)
    before = sd.mask_fingerprint(model)
    train(model, optimizer, algo, 2)
    model(torch.randn(2, 32)).sum().backward()
    model[0].values.grad[0, 0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="non-finite"):
        record = algo.step()
    assert record["skipped"] == "non-finite gradients"
    assert sd.mask_fingerprint(model) == before


def test_ema_shadows_are_reset_with_the_slot():
    from diffusers.training_utils import EMAModel

    model, optimizer, _ = make_run(sd.RigL)
    ema = EMAModel(model.parameters(), decay=0.9)
    algo = sd.RigL(model, optimizer, total_steps=12, update_interval=3, drop_fraction=0.5, stop=1.0, ema=ema)
    layer = model[0]
    index = [i for i, p in enumerate(model.parameters()) if p is layer.values][0]
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        model(torch.randn(8, 32, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        shadow_before = ema.shadow_params[index].clone()
        rows, cols = layer.row_idx.clone(), layer.col_idx.clone()
        algo.step()
    moved = (layer.row_idx != rows) | (layer.col_idx != cols)
    assert moved.any()
    shadow = ema.shadow_params[index]
    assert torch.count_nonzero(shadow[moved]) == 0
    assert torch.equal(shadow[~moved], shadow_before[~moved])
    with pytest.raises(ValueError, match="line up"):
        sd.RigL(model, optimizer, total_steps=12, update_interval=3, ema=[torch.zeros(3)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"total_steps": 50, "update_interval": 100}, r"total_steps \(50\) must be >= update_interval \(100\)"),
        ({"total_steps": 0}, "total_steps must be a positive int"),
        ({"total_steps": 100, "update_interval": 0}, "update_interval must be a positive int"),
        ({"total_steps": 100, "drop_fraction": 1.5}, "drop_fraction"),
        ({"total_steps": 100, "anneal": "step"}, "anneal"),
        ({"total_steps": 100, "stop": 0.0}, "stop"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = nn.Sequential(sk.BlockSparseLinear(32, 32, block_size=16))
    with pytest.raises(ValueError, match=match):
        sd.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    dense = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="sparsify"):
        sd.RigL(dense, torch.optim.SGD(dense.parameters(), lr=0.1), total_steps=100)


def test_a_sparse_diffusers_unet_trains_and_samples():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    dense_params = sum(p.numel() for p in unet.parameters())
    report = sd.sparsify(unet, sparsity=0.5, block_size=16)
    assert abs(report.global_sparsity - 0.5) < 0.02
    assert sum(p.numel() for p in unet.parameters()) < 0.6 * dense_params
    scheduler = DDPMScheduler(num_train_timesteps=10)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    algo = sd.RigL(unet, optimizer, total_steps=4, update_interval=2, drop_fraction=0.6)  # f(2) = 0.15
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    for _ in range(4):
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, 10, (4,))
        prediction = unet(scheduler.add_noise(images, noise, timesteps), timesteps).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        algo.step()
        assert math.isfinite(loss.item())
    assert [r["step"] for r in algo.history] == [2] and sum(algo.history[0]["moved"].values()) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = DDPMPipeline(unet=unet, scheduler=scheduler)(
            batch_size=1, generator=torch.manual_seed(0), num_inference_steps=2, output_type="np"
        ).images
    assert samples.shape == (1, 16, 16, 3) and torch.isfinite(torch.as_tensor(samples)).all()
