"""sparse-diffusion experiment: grid expansion, resumable runs, and a report read from the run folders."""
import json

import pytest
import yaml

from sparse_diffusion import cli
from sparse_diffusion.study.grid import expand, load_grid
from sparse_diffusion.study.runner import run_grid


@pytest.fixture(autouse=True)
def _fast_and_private(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DIFFUSION_CACHE", str(tmp_path / "cache"))


def _grid(tmp_path, **changes):
    grid = {
        "out": str(tmp_path / "runs"),
        "defaults": dict(preset="tiny", image_size=16, steps=4, batch_size=4, update_interval=2, sample_steps=2,
                         limit=64, checkpoint_every=2, eval_samples=0),
        "grid": {"method": ["dense", "static", "rigl"], "sparsity": [0.5], "drop_fraction": [0.05, 0.3],
                 "block_size": [1, 16], "seed": [0, 1]},
        "studies": [{"name": "fashion-pixel", "model": "pixel", "dataset": "fashion-mnist"}],
    }
    grid.update(changes)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_expansion_skips_axes_a_method_ignores(tmp_path):
    runs = expand(load_grid(str(_grid(tmp_path))))
    names = [r.name for r in runs]
    # dense once per seed; static once per block and seed; rigl per drop fraction too.
    assert names.count("dense-seed0") == 1 and len(names) == len(set(names))
    assert len(runs) == 2 + 2 * 2 + 2 * 2 * 2
    rigl = next(r for r in runs if r.name == "rigl-s0.5-b16-d0.05-seed1")
    assert (rigl.config.method, rigl.config.block_size, rigl.config.drop_fraction, rigl.config.seed) == (
        "rigl", 16, 0.05, 1)
    assert rigl.config.out == str(tmp_path / "runs" / "fashion-pixel" / "rigl-s0.5-b16-d0.05-seed1")


def test_a_study_overrides_the_grid_axes_and_defaults(tmp_path):
    """The study's settings beat the grid's: its axis list beats a grid-wide single value
    (``defaults: {block_size: 16}``), and its single value beats a grid-wide list."""
    runs = expand(load_grid(str(_grid(
        tmp_path, defaults={"preset": "tiny", "block_size": 16}, grid={"method": ["static"]},
        studies=[{"name": "blocks", "model": "pixel", "grid": {"block_size": [1, 32]}},
                 {"name": "plain", "model": "pixel", "grid": {"seed": [0, 1]}, "seed": 5}]))))
    assert [(r.study, r.config.block_size, r.config.seed) for r in runs] == [
        ("blocks", 1, 0), ("blocks", 32, 0), ("plain", 16, 5)]


@pytest.mark.parametrize("change, match", [
    ({"defaults": {"stepz": 3}}, "unknown training options"),
    ({"grid": {"method": ["dense", "prune"]}}, "unknown methods"),
    ({"grid": {"colour": [1]}}, "unknown grid axes"),
    ({"grid": {"seed": 3}}, "non-empty list"),
    ({"studies": []}, "needs 'out'"),
    ({"extra": 1}, "unknown top-level keys"),
    ({"wall_clock_from": [1]}, "'wall_clock_from' must be the path"),
])
def test_bad_grids_are_refused_naming_the_problem(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        load_grid(str(_grid(tmp_path, **change)))


def test_runs_resume_and_report_from_folders(tmp_path, monkeypatch):
    grid_path = _grid(tmp_path, grid={"method": ["dense", "rigl"], "sparsity": [0.5], "block_size": [1, 16],
                                      "seed": [0, 1]})
    root = tmp_path / "runs"
    report = run_grid(str(grid_path))
    text = report.read_text()
    assert "6 of 6 runs finished" in text
    assert "| rigl | 0.50 (0.5" in text and "| 16 | 0.3 | 2 |" in text and "| dense | 0.00 (0.00) | - | - | 2 |" in text
    assert (root / "plots" / "fashion-pixel-speedup-vs-sparsity.png").exists()
    metrics = json.loads((root / "fashion-pixel" / "rigl-s0.5-b16-d0.3-seed0" / "metrics.json").read_text())
    assert metrics["state_bytes"] > 0 and metrics["steps"] == 4

    # A second call trains nothing; a changed number in a run folder shows in the rebuilt report.
    import sparse_diffusion.train as train

    monkeypatch.setattr(train.Trainer, "train", lambda self: pytest.fail("a finished run was trained again"))
    path = root / "fashion-pixel" / "dense-seed0" / "metrics.json"
    result = json.loads(path.read_text())
    result["parameters"] = 123456789
    path.write_text(json.dumps(result))
    assert "123,456,789" in run_grid(str(grid_path)).read_text()


def test_a_study_reads_another_grids_finished_runs_in_place_and_trains_none(tmp_path, monkeypatch, capsys):
    """``runs_from``: a second grid reuses the first's runs (one report over both studies), never
    trains them, even unfinished, and refuses a finished one trained with other settings."""
    first = _grid(tmp_path, grid={"method": ["dense", "rigl"], "sparsity": [0.5], "block_size": [16], "seed": [0]})
    run_grid(str(first))
    reused = str(tmp_path / "runs" / "fashion-pixel")
    studies = [{"name": "old", "model": "pixel", "runs_from": reused},
               {"name": "new", "model": "pixel", "grid": {"method": ["static"]}}]
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump({**yaml.safe_load(first.read_text()), "out": str(tmp_path / "second"),
                                      "studies": studies}))
    import sparse_diffusion.train as train

    trained = []
    real_train = train.Trainer.train
    monkeypatch.setattr(train.Trainer, "train", lambda self: trained.append(self.config.out) or real_train(self))
    text = run_grid(str(second)).read_text()
    assert trained == [str(tmp_path / "second" / "new" / "static-s0.5-b16-seed0")]
    assert "3 of 3 runs finished" in text and not (tmp_path / "second" / "old").exists()

    changed = yaml.safe_load(second.read_text())
    changed["defaults"]["lr"] = 0.5
    second.write_text(yaml.safe_dump(changed))
    with pytest.raises(ValueError, match=r"dense-seed0 was trained with other settings than the grid gives it: lr 0.001 against 0.5$"):
        run_grid(str(second), report_only=True)
    changed["defaults"].pop("lr")
    changed["grid"]["seed"] = [0, 1]
    second.write_text(yaml.safe_dump(changed))
    run_grid(str(second), dry_run=True)  # dense-seed1 is the first grid's to train, not this one's
    out = capsys.readouterr().out
    assert "elsewhere  old/dense-seed1" in out and "todo  new/static-s0.5-b16-seed1" in out
    assert f"not finished where they live (the grid that owns them trains them): {reused}/dense-seed1" in out
    changed["studies"][0]["autoencoder"] = {"steps": 3}
    second.write_text(yaml.safe_dump(changed))
    with pytest.raises(ValueError, match="'runs_from' must be the folder"):
        load_grid(str(second))


def test_failed_runs_are_listed_and_the_grid_goes_on(tmp_path, capsys):
    grid_path = _grid(tmp_path, grid={"method": ["dense"], "seed": [0]},
                      studies=[{"name": "broken", "model": "pixel", "dataset": "images:/no/such/folder"},
                               {"name": "fine", "model": "pixel", "dataset": "fashion-mnist"}])
    assert cli.main(["experiment", str(grid_path)]) == 0
    text = (tmp_path / "runs" / "report.md").read_text()
    assert "1 of 2 runs finished" in text and "## Failed runs" in text and "broken/dense-seed0" in text
    assert cli.main(["experiment", str(grid_path), "--dry-run"]) == 0
    assert "todo  broken/dense-seed0" in capsys.readouterr().out


@pytest.mark.parametrize("name, runs", [("cpu-small", 40), ("paper", 1458), ("steps-6000", 68), ("time-to-quality", 30)])
def test_shipped_grids_load(name, runs):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / f"{name}.yaml"
    assert len(expand(load_grid(str(path)))) == runs


def test_print_commands_gives_one_command_per_run_left_that_trains_that_run(tmp_path, capsys):
    import shlex

    grid_path = _grid(tmp_path, grid={"method": ["dense", "rigl"], "sparsity": [0.5], "block_size": [16],
                                      "seed": [0]},
                      studies=[{"name": "exact-k", "model": "pixel", "regrow_dropped": False}])
    runs = expand(load_grid(str(grid_path)), str(tmp_path / "runs"))
    assert not runs[1].config.regrow_dropped  # a boolean setting travels as --no-regrow-dropped
    assert cli.main(["experiment", str(grid_path), "--print-commands", "--nproc-per-node", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(runs) == 2 and not (tmp_path / "runs").exists()  # nothing trained
    for line, run in zip(lines, runs):
        words = shlex.split(line)
        assert words[:5] == ["torchrun", "--standalone", "--nproc-per-node=4", "-m", "sparse_diffusion"]
        args = cli.build_parser().parse_args(words[5:])
        fields = {name: getattr(args, name) for name in vars(run.config)}
        assert fields == vars(run.config) and not args.resume  # the command trains exactly this run

    assert cli.main(["experiment", str(grid_path), "--print-commands"]) == 0
    assert all(line.startswith("sparse-diffusion train ") for line in capsys.readouterr().out.strip().splitlines())


def test_print_commands_puts_the_autoencoders_first(tmp_path, capsys):
    grid_path = _grid(tmp_path, grid={"method": ["dense"], "seed": [0]},
                      studies=[{"name": "ldm", "model": "ldm", "dataset": "fashion-mnist",
                                "autoencoder": {"preset": "tiny", "steps": 3}}])
    assert cli.main(["experiment", str(grid_path), "--print-commands"]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first.startswith("sparse-diffusion train-autoencoder --dataset fashion-mnist --preset tiny --steps 3")
    assert f"--out {tmp_path / 'runs' / 'ldm' / 'autoencoder'}" in first
    assert second.startswith("sparse-diffusion train ") and f"--autoencoder {tmp_path / 'runs' / 'ldm'}" in second


def test_a_grid_runs_each_run_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    grid_path = _grid(tmp_path, grid={"method": ["rigl"], "sparsity": [0.5], "block_size": [16], "seed": [0]})
    assert cli.main(["experiment", str(grid_path), "--nproc-per-node", "2"]) == 0
    (metrics,) = (tmp_path / "runs").rglob("metrics.json")
    assert json.loads(metrics.read_text())["world_size"] == 2
    assert "1 of 1 runs finished" in (tmp_path / "runs" / "report.md").read_text()


def test_a_signal_stops_the_grid_not_only_its_run(tmp_path, capsys, monkeypatch):
    """SIGTERM during a run saves its checkpoint and stops the whole grid (exit 143); the next
    invocation resumes that run. A run that fails otherwise is recorded and the grid goes on."""
    import os
    import signal

    import sparse_diffusion.train as train_module

    draw_batch, calls = train_module.draw_batch, []

    def terminated_during_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return draw_batch(*args, **kwargs)

    monkeypatch.setattr(train_module, "draw_batch", terminated_during_step_two)
    grid_path = _grid(tmp_path, grid={"method": ["dense"], "seed": [0, 1]})
    assert cli.main(["experiment", str(grid_path)]) == 143
    assert "stopped by SIGTERM after step 2" in capsys.readouterr().err
    assert (tmp_path / "runs" / "fashion-pixel" / "dense-seed0" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "runs" / "fashion-pixel" / "dense-seed1").exists()
    monkeypatch.setattr(train_module, "draw_batch", draw_batch)
    assert cli.main(["experiment", str(grid_path)]) == 0
    assert "(resuming)" in capsys.readouterr().out


def test_the_training_code_never_imports_the_study():
    """sparse_diffusion.study uses the training layer; only the CLI's ``experiment`` command
    reaches back into it (every import statement read, those inside functions too)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "sparse_diffusion"
    offending = []
    for path in sorted(package.rglob("*.py")):
        if "study" in path.relative_to(package).parts or path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or "", *(alias.name for alias in node.names)] if isinstance(node, ast.ImportFrom) else [])
            if any(name == "study" or ".study" in name or name.startswith("study.") for name in names):
                offending.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offending == []
