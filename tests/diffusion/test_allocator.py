"""sparse_diffusion.allocator: with the thresholds fixed, memory freed and allocated again
faults no page in; with glibc's defaults the same pattern faults every time. Each case runs in
a fresh interpreter: the setting is process-wide."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# 64 blocks of 1 MiB, written, freed, four times; prints whether the thresholds were fixed and
# the minor page faults of each later cycle.
CYCLES = """
import ctypes, resource
from sparse_diffusion.allocator import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
for cycle in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(1 << 20) for _ in range(64)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in blocks:
        libc.free(block)
    if cycle:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "confstr")
                                or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""),
                                reason="glibc's malloc thresholds")


def _cycles(setting):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPARSE_DIFFUSION_MALLOC", None)
    if setting is not None:
        env["SPARSE_DIFFUSION_MALLOC"] = setting
    done = subprocess.run([sys.executable, "-c", CYCLES], capture_output=True, text=True, env=env, check=True)
    fixed, *faults = done.stdout.split()
    return fixed == "True", [int(n) for n in faults]


@glibc
def test_kept_memory_faults_no_page_in_again():
    fixed, faults = _cycles(None)
    assert fixed
    assert max(faults) < 100, faults  # 64 MiB is 16,384 pages


@glibc
def test_glibc_defaults_fault_the_same_memory_in_every_time():
    fixed, faults = _cycles("system")
    assert not fixed
    assert min(faults) > 8_000, faults


def test_a_bad_setting_is_named(monkeypatch):
    from sparse_diffusion.allocator import keep_freed_memory

    monkeypatch.setenv("SPARSE_DIFFUSION_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="SPARSE_DIFFUSION_MALLOC must be 'keep' or 'system', got 'jemalloc'"):
        keep_freed_memory()


def test_the_cli_names_a_bad_setting_in_one_line(monkeypatch, capsys):
    from sparse_diffusion import cli

    monkeypatch.setenv("SPARSE_DIFFUSION_MALLOC", "tcmalloc")
    assert cli.main(["export", "--run", "no-such-run", "--out", "unused"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sparse-diffusion export: error: SPARSE_DIFFUSION_MALLOC must be 'keep' or 'system', got 'tcmalloc'"]
