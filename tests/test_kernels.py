"""The fused C++ quantizer op (bbits_tf.kernels) against the TensorFlow-graph quantizer it replaces, and the
fallback to that graph where the op cannot be built."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import bbits_tf
from bbits_tf import kernels, models, ops

CHAIN = (2, 4, 8, 16, 32)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(x, x_max, signed, bits, z, alive, upstream, use_op, fn=None):
    kernels.set_enabled(use_op)
    try:
        with tf.GradientTape() as tape:
            tape.watch([x, x_max, z])
            q = (fn or ops.quantize)(x, x_max, signed, bits, z, alive)
            loss = tf.reduce_sum(upstream * q)
        grads = tape.gradient(loss, [x, x_max, z])  # z: None for a fixed-width quantizer (no gates)
        return (q.numpy(), *[np.zeros(v.shape) if g is None else g.numpy() for g, v in zip(grads, [x, x_max, z])])
    finally:
        kernels.set_enabled(None)


def test_the_op_is_built_and_used_where_a_compiler_exists():
    # This machine (and CI's clean clone of it) has g++: the default path is the op.
    assert kernels.compiler() is not None
    status = kernels.status()
    assert status["enabled"] and os.path.exists(status["path"]), status

    @tf.function
    def step(x, x_max, z):
        with tf.GradientTape() as tape:
            tape.watch([x, x_max, z])
            loss = tf.reduce_sum(ops.quantize(x, x_max, True, CHAIN, z) ** 2)
        return tape.gradient(loss, [x, x_max, z])

    spec = (tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.float32), tf.TensorSpec([4], tf.float32))
    op_types = {op.type for op in step.get_concrete_function(*spec).graph.get_operations()}
    assert {"BbitsQuantize", "BbitsQuantizeGrad"} <= op_types
    kernels.set_enabled(False)
    try:
        step_graph = tf.function(step.python_function)
        op_types = {op.type for op in step_graph.get_concrete_function(*spec).graph.get_operations()}
    finally:
        kernels.set_enabled(None)
    assert not {"BbitsQuantize", "BbitsQuantizeGrad"} & op_types
    assert "Round" in op_types


@pytest.mark.parametrize("bits", [CHAIN, (8,), (2, 4), (4, 8, 16)])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("alive_kind", ["none", "first_two", "all_shut"])
@pytest.mark.parametrize("size", [1, 2047, 70001])
def test_values_and_gradients_equal_the_graph_quantizer(bits, signed, alive_kind, size):
    """Same forward bits and same input gradient as the graph path; x_max and gate gradients equal to float32
    summation noise (the op sums in float64 per block); both equal quantize_traced (TensorFlow's own gradient)."""
    rng = np.random.default_rng(size + len(bits))
    n_gates = len(bits) - 1
    x_max = tf.constant(1.3)
    edge = float(ops.CLIP_SHRINK * 1.3)
    values = rng.normal(scale=1.2, size=size)
    values[: min(size, 5)] = [edge, -edge, 0.0, 5.0, -5.0][: min(size, 5)]
    x = tf.constant(values.astype(np.float32))
    z = tf.constant(rng.uniform(0.1, 0.9, size=n_gates).astype(np.float32))
    alive = None
    if alive_kind == "first_two":
        alive = tf.constant([k < 2 for k in range(n_gates)])
        z = z * tf.cast(alive, tf.float32)
    elif alive_kind == "all_shut":
        alive = tf.zeros([n_gates], tf.bool)
        z = tf.zeros([n_gates])
    upstream = tf.constant(rng.normal(size=size).astype(np.float32))
    got = _run(x, x_max, signed, bits, z, alive, upstream, True)
    graph = _run(x, x_max, signed, bits, z, alive, upstream, False)
    traced = _run(x, x_max, signed, bits, z, alive, upstream, False, fn=ops.quantize_traced)
    np.testing.assert_array_equal(got[0], graph[0])  # forward: bit for bit
    np.testing.assert_array_equal(got[1], graph[1])  # dx: bit for bit
    scale = np.abs(upstream.numpy()).sum() * 1.3
    for index in (2, 3):  # dx_max, dz: sums over the tensor
        np.testing.assert_allclose(got[index], graph[index], rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(got[index], traced[index], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_array_equal(got[0], traced[0])
    if not signed:
        assert got[0].min() >= 0.0


def test_nan_propagates_and_empty_tensors_work():
    x = tf.constant([0.5, np.nan, -0.25], tf.float32)
    for use_op in (True, False):
        kernels.set_enabled(use_op)
        try:
            out = ops.quantize(x, 1.0, True, CHAIN).numpy()
            empty = ops.quantize(tf.zeros([0, 3]), 1.0, True, CHAIN).numpy()
        finally:
            kernels.set_enabled(None)
        assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()
        assert empty.shape == (0, 3)


def test_the_same_sums_with_one_thread_as_with_the_default_pool(tmp_path):
    """Per-block float64 partial sums added in block order: the gradient does not depend on the thread count."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
        sys.path.insert(0, {ROOT!r})
        from bbits_tf import ops
        rng = np.random.default_rng(0)
        x = tf.constant(rng.normal(size=300001).astype(np.float32))
        g = tf.constant(rng.normal(size=300001).astype(np.float32))
        x_max, z = tf.constant(1.1), tf.constant([0.7, 0.6, 0.5, 0.4])
        with tf.GradientTape() as tape:
            tape.watch([x_max, z])
            loss = tf.reduce_sum(g * ops.quantize(x, x_max, True, (2, 4, 8, 16, 32), z))
        d = tape.gradient(loss, [x_max, z])
        np.save(sys.argv[2], np.concatenate([[d[0].numpy()], d[1].numpy()]))
    """)
    path = tmp_path / "sums.py"
    path.write_text(script)
    results = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.npy"
        subprocess.run([sys.executable, str(path), str(threads), str(out)], check=True, timeout=300,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        results.append(np.load(out))
    np.testing.assert_array_equal(results[0], results[1])


def test_a_lenet5_step_has_the_same_loss_and_gradients_with_and_without_the_op():
    x = tf.constant(np.random.default_rng(0).uniform(size=(16, 28, 28, 1)).astype(np.float32))
    y = tf.constant(np.arange(16) % 10)
    results = []
    for use_op in (True, False):
        bbits_tf.keras.utils.set_random_seed(3)
        model = bbits_tf.quantize_model(models.lenet5(), mu=0.1)
        bbits_tf.initialize_ranges(model, x)
        kernels.set_enabled(use_op)
        try:
            tf.random.set_seed(5)  # the same gate noise in both runs
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(bbits_tf.keras.losses.sparse_categorical_crossentropy(
                    y, logits, from_logits=True))
            grads = tape.gradient(loss, model.trainable_variables)
        finally:
            kernels.set_enabled(None)
        results.append((loss.numpy(), [g.numpy() for g in grads], [v.name for v in model.trainable_variables]))
    (loss_op, grads_op, names), (loss_graph, grads_graph, _) = results
    np.testing.assert_allclose(loss_op, loss_graph, rtol=1e-6)
    assert len(grads_op) == len(grads_graph) > 10
    for name, a, b in zip(names, grads_op, grads_graph):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=name)


def _fresh_process(env_update, code):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env_update}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


FALLBACK_CODE = textwrap.dedent("""
    import json, warnings, numpy as np
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from bbits_tf import kernels, ops
        out = ops.quantize(np.array([0.3, -0.7, 2.0], np.float32), 1.0, True, (2, 4, 8)).numpy()
    print(json.dumps({"status": kernels.status(), "out": out.tolist(),
                      "warnings": [str(w.message) for w in caught if "fused quantizer" in str(w.message)]}))
""")


def test_without_a_compiler_the_graph_quantizer_runs_with_a_warning(tmp_path):
    # No compiler on PATH, no $CXX and an empty cache: what `pip install -e .` gives on such a machine.
    done = _fresh_process({"PATH": str(tmp_path), "CXX": "", "BBITS_TF_CACHE": str(tmp_path / "cache")},
                          FALLBACK_CODE)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"]["enabled"] is False
    assert "no C++ compiler" in result["status"]["reason"]
    assert len(result["warnings"]) == 1 and "slower training" in result["warnings"][0]
    expected = ops.quantize(np.array([0.3, -0.7, 2.0], np.float32), 1.0, True, (2, 4, 8)).numpy()
    np.testing.assert_array_equal(result["out"], expected)


def test_a_failing_compiler_falls_back_and_require_raises(tmp_path):
    fake = tmp_path / "badcxx"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo badcxx 1.0; exit 0; fi\n"
                    "echo 'error: broken toolchain' >&2; exit 3\n")
    fake.chmod(0o755)
    env = {"CXX": str(fake), "BBITS_TF_CACHE": str(tmp_path / "cache")}
    done = _fresh_process(env, FALLBACK_CODE)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"]["enabled"] is False and "broken toolchain" in result["status"]["reason"]
    assert not os.listdir(tmp_path / "cache")  # no half-written library left behind
    required = _fresh_process({**env, "BBITS_TF_FUSED_OP": "require"}, FALLBACK_CODE)
    assert required.returncode != 0 and "required" in required.stderr and "broken toolchain" in required.stderr


def test_the_switch_turns_the_op_off_and_bad_values_are_rejected(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.enabled() is False
    monkeypatch.setenv(kernels.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match="BBITS_TF_FUSED_OP"):
        kernels.enabled()
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    assert kernels.enabled() is True


def test_functions_compiled_by_xla_take_the_graph_path():
    # XLA has no kernel for the op: inside jit_compile=True the TensorFlow-graph quantizer is built instead.
    x = tf.constant(np.linspace(-2, 2, 101).astype(np.float32))
    z = tf.constant([0.9, 0.6, 0.0, 0.0])

    @tf.function(jit_compile=True)
    def compiled(x_max):
        with tf.GradientTape() as tape:
            tape.watch(x_max)
            out = ops.quantize(x, x_max, True, CHAIN, z)
            loss = tf.reduce_sum(out * x)
        return out, tape.gradient(loss, x_max)

    with tf.GradientTape() as tape:
        x_max = tf.constant(1.5)
        tape.watch(x_max)
        eager = ops.quantize(x, x_max, True, CHAIN, z)
        loss = tf.reduce_sum(eager * x)
    want = tape.gradient(loss, x_max)
    got, got_grad = compiled(tf.constant(1.5))
    # XLA fuses the graph's multiply-adds (float32 rounding differs in the last bit), the values are the same
    np.testing.assert_allclose(got.numpy(), eager.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_grad.numpy(), want.numpy(), rtol=1e-5)
