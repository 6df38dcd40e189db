"""`make gpu-check` cannot rot: its dry run (CPU, Triton's interpreter, tiny sizes) runs every
stage, and a stage forced to fail does not stop the ones after it."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["environment", "triton_smoke", "vector_smoke", "large", "headline", "after_build", "ddp_smoke", "gpu_tests"]


def _dry_run_env():
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("TRITON_INTERPRET", None)  # the check sets it for its own stages
    return env


def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    """One full dry run (they take a minute): the first stage is made to fail, and every stage
    after it still runs and passes."""
    fail = "environment"
    env = {**_dry_run_env(), "GPU_CHECK_FAIL_STAGE": fail}
    result = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}", f"GPU_CHECK_OUT={tmp_path}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (jsonl,) = tmp_path.glob("gpu-check-*-cpu-dry-run.jsonl")
    assert (tmp_path / jsonl.name.replace(".jsonl", ".log")).is_file()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    status = {r["stage"]: r["status"] for r in records if r["kind"] == "stage"}
    assert list(status) == STAGES
    for stage in STAGES:
        assert status[stage] == ("failed (exit 1)" if stage == fail else "ok"), (stage, status)
    cases = [r for r in records if r["kind"] == "case"]
    assert cases and all(r["ok"] for r in cases)
    assert {r["family"] for r in cases} == {"linear", "conv2d"}
    for stage in ("triton_smoke", "vector_smoke"):
        assert {r["op"] for r in cases if r["stage"] == stage} == {"fwd", "grad_input", "grad_weight"}
    assert {r["family"] for r in cases if r["stage"] == "vector_smoke"} == {"linear", "conv2d"}
    timings = [r for r in records if r["kind"] == "timing" and "target" in r]
    assert {r["family"] for r in timings} == {"linear", "conv2d"}
    assert "stage          status" in result.stdout  # the summary table


def test_gpu_check_environment_stage_records_the_machine(tmp_path):
    """The stage the full dry run fails on purpose, run on its own."""
    jsonl = tmp_path / "environment.jsonl"
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--stage", "environment", "--jsonl",
                             str(jsonl)], cwd=ROOT, env=_dry_run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert record["stage"] == "environment" and record["kind"] == "environment"
    assert record["dry_run"] is True and record["cpu_count"] == os.cpu_count()
    assert record["torch"] and "triton" in record and "missing_modules" in record
