"""tflite_export.edgetpu: the static Edge TPU (Coral) check on small converted models and on the exporter's files.

No ``edgetpu_compiler`` here: these tests pin what the static reading says, not what the compiler maps.
"""
import dataclasses
import json

import pytest
import tensorflow as tf

from bbits_tf._keras import keras
import tflite_export as te
from tflite_export.edgetpu import CHECKS, SUPPORTED_OPS, EdgeTpuReport, edgetpu_check
from export_helpers import images, random_biases  # tests/ is on sys.path (pytest rootdir-relative import)

L = keras.layers
X = images(16, shape=(8, 8, 1))


def to_int8(model, float_io=False):
    """Full-integer int8 TFLite (int8 builtins only; int8 io unless ``float_io``), calibrated on ``X``."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([X[i:i + 1]] for i in range(len(X)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if not float_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def small_model(*layers, batch_size=1, seed=0):
    """Input (8, 8, 1) -> layers, non-zero biases (so that the file holds int32 bias tensors)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8, 8, 1), batch_size=batch_size)] + list(layers))
    return random_biases(model, seed)


def conv_relu_dense(batch_size=1):
    return small_model(L.Conv2D(4, 3, activation="relu", name="conv"), L.Flatten(name="flat"),
                       L.Dense(3, name="fc"), batch_size=batch_size)


def failed(report):
    return {name for name, ok in report.checks.items() if not ok}


def subjects(report, check):
    return [p.subject for p in report.problems if p.check == check]


@pytest.fixture(scope="module")
def int8_model():
    return to_int8(conv_relu_dense())


def test_conv_relu_dense_int8_batch1_passes(int8_model):
    report = edgetpu_check(int8_model)
    assert isinstance(report, EdgeTpuReport)
    assert report.passed and report.problems == (), report.format()
    assert report.checks == {name: True for name in CHECKS}
    assert report.op_counts == {"CONV_2D": 1, "RESHAPE": 1, "FULLY_CONNECTED": 1}
    assert set(report.op_counts) <= SUPPORTED_OPS
    # the int32 biases and the int32 shape of RESHAPE are there, and allowed
    types = [t.type for t in te.read_flatbuffer(int8_model).tensors]
    assert types.count("INT32") == 3 and set(types) == {"INT8", "INT32"}
    # it says plainly that the compiler was not run
    assert "edgetpu_compiler was not run" in report.compiler
    assert "edgetpu_compiler was not run" in report.format() and "passed" in report.format().splitlines()[0]
    assert report.source == "https://coral.ai/docs/edgetpu/models-intro/#supported-operations"


def test_report_is_data(int8_model, tmp_path):
    report = edgetpu_check(int8_model)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is True and d["problems"] == [] and d["op_counts"]["CONV_2D"] == 1
    assert set(d["checks"]) == set(CHECKS) and d["not_checked"] and "compiler" in d
    assert all(len(v) >= 1 for v in d["op_versions"].values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.problems = ()
    path = tmp_path / "m.tflite"
    path.write_bytes(int8_model)
    assert edgetpu_check(str(path)).to_dict() == d and edgetpu_check(path).passed


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="Received: model of type list"):
        edgetpu_check([1, 2, 3])
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        edgetpu_check(b"not a model at all")


def test_float_io_fails_naming_the_float_tensors():
    data = to_int8(conv_relu_dense(), float_io=True)
    flat = te.read_flatbuffer(data)
    floats = [t.name for t in flat.tensors if t.type == "FLOAT32"]
    assert len(floats) == 2  # the model input and output
    report = edgetpu_check(data)
    assert not report.passed and failed(report) == {"types", "ops"}
    for name in floats:
        assert any(name in s for s in subjects(report, "types")), (name, report.format())
    assert any(s.startswith("model input") for s in subjects(report, "types"))
    assert any("float io" in p.message for p in report.problems)
    # the DEQUANTIZE at the output is not on the list (the QUANTIZE at the input is)
    assert [s.split()[0] for s in subjects(report, "ops")] == ["DEQUANTIZE"]
    assert report.op_counts["QUANTIZE"] == 1


def test_unsupported_op_fails_naming_it():
    data = to_int8(small_model(L.Conv2D(4, 3, name="conv"), L.LeakyReLU(0.1, name="leaky"), L.Flatten(),
                               L.Dense(3)))
    report = edgetpu_check(data)
    assert failed(report) == {"ops"}, report.format()
    (problem,) = report.problems
    assert problem.subject.startswith("LEAKY_RELU #") and "leaky" in problem.subject
    assert "not on the Edge TPU's supported operations list" in problem.message
    assert "LEAKY_RELU" not in SUPPORTED_OPS and report.op_counts["LEAKY_RELU"] == 1


def test_five_d_tensor_fails_the_dimension_rule():
    """Reshape to (1, 2, 2, 2, 2): four dimensions > 1 (RESHAPE itself is on the list)."""
    data = to_int8(small_model(L.Conv2D(4, 3, activation="relu"), L.Flatten(), L.Dense(16),
                               L.Reshape((2, 2, 2, 2), name="to5d")))
    report = edgetpu_check(data)
    assert failed(report) == {"dimensions"}, report.format()
    (problem,) = report.problems
    out = te.read_flatbuffer(data).outputs[0]
    assert problem.subject == f"model output '{te.read_flatbuffer(data).tensors[out].name}'"
    assert "(1, 2, 2, 2, 2) has 4 dimensions > 1" in problem.message


def test_dynamic_batch_fails():
    data = to_int8(conv_relu_dense(batch_size=None))
    flat = te.read_flatbuffer(data)
    report = edgetpu_check(data)
    assert failed(report) == {"static_shapes"}, report.format()
    inp = flat.tensors[flat.inputs[0]].name
    assert f"model input '{inp}'" in subjects(report, "static_shapes")
    assert any("shape_signature (-1, 8, 8, 1)" in p.message for p in report.problems)


def test_batch_other_than_one_fails():
    """Batch 2: the input's batch, and what follows from it (a 2 outside the 3 innermost dimensions, a
    FULLY_CONNECTED output (2, 3) that is not one-dimensional)."""
    data = to_int8(conv_relu_dense(batch_size=2))
    flat = te.read_flatbuffer(data)
    report = edgetpu_check(data)
    assert failed(report) == {"static_shapes", "dimensions", "op_constraints"}, report.format()
    inp = flat.tensors[flat.inputs[0]].name
    assert [(p.subject, p.message.split(" (")[0]) for p in report.problems if p.check == "static_shapes"] == [
        (f"model input '{inp}'", "batch dimension 2")]
    assert f"model input '{inp}'" in subjects(report, "dimensions")
    assert [p.message for p in report.problems if p.check == "op_constraints"] == [
        "output shape (2, 3) is not one-dimensional"]


@pytest.mark.parametrize("channels, ok", [(4, True), (3, False)])
def test_mean_over_channels_needs_a_multiple_of_4(channels, ok):
    """Coral: Mean, 'If a z-reduction, the z-dimension must be multiple of 4'; over y and x it is fine."""
    data = to_int8(small_model(L.Conv2D(channels, 3, activation="relu"),
                               L.Lambda(lambda t: tf.reduce_mean(t, axis=-1), name="zmean"), L.Flatten(),
                               L.Dense(3)))
    report = edgetpu_check(data)
    assert report.op_counts.get("MEAN") == 1
    assert report.passed == ok, report.format()
    if not ok:
        (problem,) = report.problems
        assert problem.check == "op_constraints" and problem.subject.startswith("MEAN #")
        assert "3 channels, not a multiple of 4" in problem.message
    pooled = edgetpu_check(to_int8(small_model(L.Conv2D(channels, 3), L.GlobalAveragePooling2D(), L.Dense(3))))
    assert pooled.op_counts.get("MEAN") == 1 and pooled.passed, pooled.format()


def test_softmax_needs_a_1d_input():
    ok = edgetpu_check(to_int8(small_model(L.Flatten(), L.Dense(3), L.Softmax())))
    assert ok.op_counts.get("SOFTMAX") == 1 and ok.passed, ok.format()
    bad = edgetpu_check(to_int8(small_model(L.Conv2D(2, 3), L.Softmax(name="spatial_softmax"))))
    assert failed(bad) == {"op_constraints"}, bad.format()
    assert [p.message for p in bad.problems] == ["input shape (1, 6, 6, 2) is not 1D"]


def plain_model(*layers):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8, 8, 1), batch_size=1)] + list(layers))


@pytest.mark.parametrize("case, layers, op, message", [
    # the converter fuses a ReLU that follows a max pool into MAX_POOL_2D: 'No fused activation function'
    ("pool_then_relu", lambda: [L.Conv2D(4, 3), L.MaxPooling2D(), L.ReLU()], "MAX_POOL_2D",
     "fused activation RELU; no fused activation function is allowed"),
    ("relu_then_pool", lambda: [L.Conv2D(4, 3), L.ReLU(), L.MaxPooling2D()], None, None),
    # Keras PReLU learns one alpha per element; Coral: 'shared_axes must be [1,2]'
    ("prelu", lambda: [L.Conv2D(4, 3), L.PReLU()], "PRELU",
     "alpha shape (6, 6, 4): only its innermost dimension may be > 1"),
    ("prelu_shared", lambda: [L.Conv2D(4, 3), L.PReLU(shared_axes=[1, 2])], None, None),
    ("strided_slice", lambda: [L.Conv2D(4, 3), L.Lambda(lambda t: t[:, ::2])], "STRIDED_SLICE",
     "strides (1, 2, 1, 1); only all strides 1 are supported"),
    ("dilation", lambda: [L.Conv2D(4, 3, dilation_rate=(2, 1))], "CONV_2D",
     "dilation 2 (y) != 1 (x); the docs need the same dilation in x and y"),
])
def test_documented_op_limitations(case, layers, op, message):
    report = edgetpu_check(to_int8(plain_model(*layers(), L.Flatten(), L.Dense(3))))
    if op is None:
        assert report.passed, report.format()
        return
    assert failed(report) == {"op_constraints"}, report.format()
    (problem,) = report.problems
    assert problem.subject.startswith(f"{op} #") and problem.message == message


# ---------------------------------------------------------------------------------------------- the exporter

def set_bits(qmodel, name, bits):
    """Deterministic gates of layer ``name``'s weight quantizer at ``bits`` (4 or 8) by assignment."""
    import bbits_tf  # pylint: disable=import-outside-toplevel
    log_alpha = {4: (6., -6., -6., -6.), 8: (6., 6., -6., -6.)}[bits]
    for wrapper, role, _, variables in bbits_tf.bayesian_bits_quantizers(qmodel):
        if wrapper.layer.name == name and role == "weight":
            variables["log_alpha"].assign(log_alpha)


@pytest.fixture(scope="module")
def bbits_lenet(mnist):
    """A quantized LeNet5 (ranges from data, untrained) with 4-bit fc1 weights: what ``te.export`` makes of it
    with its defaults and with the Edge TPU options."""
    import bbits_tf  # pylint: disable=import-outside-toplevel
    from bbits_tf import models, quantize_model  # pylint: disable=import-outside-toplevel
    (x_train, _), (x_test, y_test) = mnist
    keras.utils.set_random_seed(0)
    qmodel = quantize_model(models.lenet5(), mu=0.01)
    bbits_tf.initialize_ranges(qmodel, x_train[:64])
    set_bits(qmodel, "fc1", 4)
    common = dict(representative_data=x_train[:128], validation_data=(x_test[:64], y_test[:64]), lsb_samples=0,
                  tflm=False)
    default = te.export(qmodel, None, **common)
    edgetpu = te.export(qmodel, None, io="int8", int4=False, batch_size=1, **common)
    return default, edgetpu


def test_exporter_defaults_are_not_edgetpu_ready(bbits_lenet):
    """The defaults (phones): float io, INT4 Dense weights, a free batch dimension: each named."""
    default, _ = bbits_lenet
    assert default.io == "float" and default.int4 == ["fc1"]
    report = edgetpu_check(default.model_bytes)
    assert failed(report) == {"types", "static_shapes", "ops"}, report.format()
    types = [p.message for p in report.problems if p.check == "types"]
    assert sum("FLOAT32" in m and "float io" in m for m in types) == 2
    (int4,) = [p for p in report.problems if "packed INT4 weights" in p.message]
    assert int4.subject.startswith("constant '") and "fc1" in int4.subject
    assert any("shape_signature (-1, 28, 28, 1)" in p.message for p in report.problems)
    assert [s.split()[0] for s in subjects(report, "ops")] == ["DEQUANTIZE"]


def test_exporter_edgetpu_options_pass(bbits_lenet):
    """``io="int8", int4=False, batch_size=1``: every tensor int8 (biases and shapes int32), static, listed ops."""
    _, edgetpu = bbits_lenet
    report = edgetpu_check(edgetpu.model_bytes)
    assert report.passed, report.format()
    assert set(edgetpu.tensor_types) == {"INT8", "INT32"} and edgetpu.int4 == []
    assert report.op_counts["CONV_2D"] == 2 and report.op_counts["FULLY_CONNECTED"] == 2
    assert set(report.op_counts) <= SUPPORTED_OPS
