"""Run folders written by older versions (sparse_diffusion.migrations): they load and resume
as they were trained, and an old pickle checkpoint is refused without being read."""
import json

import pytest
from diffusion_runs import TINY_ARGS, assert_one_line_error, run_cli, tiny, trained_run  # noqa: F401

from sparse_diffusion.checkpoint import CheckpointError, load_state, save_state
from sparse_diffusion.migrations import LEGACY_CHECKPOINT, migrate_checkpoint, migrate_config, refuse_legacy_checkpoint
from sparse_diffusion.run import load_run
from sparse_diffusion.train import CHECKPOINT


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DIFFUSION_CACHE", str(tmp_path / "cache"))


def test_a_rigl_run_from_before_regrow_dropped_goes_on_as_it_was_trained(trained_run, capsys):
    """Run folders written before ``regrow_dropped`` existed grew only blocks dead before an
    update: they load that way, and a resume must say so. Other settings added since take
    their defaults, which are the behaviour from before they existed: no change to record."""
    newer = ("regrow_dropped", "eval_every", "eval_reference")
    config = json.loads((trained_run / "config.json").read_text())
    for name in newer:
        del config[name]
    (trained_run / "config.json").write_text(json.dumps(config))
    state = load_state(trained_run / CHECKPOINT)
    for name in newer:
        del state["config"][name]
    del state["algo"]["config"]["regrow_dropped"]
    save_state(state, trained_run / CHECKPOINT)
    loaded = load_run(str(trained_run))
    assert loaded.run.config.regrow_dropped is False and loaded.state.algo.regrow_dropped is False
    args = ("train", *TINY_ARGS, "--method", "rigl", "--steps", 4, "--checkpoint-every", 2, "--resume", "--out", trained_run)
    assert_one_line_error(*run_cli(capsys, *args)[::2], "regrow_dropped: checkpoint False vs now True")
    code, _, err = run_cli(capsys, *args, "--no-regrow-dropped")
    assert code == 0, err
    changes = json.loads((trained_run / "config.json").read_text())["changes"]
    assert changes == [{"step": 2, "changed": {"steps": [2, 4]}}]


@pytest.mark.parametrize("method, regrow", [("rigl", False), ("magran", False), ("static", True), ("dense", True)])
def test_settings_added_since_take_the_behaviour_from_before_them(tmp_path, method, regrow):
    import dataclasses

    saved = {k: v for k, v in dataclasses.asdict(tiny(tmp_path, method=method)).items()
             if k not in ("regrow_dropped", "eval_every", "eval_reference")}
    migrated = migrate_config(saved)
    assert migrated["regrow_dropped"] is regrow and migrated["eval_every"] == 0 and migrated["eval_reference"] == 0
    assert {k: migrated[k] for k in saved} == saved
    assert migrate_config(migrated) == migrated  # a configuration of this version is left as it is


def test_an_old_algorithm_state_takes_its_runs_regrow_dropped():
    state = {"config": {"method": "rigl"}, "algo": {"step": 3, "config": {"algorithm": "RigL", "seed": 0}}}
    migrated = migrate_checkpoint(state)
    assert migrated["algo"] == {"step": 3, "config": {"algorithm": "RigL", "seed": 0, "regrow_dropped": False}}
    assert "regrow_dropped" not in state["algo"]["config"]  # the state read is not changed in place
    dense = migrate_checkpoint({"config": {"method": "dense"}, "algo": None})
    assert dense["algo"] is None and dense["config"]["regrow_dropped"] is True


def test_a_legacy_pickle_checkpoint_is_refused_unread(tmp_path):
    refuse_legacy_checkpoint(tmp_path)  # none there: nothing to say
    (tmp_path / LEGACY_CHECKPOINT).write_bytes(b"PK\x03\x04 a zip, as torch.save writes")
    with pytest.raises(CheckpointError, match="pickle"):
        refuse_legacy_checkpoint(tmp_path)


def test_a_run_whose_last_evaluation_is_only_in_metrics_json_keeps_it_when_trained_longer(tmp_path, monkeypatch):
    """Before the last step's evaluation was part of the checkpoint, only metrics.json had it:
    a resume puts it back in the curve, and the longer run keeps every point."""
    import dataclasses

    import sparse_diffusion.train as train_module
    from sparse_diffusion.train import Trainer

    monkeypatch.setattr(train_module, "evaluate", lambda state, n, dist: {"fid": 100.0 / state.step})
    config = tiny(tmp_path / "run", method="static", steps=4, eval_every=2, eval_samples=8)
    first = Trainer(config).train()["curve"]
    state = load_state(tmp_path / "run" / CHECKPOINT)
    state["curve"] = state["curve"][:-1]  # as an older version saved it
    save_state(state, tmp_path / "run" / CHECKPOINT)
    longer = Trainer(dataclasses.replace(config, steps=6), resume=True).train()["curve"]
    assert [p["step"] for p in longer] == [2, 4, 6] and longer[:2] == first


def test_a_curve_is_merged_by_step_and_only_up_to_the_checkpoint():
    state = {"config": {"method": "dense"}, "algo": None, "step": 4, "curve": [{"step": 2, "fid": 9.0}]}
    metrics = {"curve": [{"step": 2, "fid": 1.0}, {"step": 4, "fid": 8.0}, {"step": 6, "fid": 7.0}]}
    assert migrate_checkpoint(state, metrics)["curve"] == [{"step": 2, "fid": 9.0}, {"step": 4, "fid": 8.0}]
    assert migrate_checkpoint(state, None)["curve"] == state["curve"]
    assert migrate_checkpoint(state, {"curve": "damaged"})["curve"] == state["curve"]
