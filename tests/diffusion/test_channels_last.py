"""Channels-last end to end in diffusers models (sparse_diffusion.channels_last)."""
import pytest
import torch

import sparse_diffusion as sd
import sparse_kernels as sk
from sparse_diffusion.channels_last import channels_last


def _formats(model, x, t):
    """{module name: (input channels-last, output channels-last)} of every convolution in a
    training forward."""
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            def cl(tensor):
                return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
            seen[name] = (cl(inputs[0]), cl(output))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv2d, sk.BlockSparseConv2d))]
    y = model(x, t).sample
    for handle in handles:
        handle.remove()
    return seen, y


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_every_convolution_stays_channels_last_through_the_shortcuts(method):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    if method == "sparse":
        sd.sparsify(unet, 0.5, block_size=16, distribution="uniform", masked_dense=False)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    unet.train()
    _, expected = _formats(unet, x, t)
    channels_last(unet)
    channels_last(unet)  # idempotent
    seen, y = _formats(unet, x, t)
    shortcuts = [name for name in seen if name.endswith("conv_shortcut")]
    assert shortcuts, "the test model must have ResnetBlock2D shortcuts"
    inner = {name: formats for name, formats in seen.items() if name not in ("conv_in", "conv_out")}
    assert all(i and o for i, o in inner.values()), inner  # no NCHW copy before any shortcut either
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    y.square().mean().backward()  # and the backward goes through
    # Outside ResnetBlock2D, .contiguous() still makes NCHW copies.
    z = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert z.contiguous().is_contiguous()
