"""The Triton kernels compile for sm_90 and sm_80 without a GPU, with pipelined tensor-core main
loops and no spills (see compile_kernels_aot.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_kernels_aot.py")


def run_script(*args):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                            timeout=900)
    output = result.stdout + result.stderr
    if result.returncode == 3:
        pytest.skip(output.strip())
    return result, output


def test_kernels_compile_for_gpus(tmp_path):
    result, output = run_script("--json", str(tmp_path / "aot.json"))
    assert result.returncode == 0, output
    assert "compiled" in result.stdout
    variants = json.loads((tmp_path / "aot.json").read_text())["variants"]
    tensor_core = [v for v in variants if v["dtype"] != "fp32" or v["precision"] == "tf32"]
    assert tensor_core and all(v["main_loop"] and v["main_loop"]["cp_async"] for v in tensor_core)
    # Hopper's wgmma wherever the tile has 64 rows or more (block 64 and up, 16-bit).
    hopper = [v for v in tensor_core if v["capability"] == 90 and v["dtype"] != "fp32"
              and v["constexprs"].get("TILE_O", v["constexprs"].get("BLOCK_N", 64)) >= 64]
    assert hopper and all(v["main_loop"]["wgmma"] for v in hopper)


def test_the_compile_checks_catch_an_unspecialised_stride_and_a_synchronous_loop():
    result, output = run_script("--self-test")
    assert result.returncode == 0, output
    assert output.count("ok:") == 3
