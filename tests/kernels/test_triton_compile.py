"""The Triton kernels compile for sm_90 and sm_80 without a GPU (see compile_kernels_aot.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_gpus():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernels_aot.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    if result.returncode == 3:
        pytest.skip(output.strip())
    assert result.returncode == 0, output
    assert "compiled" in result.stdout
