"""The committed study reports are what the generator writes from the committed run folders:
a report is the one source of its numbers, so it must never drift from them (or from the code)."""
import shutil
from pathlib import Path

import pytest

from sparse_diffusion.study.runner import run_grid

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = [("experiments/steps-6000.yaml", "experiments/results/steps-6000"),
             ("experiments/cpu-small.yaml", "experiments/results/cpu-small")]


@pytest.mark.parametrize("grid, results", COMMITTED, ids=[Path(g).stem for g, _ in COMMITTED])
def test_a_committed_report_is_rebuilt_byte_for_byte(grid, results, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(ROOT)  # grids name their timing files relative to the repository
    committed = ROOT / results
    copy = tmp_path / committed.name
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("report.md", "plots"))
    run_grid(grid, out=str(copy), report_only=True)
    assert (copy / "report.md").read_text() == (committed / "report.md").read_text(), (
        f"{results}/report.md is stale: rebuild it with `sparse-diffusion experiment {grid} --out {results} "
        "--report-only`")
    assert sorted(p.name for p in (copy / "plots").glob("*.png")) == sorted(
        p.name for p in (committed / "plots").glob("*.png")), "the committed plots are not the ones the report links"
