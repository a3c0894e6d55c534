"""`examples/mnist.py --deterministic` at a fixed thread count repeats a run exactly (every epoch's numbers)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(output_dir, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, str(ROOT / "examples" / "mnist.py"), "--epochs", "2", "--train-limit", "768",
               "--output-dir", str(output_dir), "--verbose", "0", "--no-export", "--threads", "1",
               "--bit-width-every", "0", *extra]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((Path(output_dir) / "results.json").read_text())


def _numbers(results):
    keys = ("loss", "accuracy", "test_accuracy", "relative_bops", "expected_relative_bops")
    return [[entry.get(k) for k in keys] for entry in results["history"]]


def test_deterministic_runs_repeat_exactly_and_record_their_environment(tmp_path):
    first = _run(tmp_path / "a", "--deterministic", "--seed", "3")
    second = _run(tmp_path / "b", "--deterministic", "--seed", "3")
    assert len(first["history"]) == 2
    assert _numbers(first) == _numbers(second)  # bit-identical, not approximately equal
    assert first["layers"] == second["layers"]
    env = first["settings"]["environment"]
    assert env["deterministic"] is True and env["threads"] == 1 and env["intra_op_threads"] == 1
    assert env["versions"]["tensorflow"].startswith("2.") and env["versions"]["numpy"]
