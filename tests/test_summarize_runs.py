"""examples/summarize_runs.py: the README's results table from runs/*/results.json and progress.json."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import summarize_runs  # noqa: E402

LAYER = {"name": "fc", "type": "Dense", "weight_bits": 2, "input_bits": 8, "activation_bits": 32, "kept_channels": 3,
         "total_channels": 10}


def _finished(folder, name, accuracy, bops):
    run = folder / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "method": "bb", "test_accuracy": accuracy, "relative_bops": bops, "expected_relative_bops": bops,
        "epochs": 15, "wall_time_s": 600.0, "layers": [LAYER], "history": [],
        "settings": {"command_line": f"/venv/bin/python examples/mnist.py --output-dir runs/{name}"}}))


def test_seed_groups_mean_spread_and_partial_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, (acc, bops) in enumerate([(0.9930, 0.30), (0.9932, 0.34), (0.9934, 0.32)]):
        _finished(runs, f"fast-s{seed}", acc, bops)
    _finished(runs, "float", 0.9939, 100.0)
    (runs / "paper").mkdir()
    (runs / "paper" / "progress.json").write_text(json.dumps({
        "settings": {"args": {"recipe": "paper", "method": "bb", "seed": 0, "output_dir": "runs/paper"},
                     "recipe": {}, "total_epochs": 100},
        "completed_epochs": 2,
        "epochs": [{"epoch": 1, "test_accuracy": 0.98, "relative_bops": 6.25, "expected_relative_bops": 6.2},
                   {"epoch": 2, "test_accuracy": 0.99, "relative_bops": 0.5, "expected_relative_bops": 0.6}]}))
    out = tmp_path / "summary.json"
    summarize_runs.main(["--runs", str(runs), "--output", str(out)])
    summary = json.loads(out.read_text())
    stats = summary["seed_groups"]["fast"]
    assert list(summary["seed_groups"]) == ["fast"]  # float and the partial paper run are not seed groups
    assert stats["runs"] == 3
    assert stats["accuracy_mean"] == pytest.approx(99.32)
    assert stats["accuracy_std"] == pytest.approx(0.02)
    assert stats["relative_bops_mean"] == pytest.approx(0.32)
    assert stats["relative_bops_std"] == pytest.approx(0.02)
    assert summary["runs"]["paper"]["completed_epochs"] == 2
    assert summary["runs"]["paper"]["test_accuracy"] == 0.99
    table = capsys.readouterr().out
    assert "| paper | bb | 99.00 | 0.500 | 2 of 100 (partial) | - |" in table
    assert "| fast-s1 | bb | 99.32 | 0.340 | 15 | 10.0 | 2 | f | 3 |" in table
    assert "fast over 3 seeds: 99.32 +- 0.02 % test accuracy at 0.320 +- 0.020 % relative BOPs" in table
