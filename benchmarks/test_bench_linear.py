"""pytest-benchmark suite for the block-sparse linear (``make bench``; never part of ``make test``).

Same methods as ``python -m benchmarks.linear``; sizes follow the device: the issue's
GPU sizes on CUDA, a CPU-friendly 2048 x 1024 x 1024 otherwise. Each group (one pass, one
density) times dense beside the others, so every ratio against dense is side by side.
"""
import pytest
import torch

from .common import synchronized
from .linear import build_methods

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOKENS, FEATURES = (16384, 4096) if CUDA else (2048, 1024)
BLOCK = 64


@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.1])
@pytest.mark.parametrize("method", ["dense", "ours", "masked_dense", "torch_bsr_mm"])
@pytest.mark.parametrize("pass_name", ["fwd", "fwd+bwd"])
def test_linear(benchmark, pass_name, method, density):
    torch.manual_seed(0)
    methods, _ = build_methods(TOKENS, FEATURES, FEATURES, BLOCK, density, DTYPE, DEVICE)
    forward, backward_step = methods[method]
    step = forward if pass_name == "fwd" else backward_step
    if step is None:
        pytest.skip(f"{method} has no backward")
    benchmark.group = f"linear {pass_name} density {density} block {BLOCK} {DTYPE} {DEVICE}"
    benchmark.extra_info.update(method=method, density=density, block=BLOCK, tokens=TOKENS, features=FEATURES)
    benchmark(synchronized(step, DEVICE))
