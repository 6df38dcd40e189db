"""``make gpu-check``: one time-boxed pass over the GPU path, for a GPU lent for a few minutes.

    python -m benchmarks.gpu_check --out-dir benchmarks/results     # on the GPU machine
    GPU_CHECK_DRY_RUN=1 python -m benchmarks.gpu_check --out-dir /tmp/x   # here: CPU, tiny sizes

The whole run keeps to ``GPU_CHECK_SECONDS`` (default 450, build included). The stages run in
priority order, each in its own process with a time box, and every stage appends its records
to ``gpu-check-<date>-<gpu>.jsonl`` (and its output to the ``.log`` beside it) as it goes, so a
run cut off at any point leaves what it did; a stage that fails or times out never stops the
next:

1. ``environment``: GPU, driver, versions, which optional modules are missing;
2. ``build``: ``pip install --no-build-isolation --no-deps -e .`` (the compiled extension)
   starts in the background; the Triton stages meanwhile import the package, whose layouts and
   Triton kernels need no compiled extension;
3. ``triton_smoke``: one kernel config per case (``SPARSE_KERNELS_AUTOTUNE=0``): linear and
   conv forward / grad-input / grad-weight in bf16, fp16 and fp32 against an fp64 truth;
   rectangular blocks, empty / one-block / full masks, M=1, a non-contiguous input, stride 2,
   dilation 2, 1x1, NCHW and channels-last;
   ``vector_smoke``: the same for vector blocks (16x1, 8x1, 32x1) in bf16 and fp32;
4. ``large``: one case over 2^31 elements per kernel family (forward and grad-weight),
   spot-checked against torch on slices;
5. ``headline``: autotuned times at block 64, densities 1 / 0.5 / 0.25 / 0.1: linear
   4096x4096 on 8192 rows (each kernel, forward+backward replayed as a CUDA graph, torch's
   BSR forward) against cuBLAS, target fwd+bwd <= 1.2 d + 0.03; the three UNet 3x3 convs of
   the conv issue (128 at 64x64, 256 at 32x32, 512 at 16x16, batch 32) against cuDNN, target
   <= 1.25 d + 0.05 (1.3 at d = 1); ``d`` is the *actual* density (live blocks / all blocks:
   a 128->128 conv at block 64 has 4 blocks, so "0.1" is one block of four);
6. ``after_build``: waits for the build; ``python -m sparse_kernels info``, the CUDA mask
   update against the CPU one (bit for bit), ``benchmarks.masks``;
7. ``ddp_smoke``: ``torchrun --nproc-per-node 1 -m sparse_diffusion train`` (NCCL, the UNet
   under DDP) for a few steps, where diffusers and Fashion-MNIST are installed;
8. ``gpu_tests``: ``pytest -m gpu`` with the time left (collection errors are not fatal).

Stages 1-6 need only torch, triton and numpy (none of hypothesis, yaml, PIL, diffusers). The
run ends with one summary table. ``GPU_CHECK_FAIL_STAGE=name`` makes that stage fail at its
start (the test suite checks that the later stages still run).

The files: ``runner.py`` (the stage processes, the build, the summary; ``__main__`` runs it),
``records.py`` (the record file, dry-run switch, fp64 truths and the case check, timing),
``machine.py`` (stages 1, 6, 7, 8), ``correctness.py`` (3, 4), ``headline.py`` (5).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

from . import correctness, headline, machine
from .records import ROOT, Recorder, dry_run, raise_later

# (name, the most seconds it may take); the GPU tests take whatever is left.
STAGES = [("environment", 30), ("triton_smoke", 150), ("vector_smoke", 60), ("large", 60), ("headline", 150),
          ("after_build", 90), ("ddp_smoke", 60), ("gpu_tests", None)]
STAGE_FUNCTIONS = {
    "environment": machine.stage_environment,
    "triton_smoke": correctness.stage_triton_smoke,
    "vector_smoke": correctness.stage_vector_smoke,
    "large": correctness.stage_large,
    "headline": headline.stage_headline,
    "ddp_smoke": machine.stage_ddp_smoke,
}


def run_stage(name: str, jsonl: Path, seconds: float, build_log: Optional[Path]) -> int:
    """One stage, in this process (the runner starts one process per stage)."""
    record = Recorder(jsonl, name)
    if os.environ.get("GPU_CHECK_FAIL_STAGE") == name:
        raise RuntimeError(f"stage {name} failed on purpose (GPU_CHECK_FAIL_STAGE)")
    if name == "after_build":
        machine.stage_after_build(record, build_log)
    elif name == "gpu_tests":
        machine.stage_gpu_tests(record, seconds)
    else:
        STAGE_FUNCTIONS[name](record)
    if raise_later:
        raise RuntimeError(f"{len(raise_later)} case(s) off: " + "; ".join(raise_later[:5]))
    return 0


# --------------------------------------------------------------------------- the runner
def gpu_name() -> str:
    if dry_run():
        return "cpu-dry-run"
    smi = shutil.which("nvidia-smi")
    if smi:
        name = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if name.returncode == 0 and name.stdout.strip():
            return re.sub(r"[^A-Za-z0-9_.]+", "-", name.stdout.strip().splitlines()[0]).strip("-")
    return "no-gpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("GPU_CHECK_SECONDS", 450)))
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--jsonl", help=argparse.SUPPRESS)
    parser.add_argument("--stage-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return run_stage(args.stage, Path(args.jsonl), args.stage_seconds, None)

    started = time.monotonic()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"gpu-check-{datetime.date.today().isoformat()}-{gpu_name()}"
    jsonl, log = stem.with_suffix(".jsonl"), stem.with_suffix(".log")
    env = {**os.environ, "GPU_CHECK_OUT_DIR": str(out_dir), "SPARSE_KERNELS_AUTOTUNE": "0", "PYTHONPATH": str(ROOT)}
    if dry_run():
        env["TRITON_INTERPRET"] = "1"
    build = start_build(log, env)
    rows = []
    for name, cap in STAGES:
        left = args.seconds - (time.monotonic() - started)
        limit = left if cap is None else min(cap, left)
        if name == "headline":
            env_stage = {**env, "SPARSE_KERNELS_AUTOTUNE": "1"}  # the headline ratios are autotuned
        else:
            env_stage = env
        if name == "after_build" and build is not None:
            waited = wait_for_build(build, limit, log)
            limit -= waited
        if limit < 5:
            rows.append((name, "skipped (no time left)", 0.0))
            Recorder(jsonl, name)(kind="stage", status="skipped", reason="no time left")
            continue
        status, seconds = run_stage_process(name, jsonl, log, limit, env_stage)
        rows.append((name, status, seconds))
        Recorder(jsonl, name)(kind="stage", status=status, seconds=round(seconds, 1))
    if build is not None and build.poll() is None:
        build.kill()
    print_summary(rows, jsonl, log, time.monotonic() - started)
    return 0


def start_build(log: Path, env: Dict[str, str]):
    """The extension build, in the background (a dry run only imports the installed package)."""
    if dry_run():
        command = [sys.executable, "-c", "import sparse_kernels"]
    else:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]
        note = "ninja found: parallel build" if shutil.which("ninja") else "ninja not found: files build one by one"
        with open(log, "a") as handle:
            handle.write(f"== build: {' '.join(command)} ({note})\n")
    handle = open(log, "a")
    return subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                            env={**env, "MAX_JOBS": str(os.cpu_count() or 4)})


def wait_for_build(build, limit: float, log: Path) -> float:
    start = time.monotonic()
    try:
        build.wait(timeout=max(1.0, limit - 5))
    except subprocess.TimeoutExpired:
        pass
    with open(log, "a") as handle:
        handle.write(f"== build: {'exit ' + str(build.returncode) if build.returncode is not None else 'still running'}\n")
    return time.monotonic() - start


def run_stage_process(name: str, jsonl: Path, log: Path, limit: float, env: Dict[str, str]):
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", name, "--jsonl", str(jsonl),
               "--stage-seconds", str(limit)]
    start = time.monotonic()
    with open(log, "a") as handle:
        handle.write(f"\n== stage {name} (at most {limit:.0f} s)\n")
        handle.flush()
        try:
            result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                    timeout=limit)
            status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    return status, time.monotonic() - start


def print_summary(rows, jsonl: Path, log: Path, seconds: float) -> None:
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    cases = [r for r in records if r.get("kind") == "case"]
    bad = [r for r in cases if not r["ok"]]
    print(f"\ngpu-check: {seconds:.0f} s; records in {jsonl}, output in {log}")
    print(f"{'stage':<14} {'status':<28} {'seconds':>8}")
    for name, status, took in rows:
        print(f"{name:<14} {status:<28} {took:>8.1f}")
    print(f"correctness cases: {len(cases) - len(bad)} of {len(cases)} within tolerance")
    if dry_run():
        print("(a dry run: Triton's interpreter on the CPU, so the times below mean nothing)")
    for r in bad[:10]:
        print(f"  OFF {r['family']} {r['op']} {r['dtype']} {r['case']}: {r['relative_error']:.3g}")
    for r in records:
        if r.get("kind") == "timing" and "ratio_to_dense" in r:
            print(f"  {r['family']} density {r['density']} (actual {r['actual_density']:.3f}): "
                  f"{r['ratio_to_dense']:.2f}x of dense, target <= {r['target']:.2f}: {'met' if r['meets'] else 'NOT met'}")
