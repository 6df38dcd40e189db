"""Channels-last end to end in diffusers models (sparse_diffusion.channels_last)."""
import pytest
import torch

import sparse_diffusion as sd
import sparse_kernels as sk
from sparse_diffusion.channels_last import ChannelsLastAttention, channels_last


def _formats(model, run):
    """{module name: (input channels-last, output channels-last)} of every convolution in a
    training forward ``run(model)``, and its output."""
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            def cl(tensor):
                return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
            seen[name] = (cl(inputs[0]), cl(output))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv2d, sk.BlockSparseConv2d))]
    y = run(model)
    for handle in handles:
        handle.remove()
    return seen, y


def _unet():
    from diffusers import UNet2DModel

    model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    return model, lambda m: m(x, t).sample


def _conditional_unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                 layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    return model, lambda m: m(x, t, encoder_hidden_states=context).sample


def _autoencoder():
    from diffusers import AutoencoderKL

    model = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                          norm_num_groups=8, latent_channels=4,
                          down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                          up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    x = torch.randn(2, 3, 16, 16)
    return model, lambda m: m(x).sample


def _attention_unet():
    from diffusers import UNet2DModel

    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        norm_num_groups=8, attention_head_dim=16, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    return model, lambda m: m(x, t).sample


@pytest.mark.parametrize("build", [_unet, _conditional_unet, _autoencoder, _attention_unet],
                         ids=["unet", "conditional", "autoencoder", "attention"])
@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_every_convolution_stays_channels_last_through_the_shortcuts(method, build):
    torch.manual_seed(0)
    model, run = build()
    if method == "sparse":
        sd.sparsify(model, 0.5, block_size=16, distribution="uniform", masked_dense=False)
    model.train()
    _, expected = _formats(model, run)
    channels_last(model)
    channels_last(model)  # idempotent
    seen, y = _formats(model, run)
    shortcuts = [name for name in seen if name.endswith("conv_shortcut")]
    assert shortcuts, "the test model must have ResnetBlock2D shortcuts"
    # Every convolution hands on a channels-last activation (the first ones take the NCHW
    # input), and no shortcut gets an NCHW copy of its block's input.
    assert all(o for name, (i, o) in seen.items()), seen
    assert all(seen[name][0] for name in shortcuts), {name: seen[name] for name in shortcuts}
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    y.square().mean().backward()  # and the backward goes through
    # Outside ResnetBlock2D, .contiguous() still makes NCHW copies.
    z = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert z.contiguous().is_contiguous()


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the aten ops run inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_attention_takes_channels_last_tokens_as_views(method, heads):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(64, heads=heads, dim_head=64 // heads, norm_num_groups=8, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    if method == "sparse":
        sd.sparsify(attn, 0.5, block_size=16, distribution="uniform", masked_dense=False)
    original = attn.processor
    x = torch.randn(2, 64, 5, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    params = [p for p in attn.parameters() if p.requires_grad]

    def run():
        with _Ops() as ops:
            y = attn(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *params])
        return y, grads, ops.names

    want, want_grads, plain_ops = run()
    channels_last(attn)
    assert isinstance(attn.processor, ChannelsLastAttention)
    got, got_grads, ops = run()
    assert attn.processor.fallback is original
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # diffusers' processor copies the tokens it normalises and each projection's input; here
    # every reshape is a view
    assert plain_ops.count("clone") + plain_ops.count("copy_") >= 1
    assert ops.count("clone") + ops.count("copy_") == 0, ops
