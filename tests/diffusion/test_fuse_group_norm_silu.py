"""GroupNorm and SiLU fused in diffusers UNets (sparse_diffusion.group_norm_silu): the same
outputs and gradients as before, the same state_dict, blocks it does not know left alone."""
import copy

import pytest
import torch

import sparse_diffusion as sd
import sparse_kernels as sk
from sparse_diffusion.group_norm_silu import fuse_group_norm_silu


def _unet(conditional=False, **options):
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    if conditional:
        model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 48),
                                     layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                                     attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
        return model, lambda m: m(x, t, encoder_hidden_states=context).sample
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 48), layers_per_block=1,
                        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), **options)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    return model, lambda m: m(x, t).sample


def _output_and_grads(model, run):
    model.zero_grad()
    y = run(model)
    y.square().mean().backward()
    return y.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("conditional", [False, True], ids=["UNet2DModel", "UNet2DConditionModel"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "block-sparse"])
def test_fused_model_computes_what_it_did(conditional, sparse):
    model, run = _unet(conditional)
    if sparse:
        sd.sparsify(model, 0.5, block_size=16)
    sd.channels_last(model)
    fused = copy.deepcopy(model)
    blocks = [m for m in model.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert fuse_group_norm_silu(fused) == 2 * len(blocks) + 1
    assert fuse_group_norm_silu(fused) == 0  # once
    assert list(fused.state_dict()) == list(model.state_dict())
    assert sum(isinstance(m, sk.GroupNormSiLU) for m in fused.modules()) == 2 * len(blocks) + 1
    want_y, want_grads = _output_and_grads(model, run)
    got_y, got_grads = _output_and_grads(fused, run)
    torch.testing.assert_close(got_y, want_y, rtol=1e-4, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_blocks_with_a_scale_shift_time_embedding_are_left_alone():
    model, run = _unet(resnet_time_scale_shift="scale_shift")
    assert fuse_group_norm_silu(model) == 1  # only the output norm
    assert all(type(m.norm2) is torch.nn.GroupNorm for m in model.modules() if type(m).__name__ == "ResnetBlock2D")


def _block_output_and_grads(block, x, temb):
    block.zero_grad()
    x = x.detach().requires_grad_()
    y = block(x, temb)
    y.square().sum().backward()  # (a mean's backward divides)
    return y.detach(), x.grad, {name: p.grad.clone() for name, p in block.named_parameters()}


@pytest.mark.parametrize("options", [
    dict(out_channels=48, temb_channels=16),  # a shortcut convolution, the time embedding's SiLU
    dict(out_channels=32, temb_channels=16, skip_time_act=True, output_scale_factor=2.0),
    dict(out_channels=32, temb_channels=None),  # no time embedding
    dict(out_channels=48, temb_channels=16, up=True),  # up-sampling: diffusers' forward, a pre-hook
    dict(out_channels=48, temb_channels=16, down=True),
], ids=["shortcut", "scale-2", "no-temb", "up", "down"])
def test_fused_block_computes_what_it_did(options):
    """Each kind of ResnetBlock2D fused (its own forward, or diffusers' with a pre-hook where it
    samples up or down): the same output and gradients; a scale of 1.0 costs no division, and
    the time embedding is added inside the norm, not broadcast over the activation."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=32, groups=8, **options)
    x = torch.randn(2, 32, 8, 8)
    temb = torch.randn(2, 16) if options["temb_channels"] else None
    fused = copy.deepcopy(block)
    assert fuse_group_norm_silu(fused) == 2
    samples = options.get("up") or options.get("down")
    assert ("forward" in vars(fused)) != bool(samples)
    want_y, want_dx, want_grads = _block_output_and_grads(block, x, temb)
    got_y, got_dx, got_grads = _block_output_and_grads(fused, x, temb)
    for name, want, got in [("y", want_y, got_y), ("dx", want_dx, got_dx)] + [
            (name, grad, got_grads[name]) for name, grad in want_grads.items()]:
        # fp32 rounding of the fused norms, relative to each tensor's scale
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * float(want.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
    if not samples:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
            _block_output_and_grads(fused, x, temb)
        events = profile.events()
        assert any(event.name == "aten::div" for event in events) == (block.output_scale_factor != 1.0)
        broadcast = [(event.name, event.input_shapes) for event in events if event.name in ("aten::add", "aten::add_")
                     and any(len(shape) == 4 and shape[2:] == [1, 1] for shape in event.input_shapes)]
        assert not broadcast, broadcast


def test_fused_block_under_autocast_sums_in_the_dtypes_diffusers_does():
    """bf16 autocast: a bf16 convolution output plus an fp32 input is fp32 in diffusers' block;
    the fused block's in-place sums must not keep it bf16."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8)
    fused = copy.deepcopy(block)
    fuse_group_norm_silu(fused)
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = block(x, temb), fused(x, temb)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
