"""pytest-benchmark suite for the block-sparse conv2d (``make bench``; never part of ``make test``).

Same methods as ``python -m benchmarks.conv2d``: the UNet's 256->256 3x3 at 32x32 (batch 32)
on CUDA in bf16, a CPU-sized 128->128 at 16x16 (batch 4) in fp32 otherwise; block 32.
Each group (one pass, one density) times dense beside the others.
"""
import pytest
import torch

from .common import synchronized
from .conv2d import build_methods

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH, SHAPE = (32, (256, 256, 32, 3)) if CUDA else (4, (128, 128, 16, 3))
BLOCK = 32


@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.1])
@pytest.mark.parametrize("method", ["dense", "ours", "masked_dense"])
@pytest.mark.parametrize("pass_name", ["fwd", "fwd+bwd"])
def test_conv(benchmark, pass_name, method, density):
    torch.manual_seed(0)
    methods, _ = build_methods(BATCH, SHAPE, BLOCK, density, DTYPE, DEVICE)
    forward, backward_step = methods[method]
    step = forward if pass_name == "fwd" else backward_step
    benchmark.group = f"conv {SHAPE} {pass_name} density {density} block {BLOCK} {DTYPE} {DEVICE}"
    benchmark.extra_info.update(method=method, density=density, block=BLOCK, batch=BATCH, shape=SHAPE)
    benchmark(synchronized(step, DEVICE))
