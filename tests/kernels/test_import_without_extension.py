"""The package without its compiled extension (a fresh checkout, a GPU machine while the build
runs): it imports, its layout, modules and Triton kernels work, and the first op call says in
one line how to build the extension.

Each test copies the ``sparse_kernels`` source tree without ``_C*.so`` to a temporary folder
and runs a script there in a fresh process (``PYTHONPATH`` = that folder, ``TRITON_INTERPRET=1``).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sparse_kernels"

IMPORT_AND_LAYOUT = r"""
import sys
import torch
import sparse_kernels as sk

assert sk.__file__.startswith(sys.argv[1]), sk.__file__
assert "sparse_kernels._C" not in sys.modules and sk.extension.library() is None
assert not sk.extension.has_compiled_kernel("build_index", "cpu")

mask = torch.tensor([[True, False, True], [False, True, True]])
layout = sk.BlockSparseLayout.from_block_mask(mask, (16, 8))
assert layout.shape == (32, 24) and layout.nnz == 4 and torch.equal(layout.block_mask(), mask)
assert layout.row_ptr.tolist() == [0, 2, 4] and layout.col_ptr.tolist() == [0, 1, 2, 4]
assert layout.row_slots.tolist() == [0, 1, 2, 3] and layout.col_slots.tolist() == [0, 2, 1, 3]
weight = torch.randn(32, 24)
dense_mask = mask.repeat_interleave(16, 0).repeat_interleave(8, 1)
assert torch.equal(sk.to_dense(sk.from_dense(weight, layout), layout), weight * dense_mask)

linear = sk.BlockSparseLinear(64, 32, block_size=16, density=0.5)
conv = sk.BlockSparseConv2d(32, 16, 3, padding=1, block_size=16, density=1.0)
assert linear.values.shape == (linear.layout.nnz, 16, 16) and conv.values.shape == (2, 16, 16, 3, 3)

for call in (lambda: sk.bsr_linear(torch.randn(2, 24), torch.randn(4, 16, 8), layout),
             lambda: linear(torch.randn(2, 64))):
    try:
        call()
    except ImportError as error:
        print(type(error).__name__, error, sep=": ")
    else:
        raise AssertionError("an op ran without the compiled extension")
"""

TRITON_LAUNCHERS = r"""
import sys
import torch
import torch.nn.functional as F
import sparse_kernels as sk
import sparse_kernels.conv2d.triton_kernels as conv2d_kernels
import sparse_kernels.linear.triton_kernels as linear_kernels

assert "sparse_kernels._C" not in sys.modules and sk.extension.library() is None
torch.manual_seed(0)
layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False, True], [False, True, True]]), 16)
values, x, bias = torch.randn(layout.nnz, 16, 16), torch.randn(5, 48), torch.randn(32)
y = linear_kernels.bsr_linear_fwd(x, values, layout.row_ptr, layout.row_slots, layout.col_idx, bias)
truth = x.double() @ sk.to_dense(values.double(), layout).T + bias.double()
assert (y.double() - truth).abs().max() <= 2e-5 * truth.abs().max(), "linear forward"

values, image = torch.randn(layout.nnz, 16, 16, 3, 3), torch.randn(2, 48, 6, 5)
conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
y = conv2d_kernels.bsr_conv2d_fwd(image, values, layout.row_ptr, layout.row_slots, layout.col_idx, None, **conv)
truth = F.conv2d(image.double(), sk.to_dense(values.double(), layout), **conv)
assert (y.double() - truth).abs().max() <= 2e-5 * truth.abs().max(), "conv2d forward"
assert "sparse_kernels._C" not in sys.modules
print("ok")
"""


def run_without_extension(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    shutil.copytree(PACKAGE, tmp_path / "sparse_kernels", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    assert not list((tmp_path / "sparse_kernels").glob("_C*"))
    # -S: no .pth files, so that an editable install of the project (whose import hook maps
    # sparse_kernels._C to its own build, whatever the package's path) cannot lend the copy an
    # extension; the installed packages (torch, triton) stay reachable through PYTHONPATH.
    site_packages = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *site_packages]), "TRITON_INTERPRET": "1"}
    env.pop("SPARSE_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-S", "-c", script, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_layout_and_modules_work_and_the_first_op_call_says_how_to_build(tmp_path):
    result = run_without_extension(tmp_path, IMPORT_AND_LAYOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout  # one line per failed call: the error's message is one line
    for line in lines:
        assert line.startswith("ExtensionNotBuiltError: sparse_kernels: the compiled extension sparse_kernels._C "
                               "is not built"), line
        assert "pip install --no-build-isolation -e ." in line


def test_the_triton_kernels_run_without_the_extension(tmp_path):
    pytest.importorskip("triton")
    result = run_without_extension(tmp_path, TRITON_LAUNCHERS)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout[-3000:] + result.stderr[-3000:]
