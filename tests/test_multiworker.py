"""``training.run`` under ``tf.distribute.MultiWorkerMirroredStrategy``: two worker processes on 127.0.0.1
(TF_CONFIG), started and stopped by the test with bounded time, against one process with the same global batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
strategy = tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ else None
import bbits_tf
from bbits_tf import data, training
from bbits_tf._keras import keras
from tests.test_training import tiny_model

out_path, checkpoint_dir = sys.argv[1], sys.argv[2]


class DeterministicGates(keras.callbacks.Callback):
    # Every open gate at log_alpha 20: its hard-concrete sample is 1 (the clip of the stretched sigmoid), so the
    # forward pass draws no noise and one process can be compared with two; truncated gates stay shut.
    def on_train_begin(self, logs=None):
        for _, _, _, variables in bbits_tf.bayesian_bits_quantizers(self.model):
            for key in ("log_alpha", "log_alpha_2"):
                if key in variables:
                    v = variables[key]
                    v.assign(np.where(v.numpy() > -2.0, 20.0, v.numpy()).astype(np.float32))


(x, y), (xs, ys) = data.load_mnist(train_limit=256)
recipe = training.Recipe(epochs=2, warmup_epochs=1, batch_size=32, lr_weights=1e-2, lr_ranges=1e-2, lr_gates=1e-2)
result = training.run(tiny_model, recipe, ((x, y), (xs[:200], ys[:200])), method="bb", seed=0, strategy=strategy,
                      verbose=0, print_fn=None, callbacks=[DeterministicGates()], checkpoint_dir=checkpoint_dir)
model = result.model
table = {f"{w.name}/{role}": {k: float(np.asarray(v[k])) for k in ("x_max",)}
         for w, role, q, v in bbits_tf.bayesian_bits_quantizers(model)}
json.dump({"variables": {v.name: np.asarray(v.numpy()).ravel().tolist() for v in model.trainable_variables},
           "losses": [h["loss"] for h in result.history], "test_accuracy": result.test_accuracy,
           "ranges": table, "relative_bops": result.relative_bops,
           "replicas": model.distribute_strategy.num_replicas_in_sync}, open(out_path, "w"))
"""


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(args, env_extra, log):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", **env_extra)
    env.pop("TF_CONFIG", None) if "TF_CONFIG" not in env_extra else None
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=env, stdout=log, stderr=log)


def _wait(procs, timeout):
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:  # bounded: whatever still runs is killed
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiworker")
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, logs = [], []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        log = open(tmp / f"worker{index}.log", "w")
        logs.append(log)
        procs.append(_start([str(tmp / f"worker{index}.json"), str(tmp / f"checkpoints{index}")],
                            {"TF_CONFIG": tf_config}, log))
    single_log = open(tmp / "single.log", "w")
    logs.append(single_log)
    single = _start([str(tmp / "single.json"), str(tmp / "checkpoints_single")], {}, single_log)
    _wait(procs + [single], timeout=600)
    for log in logs:
        log.close()
    outs = {}
    for name in ("worker0", "worker1", "single"):
        path = tmp / f"{name}.json"
        assert path.exists(), (tmp / f"{name}.log").read_text()[-3000:]
        outs[name] = json.loads(path.read_text())
    return tmp, outs


def test_two_workers_make_the_updates_of_one_process_with_the_same_global_batch(runs):
    _, outs = runs
    w0, w1, single = outs["worker0"], outs["worker1"], outs["single"]
    assert (w0["replicas"], w1["replicas"], single["replicas"]) == (2, 2, 1)
    assert set(w0["variables"]) == set(single["variables"]) == set(w1["variables"])
    for name, value in single["variables"].items():
        np.testing.assert_array_equal(w0["variables"][name], w1["variables"][name], err_msg=name)  # in sync
        np.testing.assert_allclose(w0["variables"][name], value, rtol=2e-4, atol=2e-5, err_msg=name)
    # the regularizer counted once per step: the logged loss (cross-entropy + mu * R) is the one process's
    np.testing.assert_allclose(w0["losses"], single["losses"], rtol=1e-4)
    assert w0["ranges"] == w1["ranges"]  # initialised identically on both workers (from the same data)
    for key, value in single["ranges"].items():
        assert w0["ranges"][key]["x_max"] == pytest.approx(value["x_max"], rel=2e-4), key
    assert w0["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=0.011)  # 200 images: <= 2 differ
    assert w0["relative_bops"] == pytest.approx(single["relative_bops"], rel=1e-6)


def test_only_the_chief_writes_checkpoints(runs):
    tmp, _ = runs
    chief = sorted(p.name for p in (tmp / "checkpoints0").iterdir())
    assert "checkpoint" in chief and any(name.startswith("ckpt-") for name in chief), chief
    assert not (tmp / "checkpoints1").exists() or not any((tmp / "checkpoints1").iterdir())
