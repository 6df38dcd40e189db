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

