"""The Triton kernels compile for sm_90 and sm_80 without a GPU, with pipelined tensor-core main
loops and no spills (see compile_kernels_aot.py); where a check cannot hold for a gather (the
vector-block conv kernels' 16-bit gathered tile), the script says why and the test holds it to
exactly those."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_kernels_aot.py")
# The variants whose synchronous gathered-tile load is waived (compile_kernels_aot.CANNOT_HOLD):
# the vector-block conv kernels that gather an NCHW activation element by element, 16-bit types.
GATHERING = ("conv-vector-fwd-3x3", "conv-vector-grad_weight-3x3")


def run_script(*args):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                            timeout=900)
    output = result.stdout + result.stderr
    if result.returncode == 3:
        pytest.skip(output.strip())
    return result, output


def dot_rows(variant):
    """The rows of a variant's dot, for the vector-block kernels: ``BLOCK_S`` slots (grad-weight)
    or the config's ``BLOCK_M``."""
    if "BLOCK_S" in variant["constexprs"]:
        return variant["constexprs"]["BLOCK_S"]
    return int(re.search(r"BLOCK_M: (\d+)", variant["config"]).group(1))


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    result, output = run_script("--json", str(path))
    return result, output, json.loads(path.read_text()) if path.exists() else None


def test_kernels_compile_for_gpus(aot):
    result, output, found = aot
    assert result.returncode == 0, output
    assert "compiled" in result.stdout
    variants = found["variants"]
    tensor_core = [v for v in variants if v["dtype"] != "fp32" or v["precision"] == "tf32"]
    assert tensor_core and all(v["main_loop"] and v["main_loop"]["cp_async"] for v in tensor_core)
    # Hopper's wgmma wherever the tile has 64 rows or more (block 64 and up, 16-bit).
    square = [v for v in tensor_core if "vector" not in v["kernel"]]
    hopper = [v for v in square if v["capability"] == 90 and v["dtype"] != "fp32"
              and v["constexprs"].get("TILE_O", v["constexprs"].get("BLOCK_N", 64)) >= 64]
    assert hopper and all(v["main_loop"]["wgmma"] for v in hopper)


def test_vector_block_kernels_compile_with_the_checks(aot):
    """Every vector-block kernel (linear and 3x3 conv, each product, bo 16 everywhere and 8 and 32
    on sm_90) compiles with a tensor-core main loop and asynchronous copies, no spill; wgmma on
    sm_90 wherever its dot has 64 rows (16-bit and tf32); the one waived check is the synchronous
    load of the conv kernels' gathered tile in 16-bit types."""
    result, output, found = aot
    assert result.returncode == 0, output
    vector = [v for v in found["variants"] if "vector" in v["kernel"]]
    kernels = {v["kernel"] for v in vector}
    assert kernels == {"vector-fwd", "vector-grad_input", "vector-grad_weight", "conv-vector-fwd-3x3",
                       "conv-vector-grad_input-3x3", "conv-vector-grad_weight-3x3"}
    assert {(v["capability"], v["constexprs"]["BLOCK_OUT"]) for v in vector} == {(90, 8), (90, 16), (90, 32), (80, 16)}
    assert all(v["spill_bytes"] == 0 and not v["problems"] for v in vector)
    tensor_core = [v for v in vector if v["dtype"] != "fp32" or v["precision"] == "tf32"]
    for v in tensor_core:
        loop = v["main_loop"]
        assert loop["wgmma"] or loop["mma_sync"], v
        assert loop["cp_async"] and loop["cp_async_commit"], v
        if v["capability"] == 90 and dot_rows(v) >= 64:
            assert loop["wgmma"], v
        gathering = v["kernel"] in GATHERING and v["dtype"] in ("bf16", "fp16")
        assert bool(v["waived"]) == gathering, v
        assert bool(loop["sync_tile_loads"]) == gathering, v
    assert {v["kernel"] for v in tensor_core if v["waived"]} == set(GATHERING)
    assert set(found["cannot_hold"]) == {"_bsr_conv2d_vector_fwd_kernel", "_bsr_conv2d_vector_grad_weight_kernel"}
    assert all("cp.async" in reason["why"] for reason in found["cannot_hold"].values())


def test_the_compile_checks_catch_an_unspecialised_stride_and_a_synchronous_loop():
    result, output = run_script("--self-test")
    assert result.returncode == 0, output
    assert output.count("ok:") == 3
