"""The registry: importing the package registers nothing and loads nothing compiled; the first
op call makes every Python registration, whoever makes it (an eager call, ``torch.compile``
tracing a model that never ran, a process-wide ``SPARSE_KERNELS_BACKEND``).

Each test runs a script in a fresh process, where no registration was made yet."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

NOTHING_AT_IMPORT = r"""
import sys
import torch
import sparse_kernels as sk

assert not {"sparse_kernels._C", "triton", "torch._dynamo"} & set(sys.modules), sorted(sys.modules)
assert not hasattr(torch.ops.sparse_kernels, "bsr_linear")  # no op defined before the first call
ops = sk.registry.ops()
assert "sparse_kernels._C" in sys.modules
defined = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("sparse_kernels::")}
assert defined == set(sk.extension.OPS), defined  # every op of csrc/ops.cpp, reachable through ops()
assert all(getattr(ops, name) is getattr(torch.ops.sparse_kernels, name) for name in defined)
for op in ("bsr_linear", "bsr_conv2d_grad_weight", "prune_and_regrow"):
    dump = torch._C._dispatch_dump(f"sparse_kernels::{op}")
    cuda = [line for line in dump.splitlines() if line.startswith("CUDA:")]
    # Triton for the block-sparse ops; for the mask ops, the compiled CUDA kernel, or the reference
    # where the build has no CUDA (a kernel registered from Python is "registered at <file>.py:<line>").
    from_python = op.startswith("bsr") or not sk.extension.has_compiled_kernel(op, "cuda")
    assert cuda and (".py:" in cuda[0]) == from_python, dump
    assert any(line.startswith("Meta:") for line in dump.splitlines()), dump  # the fake kernel
assert sk.registry.ops() is ops
print("ok")
"""

COMPILED_BEFORE_ANY_CALL = r"""
import torch
import sparse_kernels as sk

torch.manual_seed(0)
linear = torch.nn.Sequential(sk.BlockSparseLinear(32, 48, block_size=16, density=0.5), torch.nn.GELU(),
                             sk.BlockSparseLinear(48, 16, block_size=16, density=0.5))
conv = sk.BlockSparseConv2d(16, 32, 3, padding=1, block_size=16, density=0.5)
for model, x in ((linear, torch.randn(3, 32)), (conv, torch.randn(2, 16, 5, 5))):
    y = torch.compile(model, backend="aot_eager", fullgraph=True)(x)  # the first op call: while tracing
    torch.testing.assert_close(y, model(x))
print("ok")
"""

PROCESS_WIDE_REFERENCE = r"""
import torch
import sparse_kernels as sk

assert sk.testing.active_override() == "reference"
assert sk.select_backend("cpu", torch.float32, (32, 32)) == "reference"
layout = sk.BlockSparseLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), 16)
values, x = torch.randn(3, 16, 16), torch.randn(5, 32)
y = sk.bsr_linear(x, values, layout)
cpu = [line for line in torch._C._dispatch_dump("sparse_kernels::bsr_linear").splitlines() if line.startswith("CPU:")]
assert ".py:" in cpu[0], cpu  # the reference, registered from Python over the C++ kernel
assert torch.equal(y, sk.bsr_linear_reference(x, values, layout))
with sk.testing.override("reference"):
    assert sk.testing.active_override() == "reference"
assert sk.testing.active_override() == "reference"  # the process-wide choice outlives a test override
print("ok")
"""


def run(script: str, backend: str = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("SPARSE_KERNELS_BACKEND", None)
    if backend is not None:
        env["SPARSE_KERNELS_BACKEND"] = backend
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("script", [NOTHING_AT_IMPORT, COMPILED_BEFORE_ANY_CALL], ids=["import", "compile"])
def test_the_first_op_call_registers_every_kernel(script):
    result = run(script)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout[-3000:] + result.stderr[-3000:]


def test_the_process_wide_backend_is_registered_with_the_rest():
    result = run(PROCESS_WIDE_REFERENCE, backend="reference")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout[-3000:] + result.stderr[-3000:]
