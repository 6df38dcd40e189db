"""The grid report's convergence section, from hand-written run folders (no training)."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from sparse_diffusion.study.grid import expand, load_grid
from sparse_diffusion.study.report import write_report

# (step, training seconds, FID) per seed: dense, RigL (paper rule) and RigL exact-k at 50%,
# blocks of 16 unless named.
CURVES = {
    "dense": [[(500, 60, 80), (1000, 120, 50)], [(500, 62, 82), (1000, 124, 52)]],
    "rigl": [[(500, 40, 85), (1000, 80, 52)], [(500, 42, 87), (1000, 84, 54)]],
    "rigl exact-k": [[(500, 40, 90), (1000, 80, 70)], [(500, 42, 92), (1000, 84, 72)]],
    "rigl block 1": [[(500, 50, 80), (1000, 100, 48)], [(500, 52, 82), (1000, 104, 50)]],
    "rigl block 32": [[(500, 30, 88), (1000, 60, 60)], [(500, 32, 90), (1000, 64, 62)]],
    "rigl block 16x1": [[(500, 45, 82), (1000, 90, 49)], [(500, 46, 84), (1000, 92, 51)]],
}


def _grid(tmp_path, blocks=False):
    """Dense and RigL at 50%, blocks of 16, and RigL exact-k in a study of its own; with
    ``blocks`` (True: 1 and 32), a third study of RigL at those block sizes."""
    grid = {
        "out": str(tmp_path / "runs"),
        "defaults": {"model": "pixel", "steps": 1000, "eval_samples": 1000, "eval_every": 500, "block_size": 16},
        "grid": {"sparsity": [0.5], "seed": [0, 1]},
        "studies": [{"name": "main", "grid": {"method": ["dense", "rigl"]}},
                    {"name": "exact", "regrow_dropped": False, "grid": {"method": ["rigl"]}}]
        + ([{"name": "blocks", "grid": {"method": ["rigl"], "block_size": [1, 32] if blocks is True else blocks}}]
           if blocks else []),
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _write_run(run, curve, clean=True):
    folder = Path(run.config.out)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(run.config)))
    points = [{"step": s, "wall_clock_s": t, "load_1min": 2.0, "fid": f, "num_samples": 1000} for s, t, f in curve]
    step, seconds, fid = curve[-1]
    (folder / "metrics.json").write_text(json.dumps({
        "steps": step, "wall_clock_s": seconds, "seconds_per_step": seconds / step, "sparsity": 0.0 if run.config.method == "dense" else 0.5,
        "parameters": 1000, "flops_per_sample": 1e6, "state_bytes": 4096, "device": "cpu",
        "metrics": {"fid": fid, "num_samples": 1000}, "curve": points,
        "timing": {"cpu_threads": 2, "cpus": 2, "max_load_1min": 2.1 if clean else 3.5, "clean": clean},
    }))


def _write_runs(runs, unclean=None):
    """A folder per run with its CURVES entry; the run ``unclean`` = (curve name, seed) shared its machine."""
    for run in runs:
        name = run.config.method + ("" if run.config.regrow_dropped else " exact-k")
        if run.config.method != "dense" and run.config.block_size != 16:
            name += f" block {run.config.block_size}"
        _write_run(run, CURVES[name][run.config.seed], clean=(name, run.config.seed) != unclean)


def _report(tmp_path, blocks=False, unclean=None, seeds=(0, 1), **grid_changes):
    """The report of :func:`_grid` (with ``grid_changes``) over its runs of ``seeds``, each
    written by :func:`_write_runs`: its text, the grid and the runs."""
    grid = {**load_grid(str(_grid(tmp_path, blocks))), **grid_changes}
    runs = [run for run in expand(grid) if run.config.seed in seeds]
    _write_runs(runs, unclean)
    return write_report(tmp_path / "runs", grid, runs).read_text(), grid, runs


def test_the_report_answers_the_convergence_questions(tmp_path):
    text, _, _ = _report(tmp_path, unclean=("rigl", 1))
    # Final FIDs: dense 51 ± 1.4, RigL 53 ± 1.4, exact-k 71 ± 1.4 (two seeds each). Welch: the
    # standard error of a gap is sqrt(1 + 1), its degrees of freedom (1 + 1)^2 / (1 + 1) = 2 and
    # t(0.975, 2) = 4.303, so the 95% interval is ± 6.1: RigL's +2 is within it, exact-k's +20 not.
    assert "| dense | 0 | - | 2 | 51.0 ± 1.4 | - | - | - |" in text
    assert "| rigl | 0.5 | 16 | 2 | 53.0 ± 1.4 | +2.0 ± 6.1 | 2.0 | within noise |" in text and "| 1/2 |" in text
    assert "| rigl exact-k | 0.5 | 16 | 2 | 71.0 ± 1.4 | +20.0 ± 6.1 | 2.0 | worse |" in text
    # Budgets 0.25 / 0.5 / 1 x dense's 122 s, each curve read between its evaluations: nobody has
    # evaluated by 30.5 s; at 61 s dense's seed 0 has (79.5) but seed 1 not yet, so dense is not
    # read from its seed 0 alone; RigL 85 - 33 x 21 / 40 and 87 - 33 x 19 / 42: 69.9; at 122 s
    # dense 50 (finished) and 82 - 30 x 60 / 62 = 53.0: 51.5, RigL 53.
    assert "| dense | 0 | - | - | - | 51.5 |" in text
    assert "| rigl | 0.5 | 16 | - | 69.9 | 53.0 |" in text
    assert "0.5 min: no evaluation yet; 1.0 min: rigl at sparsity 0.5, block 16 (69.9); " in text
    assert "2.0 min: dense at sparsity 0, block - (51.5)" in text
    # Targets: dense's FID at step 500 (the evaluation nearest a third and two thirds of its 1,000
    # steps), 81, and its final 51 + 10% = 56.1, where each curve crosses them. 81: dense's seed 0
    # at its first evaluation (60 s), seed 1 at 62 + 62 / 30 s (1.0 min); RigL at 40 + 40 x 4 / 33
    # and 42 + 42 x 6 / 33 s (0.8 min); exact-k at 40 + 40 x 9 / 20 and 42 + 42 x 11 / 20 s (1.0 min).
    # 56.1: dense at 60 + 60 x 23.9 / 30 and 62 + 62 x 25.9 / 30 s (1.9 min), RigL at
    # 40 + 40 x 28.9 / 33 and 42 + 42 x 30.9 / 33 s (1.3 min), exact-k never.
    assert "(81.0: dense's FID at step 500; 56.1: dense's final FID 51.0 + 10%)" in text
    assert "| dense | 0 | - | 1.0 (2/2) | 1.9 (2/2) |" in text and "| rigl | 0.5 | 16 | 0.8 (2/2) | 1.3 (2/2) |" in text
    assert "| rigl exact-k | 0.5 | 16 | 1.0 (2/2) | - (0/2) |" in text
    # exact-k's 61.6 s to 81 is just ahead of dense's 62.0 s.
    assert ("Sooner than dense, every seed: FID 81.0 (dense 1.0 min): rigl at sparsity 0.5, block 16 (0.8 min); "
            "rigl exact-k at sparsity 0.5, block 16 (1.0 min). FID 56.1 (dense 1.9 min): rigl at sparsity 0.5, "
            "block 16 (1.3 min).") in text
    assert "| rigl | 0.5 | 16 | 0.3 | 53.0 ± 1.4 | 71.0 ± 1.4 |" in text  # growth rule: paper vs exact-k
    for plot in ("runs-fid-vs-steps.png", "runs-fid-vs-wall-clock.png"):
        assert (tmp_path / "runs" / "plots" / plot).stat().st_size > 0 and f"(plots/{plot})" in text
    assert "Block size at equal" not in text and "Structures side by side" not in text  # one block size
    assert not (tmp_path / "runs" / "plots" / "runs-final-fid-vs-block.png").exists()
    assert not (tmp_path / "runs" / "plots" / "runs-fid-vs-wall-clock-by-block.png").exists()


def test_block_sizes_and_growth_rules_compare_cells_that_differ_in_that_alone(tmp_path):
    """Blocks of 1 and 32 (their own study) sit beside the paper rule's blocks of 16, not beside
    exact-k's; the growth rules compare at blocks of 16, where both ran, not with blocks of 32."""
    text, _, _ = _report(tmp_path, blocks=True)
    blocks = text[text.index("Block size at equal target sparsity"):text.index("Growth rule")]
    assert "| method | sparsity | drop | block 1 | block 16 | block 32 |" in blocks
    assert "| rigl | 0.5 | 0.3 | 49.0 ± 1.4 (0.50) | 53.0 ± 1.4 (0.50) | 61.0 ± 1.4 (0.50) |" in blocks
    assert "exact-k" not in blocks  # exact-k ran at one block size
    rules = text[text.index("Growth rule"):]
    assert "| method | sparsity | block | drop | paper rule | exact k |" in rules
    assert "| rigl | 0.5 | 16 | 0.3 | 53.0 ± 1.4 | 71.0 ± 1.4 |" in rules and "| rigl | 0.5 | 32 |" not in rules
    plot = "runs-final-fid-vs-block.png"
    assert (tmp_path / "runs" / "plots" / plot).stat().st_size > 0 and f"(plots/{plot})" in text


def test_vector_blocks_take_their_place_between_unstructured_and_square_blocks(tmp_path):
    """``block_size: 16x1`` in a grid: its runs are named b16x1, and the report orders block
    shapes by weights per block (1, 16x1 = 16, 16x16 = 256, 32x32 = 1024)."""
    text, _, runs = _report(tmp_path, blocks=[32, "16x1", 1])
    assert {run.name for run in runs if run.study == "blocks"} == {
        f"rigl-s0.5-b{block}-d0.3-seed{seed}" for block in ("1", "16x1", "32") for seed in (0, 1)}
    blocks = text[text.index("Block size at equal target sparsity"):text.index("Growth rule")]
    assert "| method | sparsity | drop | block 1 | block 16x1 | block 16 | block 32 |" in blocks
    assert "| rigl | 0.5 | 0.3 | 49.0 ± 1.4 (0.50) | 50.0 ± 1.4 (0.50) | 53.0 ± 1.4 (0.50) | 61.0 ± 1.4 (0.50) |" in blocks
    assert "| rigl | 0.5 | 16x1 | 2 | 50.0 ± 1.4 |" in text
    for plot in ("runs-final-fid-vs-block.png", "runs-fid-vs-wall-clock-by-block.png"):
        assert (tmp_path / "runs" / "plots" / plot).stat().st_size > 0 and f"(plots/{plot})" in text
    # The structures side by side (Static / RigL / MagRan; only RigL ran): final FID, speed-up
    # (dense's 0.122 s / step over the cell's) and minutes to dense's 51 + 10% = 56.1 (16x1: at
    # 45 + 45 x 25.9 / 33 and 46 + 46 x 27.9 / 33 s, 1.4 min), which blocks of 32 never reach.
    structures = text[text.index("Structures side by side"):text.index("Block size at equal")]
    assert "| 0 | dense | 51.0 | 1.00 | 1.9 |" in structures
    assert structures.index("| 0.5 | 1 |") < structures.index("| 0.5 | 16x1 |") < structures.index("| 0.5 | 16 |")
    assert "| 0.5 | 16x1 | - / 50.0 / - | - / 1.34 / - | - / 1.4 / - |" in structures
    assert "| 0.5 | 32 | - / 61.0 / - | - / 1.97 / - | - / - / - |" in structures


def _timing_file(path, seconds_per_step):
    """A benchmarks.study_timing result: ``seconds_per_step`` by cell key."""
    rows = [{"run": str(key), "key": list(key), "ms_per_step": s * 1000} for key, s in seconds_per_step.items()]
    path.write_text(json.dumps({"suite": "study_timing", "environment": {"cpu": "Test CPU", "torch_threads": 2,
                                                                         "date": "2026-12-03T00:00:00"},
                                "rows": rows}))
    return path


def test_the_report_retimes_runs_from_one_machines_step_times(tmp_path):
    """With ``wall_clock_from``, a cell's wall-clock at step s is s x its measured s / step;
    a cell missing from that file keeps its own, marked."""
    timing = _timing_file(tmp_path / "timing.json", {("dense", 0.0, None, None, False, "pixel demo"): 0.1,
                                                     ("rigl", 0.5, 16, 0.3, False, "pixel demo"): 0.05})
    text, _, _ = _report(tmp_path, wall_clock_from=str(timing))
    assert "re-timed" in text and "Test CPU, 2 threads, 2026-12-03" in text
    assert "1 finished cell(s) are not in that file" in text
    # Dense 1,000 steps x 0.1 s = 100 s; RigL 0.05 s / step (own: 80 and 84 s for 1,000 steps).
    assert "| dense | 0 | - | 2 | 51.0 ± 1.4 | - | - | - | 0.100 | 1.00 | 1.7 | 0.122 | 2/2 |" in text
    assert "| rigl | 0.5 | 16 | 2 | 53.0 ± 1.4 | +2.0 ± 6.1 | 2.0 | within noise | 0.050 | 2.00 | 0.8 | 0.082 | 2/2 |" in text
    assert "| rigl exact-k | 0.5 | 16 | 2 | 71.0 ± 1.4 | +20.0 ± 6.1 | 2.0 | worse | 0.082 (own) | 1.22 | 1.4 | 0.082 | 2/2 |" in text
    # Budgets 25 / 50 / 100 s: RigL's step 500 is at 25 s, dense's at 50 s; exact-k keeps its own
    # clock (step 500 at 40 and 42 s): at 50 s 90 - 20 x 10 / 40 and 92 - 20 x 8 / 42, 86.6.
    assert "| dense | 0 | - | - | 81.0 | 51.0 |" in text
    assert "| rigl | 0.5 | 16 | 86.0 | 53.0 | 53.0 |" in text
    assert "| rigl exact-k | 0.5 | 16 | - | 86.6 | 71.0 |" in text
    # Targets 81 and 56.1 between steps 500 and 1,000: dense at 50 and 50 + 50 / 30 s (50.8 s), then
    # 50 + 50 x 23.9 / 30 and 50 + 50 x 25.9 / 30 s (91.5 s); RigL at 25 + 25 x 4 / 33 and
    # 25 + 25 x 6 / 33 s (28.8 s), then 25 + 25 x 28.9 / 33 and 25 + 25 x 30.9 / 33 s (47.6 s).
    assert "| dense | 0 | - | 0.8 (2/2) | 1.5 (2/2) |" in text and "| rigl | 0.5 | 16 | 0.5 (2/2) | 0.8 (2/2) |" in text


def test_a_missing_or_wrong_timing_file_is_named(tmp_path):
    text, grid, runs = _report(tmp_path, wall_clock_from=str(tmp_path / "nowhere.json"))
    assert f"wall_clock_from names {tmp_path / 'nowhere.json'}, which does not exist yet" in text
    assert "| dense | 0 | - | 2 | 51.0 ± 1.4 | - | - | - | 0.122 | 1.00 | 2.0 | 0.122 | 2/2 |" in text
    older = _timing_file(tmp_path / "older.json", {("dense", 0.0, None, None, False): 0.1})  # keyed without the model
    with pytest.raises(ValueError, match=f"wall_clock_from {older}: its cells are keyed without the model"):
        write_report(tmp_path / "runs", {**grid, "wall_clock_from": str(older)}, runs)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"suite": "train_loop", "rows": []}))
    with pytest.raises(ValueError, match=f"wall_clock_from {wrong}: not a benchmarks.study_timing result"):
        write_report(tmp_path / "runs", {**grid, "wall_clock_from": str(wrong)}, runs)


def test_a_single_seed_states_no_spread(tmp_path):
    """One finished seed has no standard deviation: its FID prints alone, not "± 0.0"; a run
    that did not record its CPU is counted as such in the re-timing sentence."""
    timing = _timing_file(tmp_path / "timing.json", {("dense", 0.0, None, None, False, "pixel demo"): 0.1})
    text, _, _ = _report(tmp_path, seeds=(0,), wall_clock_from=str(timing))
    assert "| dense | 0 | - | 1 | 50.0 | - |" in text
    assert "| rigl | 0.50 (0.50) | 16 | 0.3 | 1 | 52.0 | 1,000 |" in text
    assert "| rigl | 0.5 | 16 | 0.3 | 52.0 | 70.0 |" in text  # growth rule: paper vs exact-k
    assert "± 0.0" not in text
    assert "run on 1 kind(s) of machine: not recorded" in text


def test_a_study_without_dense_compares_with_the_dense_run_trained_the_same_way(tmp_path):
    """The exact-k study has no dense run: its speed-ups, headline and plots use the main
    study's dense (same model, data and training), named; a different setup borrows nothing."""
    text, grid, runs = _report(tmp_path)
    exact = text[text.index("## exact"):text.index("## Convergence")]
    assert "No dense run of its own: dense is study main's" in exact
    # Dense's own s / step 0.122, exact-k's 0.082: 1.49x.
    assert "| dense (study main) | 0.00 (0.00) | - | - | 2 | 51.0 ± 1.4 |" in exact
    assert "| rigl exact-k (drop 0.3) | 71.0 ± 1.4 (1.49x) |" in exact
    assert "| dense (study main) | 51.0 ± 1.4 (1.00x) |" in exact
    assert not (tmp_path / "runs" / "plots" / "exact-fid-vs-block.png").exists()  # one block size

    for run in runs:
        if run.study == "exact":
            config = json.loads((Path(run.config.out) / "config.json").read_text())
            (Path(run.config.out) / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    text = write_report(tmp_path / "runs", grid, runs).read_text()
    exact = text[text.index("## exact"):text.index("## Convergence")]
    assert "dense (study" not in exact and "| rigl exact-k (drop 0.3) | 71.0 ± 1.4 (-x) |" in exact


def test_welch_agrees_with_scipys_test_on_the_raw_fids():
    """The gap, its 95% interval and the degrees of freedom from the rows' means and spreads are
    scipy's Welch test on the seeds' FIDs themselves (unequal seeds and spreads)."""
    stats = pytest.importorskip("scipy.stats")
    from sparse_diffusion.study.convergence import welch
    from sparse_diffusion.study.results import mean_std

    sparse, dense = [44.0, 47.5, 45.1], [38.2, 38.9]
    rows = []
    for fids in (sparse, dense):
        mean, std = mean_std(fids)
        rows.append({"fid": mean, "fid_std": std, "seeds": len(fids)})
    gap, half_width, freedom = welch(*rows)
    test = stats.ttest_ind(sparse, dense, equal_var=False)
    low, high = test.confidence_interval(0.95)
    assert gap == pytest.approx((low + high) / 2) and half_width == pytest.approx((high - low) / 2)
    assert freedom == pytest.approx(test.df)
    assert welch({**rows[0], "seeds": 1}, rows[1]) is None  # one seed: no spread to test with
    assert welch({**rows[0], "fid_std": 0.0}, {**rows[1], "fid_std": 0.0}) is None


def test_curves_are_read_between_evaluations():
    """FID at a budget and time to a target come from the curve interpolated between its
    evaluations; a curve already below the target at its first evaluation reaches it there."""
    from sparse_diffusion.study.convergence import fid_at, time_to

    curve = [{"step": 1, "wall_clock_s": 10.0, "fid": 90.0}, {"step": 2, "wall_clock_s": 20.0, "fid": 60.0},
             {"step": 3, "wall_clock_s": 30.0, "fid": 50.0}]
    assert fid_at(curve, 9.9) is None and fid_at(curve, 10.0) == 90.0
    assert fid_at(curve, 15.0) == pytest.approx(75.0) and fid_at(curve, 99.0) == 50.0
    assert time_to(curve, 75.0) == pytest.approx(15.0) and time_to(curve, 55.0) == pytest.approx(25.0)
    assert time_to(curve, 95.0) == 10.0 and time_to(curve, 49.9) is None


def test_a_cell_is_read_at_a_budget_only_once_every_seed_has_evaluated():
    """The equal-wall-clock table and the frontier read a cell by one rule: the mean over its
    seeds, none until the slowest seed's first evaluation (not its luckiest seeds alone)."""
    from sparse_diffusion.study.convergence import fid_by

    fast = [{"step": 1, "wall_clock_s": 10.0, "fid": 90.0}, {"step": 2, "wall_clock_s": 20.0, "fid": 60.0}]
    slow = [{"step": 1, "wall_clock_s": 30.0, "fid": 80.0}]
    row = {"curves": [fast, slow]}
    assert fid_by(row, 20.0) is None and fid_by(row, 30.0) == pytest.approx(70.0)
    assert fid_by({"curves": []}, 30.0) is None


def test_local_fds_compare_only_within_one_local_network(tmp_path):
    """The local FD sits beside Inception FID; a cell is compared with dense on it only when both
    name the same local network, and the cells where the two metrics disagree are named."""
    _, grid, runs = _report(tmp_path)
    local = {("dense", True): (0.5, "aaa"), ("rigl", True): (0.4, "aaa"), ("rigl", False): (0.9, "bbb")}
    for run in runs:
        path = Path(run.config.out) / "metrics.json"
        result = json.loads(path.read_text())
        fd, network = local[(run.config.method, run.config.regrow_dropped)]
        result["metrics"].update(fd_local=fd + run.config.seed / 100, local_network=network)
        path.write_text(json.dumps(result))
    text = write_report(tmp_path / "runs", grid, runs).read_text()
    assert "| dense | 0 | - | 51.0 | - | 0.505 | - | aaa |" in text
    assert "| rigl | 0.5 | 16 | 53.0 | higher | 0.405 | lower | aaa |" in text
    assert "| rigl exact-k | 0.5 | 16 | 71.0 | higher | 0.905 | - | bbb |" in text
    assert "They put these cells on opposite sides of dense: rigl at sparsity 0.5, block 16." in text
    assert "1 cell(s) do not share dense's recorded network" in text


def test_the_frontier_names_the_best_cell_by_each_budget(tmp_path):
    """From 62 s (every seed has evaluated once) to 124 s (the longest run), 24 budgets on a log
    scale: RigL (finished at 53 by 84 s) is best until dense's seeds, read between evaluations,
    average below 53, between the budgets at 116.8 s (51.6 and 55.5) and 120.3 s (50 and 53.8)."""
    text, _, _ = _report(tmp_path)
    frontier = text[text.index("FID-vs-wall-clock frontier"):]
    # RigL's largest lead is at the budget of 62 x 2^(9/23) = 81.4 s, just after its seed 0 has
    # finished: dense 80 - 30 x 21.4 / 60 and 82 - 30 x 19.4 / 62 (70.9) against RigL's 52 and
    # 87 - 33 x 39.4 / 42 (54.0).
    assert "| 1.0 - 1.9 | rigl 0.5 16 | 53.0 | 53.6 | 16.9 |" in frontier
    assert "| 2.0 - 2.1 | dense | 51.0 | 51.0 | 0.0 |" in frontier
    assert "Sparse cells on the frontier: rigl 0.5 16 from 1.0 to 1.9 min (by up to 16.9 FID)." in frontier
    assert (tmp_path / "runs" / "plots" / "runs-frontier.png").stat().st_size > 0
    assert "(plots/runs-frontier.png)" in frontier


SMALL = {"dense": [[(500, 120, 70), (1000, 240, 40)], [(500, 124, 72), (1000, 248, 42)]],
         "rigl": [[(500, 80, 75), (1000, 160, 45)], [(500, 84, 77), (1000, 168, 47)]]}


def test_model_sizes_each_compare_with_their_own_dense_and_share_one_frontier(tmp_path):
    """Two model sizes in one grid: a cell is keyed by its model, each size is compared with its
    own dense (gaps, speed-ups), and the frontier runs over both, naming the model."""
    grid = {"out": str(tmp_path / "runs"),
            "defaults": {"model": "pixel", "steps": 1000, "eval_samples": 1000, "eval_every": 500, "block_size": 16},
            "grid": {"sparsity": [0.5], "seed": [0, 1], "method": ["dense", "rigl"]},
            "studies": [{"name": "demo", "preset": "demo"}, {"name": "small", "preset": "small"}]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    grid = load_grid(str(path))
    runs = expand(grid)
    for run in runs:
        curves = CURVES if run.config.preset == "demo" else SMALL
        _write_run(run, curves[run.config.method][run.config.seed])
    text = write_report(tmp_path / "runs", grid, runs).read_text()
    demo = text[text.index("## Convergence (runs-pixel-demo)"):text.index("## Convergence (runs-pixel-small)")]
    small = text[text.index("## Convergence (runs-pixel-small)"):text.index("## FID-vs-wall-clock frontier")]
    assert "| rigl | 0.5 | 16 | 2 | 53.0 ± 1.4 | +2.0 ± 6.1 | 2.0 | within noise | 0.082 | 1.49 |" in demo
    # Small: dense 41 at 0.244 s / step, RigL 46 at 0.164.
    assert "| dense | 0 | - | 2 | 41.0 ± 1.4 | - | - | - | 0.244 | 1.00 |" in small
    assert "| rigl | 0.5 | 16 | 2 | 46.0 ± 1.4 | +5.0 ± 6.1 | 2.0 | within noise | 0.164 | 1.49 |" in small
    # Budgets 124 x 2^(i / 23) s: demo dense (finished, 51) leads until small RigL's seeds average
    # below 51 (148.6 s: 51.6, 153.1 s: 50.0), small RigL until small dense's average below its 46
    # (219.8 s: 46.9, 226.6 s: 45.3), then small dense; RigL leads the best dense (demo's 51) by 5.0
    # once it has finished.
    frontier = text[text.index("## FID-vs-wall-clock frontier"):]
    cells = [line.split(" | ")[1] for line in frontier.splitlines() if line.startswith("| 2.") or line.startswith("| 3.")
             or line.startswith("| 4.")]
    assert cells == ["pixel demo dense", "pixel small rigl 0.5 16", "pixel small dense"]
    assert "Sparse cells on the frontier: pixel small rigl 0.5 16 from 2.6 to 3.7 min (by up to 5.0 FID)." in frontier
    # Targets: each dense's mean FID at step 500 (demo 81, small 71) and final (51, 41). Demo RigL
    # reaches 81 at (40 + 40 x 4/33 + 42 + 42 x 6/33) / 2 = 47.2 s; small RigL reaches 51 at
    # (80 + 80 x 24/30 + 84 + 84 x 26/30) / 2 = 150.4 s, before small dense (196 and 210.8 s), and
    # demo dense's seed 1 never does (52); only small dense's seed 0 reaches 41 (236 s).
    across = frontier[frontier.index("Time to quality across model sizes"):]
    assert "| pixel demo dense | 1.0 (2/2) | 1.4 (2/2) | 2.0 (1/2) | - (0/2) |" in across
    assert "| pixel demo rigl 0.5 16 | 0.8 (2/2) | 1.0 (2/2) | - (0/2) | - (0/2) |" in across
    assert "| pixel small dense | 2.0 (2/2) | 2.1 (2/2) | 3.4 (2/2) | 3.9 (1/2) |" in across
    assert "| pixel small rigl 0.5 16 | 1.4 (2/2) | 1.6 (2/2) | 2.5 (2/2) | - (0/2) |" in across
    assert ("First to each target, every seed: 81.0 (pixel demo dense's FID at step 500): pixel demo rigl 0.5 16 "
            "at 0.8 min; 71.0 (pixel small dense's FID at step 500): pixel demo rigl 0.5 16 at 1.0 min; 51.0 (pixel "
            "demo dense's final FID 51.0): pixel small rigl 0.5 16 at 2.5 min; 41.0 (pixel small dense's final FID "
            "41.0): no cell with every seed.") in across
