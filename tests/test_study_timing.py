"""benchmarks.study_timing times every cell of a grid, keyed as the report groups runs, so that
a grid's ``wall_clock_from`` re-times its report."""
import dataclasses

import pytest
import yaml

from benchmarks import study_timing
from sparse_diffusion.study.grid import expand, load_grid
from sparse_diffusion.study.results import cell_key, load_timing


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DIFFUSION_CACHE", str(tmp_path / "cache"))


def _grid(tmp_path):
    grid = {
        "out": str(tmp_path / "runs"),
        "defaults": dict(model="pixel", dataset="fashion-mnist", preset="tiny", image_size=16, steps=4, batch_size=4,
                         update_interval=2, limit=64, checkpoint_every=2, eval_samples=0),
        "grid": {"sparsity": [0.5], "block_size": [4], "seed": [0, 1]},
        "studies": [{"name": "main", "grid": {"method": ["dense", "rigl"]}},
                    {"name": "exact", "regrow_dropped": False, "grid": {"method": ["rigl"]}}],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_every_cell_is_timed_once_under_the_reports_key(tmp_path):
    path = _grid(tmp_path)
    out = tmp_path / "timing.json"
    payload = study_timing.main([str(path), "--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1",
                                 "--out", str(out)])
    rows = {row["run"]: row for row in payload["rows"]}
    assert sorted(rows) == ["exact/rigl-s0.5-b4-d0.3", "main/dense", "main/rigl-s0.5-b4-d0.3"]
    # One seed per cell; the keys are those the report groups the grid's runs by.
    keys = {cell_key(dataclasses.asdict(run.config)) for run in expand(load_grid(str(path)))}
    timing, machine = load_timing(str(out))
    assert set(timing) == keys and machine["torch_threads"] == 1
    for row in rows.values():
        assert row["ms_per_step"] >= row["train_step_ms"] > 0 and row["checkpoint_every"] == 2
        assert row["io_ms_per_step"] == pytest.approx(row["checkpoint_ms"] / 2)
    # update_interval 2: the warm-up step is step 1, the timed ones 2 and 3, so one update each.
    assert rows["main/rigl-s0.5-b4-d0.3"]["mask_updates"] == rows["exact/rigl-s0.5-b4-d0.3"]["mask_updates"] == 1
    assert rows["main/dense"]["mask_updates"] == 0 and rows["main/dense"]["speedup_vs_dense"] == 1.0


def test_an_only_that_matches_no_cell_is_named(tmp_path):
    path = _grid(tmp_path)
    with pytest.raises(SystemExit, match=f"--only magran: no cell of {path} matches"):
        study_timing.main([str(path), "--only", "magran", "--threads", "1"])
