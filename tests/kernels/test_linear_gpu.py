"""The comparisons of test_linear.py on a CUDA device, at larger shapes (autotuned kernels)."""
import pytest
import torch
from helpers import run_case

pytestmark = pytest.mark.gpu

# (leading shape, block size, block grid, mask kind, bias): weights up to 1024 x 2048
GPU_CASES = [
    ((4, 515), 32, (32, 16), "random", True),
    ((2048,), 64, (16, 32), "random", True),
    ((1000,), 128, (8, 4), "random", False),
    ((777,), (64, 32), (8, 16), "random", True),
    ((333,), (16, 128), (16, 4), "one", True),
    ((512,), 64, (8, 8), "full", True),
    ((512,), 64, (8, 8), "empty", True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"x{c[0]}-b{c[1]}-g{c[2]}-{c[3]}")
def test_triton_on_gpu_matches_masked_dense(case, dtype, use_backend):
    use_backend("triton", "cuda")
    run_case(case, dtype, "cuda")


def test_forced_reference_on_gpu(use_backend):
    use_backend("reference", "cuda")
    run_case(((300,), 32, (8, 8), "random", True), torch.bfloat16, "cuda")
