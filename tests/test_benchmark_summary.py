"""benchmarks/results/summary.md is the generated form of the committed benchmark JSON files:
it must be what `python -m benchmarks.summary` writes today, so no number drifts from its file."""
import json
import shutil

from benchmarks import summary


def test_the_committed_summary_is_up_to_date():
    assert summary.main(["--check"]) == 0, "run `python -m benchmarks.summary` and commit benchmarks/results/summary.md"


def test_a_new_result_makes_the_summary_stale_until_regenerated(tmp_path):
    for path in summary.RESULTS.glob("*.json"):
        shutil.copy(path, tmp_path)
    shutil.copy(summary.SUMMARY, tmp_path)
    record = json.loads((summary.RESULTS / "layer_call-2026-11-28-AMD-EPYC-2-threads.json").read_text())
    record["environment"]["date"] = "2030-01-01T00:00:00"
    record["rows"][0]["sparse_us"] = 12345.0
    (tmp_path / "layer_call-2030-01-01-test.json").write_text(json.dumps(record))
    assert summary.main(["--results", str(tmp_path), "--check"]) == 1
    assert summary.main(["--results", str(tmp_path)]) == 0
    assert summary.main(["--results", str(tmp_path), "--check"]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "`layer_call-2030-01-01-test.json`" in text and "| 12345 |" in text
