"""The comparisons of test_conv2d.py on a CUDA device, at UNet-like shapes (autotuned kernels)."""
import pytest
import torch
from helpers import run_conv_case

pytestmark = pytest.mark.gpu

# (batch, Cin, Cout, (H, W), kernel, stride, padding, dilation, block, mask kind, bias)
GPU_CASES = [
    (4, 128, 128, (32, 32), 3, 1, 1, 1, 32, "random", True),
    (2, 256, 256, (16, 16), 3, 1, 1, 1, 64, "random", True),
    (3, 128, 256, (17, 15), 3, 2, 1, 1, 64, "random", False),
    (2, 64, 128, (20, 20), 3, 1, 2, 2, (32, 64), "random", True),
    (8, 256, 128, (8, 8), 1, 1, 0, 1, 64, "random", True),
    (2, 128, 128, (16, 16), 3, 1, 1, 1, 128, "full", True),
    (2, 128, 128, (16, 16), 3, 1, 1, 1, 32, "one", True),
    (2, 128, 128, (16, 16), 3, 1, 1, 1, 32, "empty", True),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[1]}to{c[2]}-{c[3]}-k{c[4]}-s{c[5]}-b{c[8]}-{c[9]}")
def test_triton_conv_on_gpu_matches_masked_dense(case, dtype, channels_last, monkeypatch, use_backend):
    use_backend("triton", "cuda")
    # fp32 follows cuDNN's TF32 setting (on by default, as for F.conv2d): compare exact fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    run_conv_case(case, dtype, "cuda", channels_last=channels_last)


def test_fp32_conv_uses_tf32_where_cudnn_does(monkeypatch):
    from sparse_kernels.triton_common import precision_and_upcast

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert precision_and_upcast(torch.float32, conv=True)[0] == "tf32"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert precision_and_upcast(torch.float32, conv=True)[0] == "ieee"
