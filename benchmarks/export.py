"""LeNet5 as float TFLite, tfmot int8 and bbits_tf TFLite: file size, accuracy and LiteRT latency, in one run.

Usage:
    python benchmarks/export.py                                   # trains a quick bbits_tf LeNet5 first
    python benchmarks/export.py --bbits-model runs/mnist-bb-0/model.h5   # a trained model (.h5 or SavedModel)
    python benchmarks/export.py --runs 2000 --output benchmarks/results/export.json

The model: ``--bbits-model PATH`` loads a Bayesian Bits LeNet5 saved by examples/mnist.py (``model.h5``; a
SavedModel folder works too) inside ``bbits_tf.quantize_scope()``. Without it, one is trained here:
``bbits_tf.training.run`` with the "fast" recipe cut to 1 epoch and no float warm-up (469 steps of batch 128 over
the 60,000 MNIST images, mu 0.1, gate learning rate 1e-2; about 100 s on 2 CPU cores; ``--save-bbits-model`` keeps
it).

Variants, all the same LeNet5 (32C5-MP2-64C5-MP2-512-10):

* ``float``: the bbits model's inference weights (kernels on their grids, pruned slices zero, all 582k parameters)
  as a plain float model, TFLiteConverter without optimizations.
* ``tfmot_int8``: ``tfmot.quantization.keras.quantize_model`` of that float model (default 8-bit QAT scheme),
  fine-tuned ``--qat-steps`` steps of batch 64 (Adam 1e-4) so that its ranges are set, converted with
  ``Optimize.DEFAULT`` (int8 weights per channel, int8 activations, float input/output).
* ``bbits``: ``tflite_export.export`` of the bbits model with its defaults (float input/output, pruned, INT4 for
  the <= 4-bit Dense layers, convolutions' grids in INT8, which XNNPACK runs; refined inputs).
* ``bbits_int4_all``: ``int4=True``: INT4 for every <= 4-bit layer (smallest; XNNPACK leaves INT4 convolutions to
  the builtin kernels, whose double rounding makes the file disagree more often with the model).
* ``bbits_int2``: the default with ``int2=True`` (experimental: 2-bit FULLY_CONNECTED weights as packed INT2;
  LiteRT's builtin kernel runs them, TFLite Micro does not).
* ``bbits_int8w``: ``int4=False`` (<= 4-bit layers stored as INT8 on a finer grid holding the learned one: the
  Edge TPU layout, and what XNNPACK runs natively).

Latency: ``ai_edge_litert`` interpreter, batch 1, ``num_threads=1``, once with the default XNNPACK delegate and
once with the builtin kernels only. The variants are timed round-robin (``--rounds`` rounds of ``--runs`` /
``--rounds`` invokes each, after ``--warmup``) so that load from other processes hits them alike; the median and
90th percentile of all invokes are reported. Ratios are tfmot_int8 / bbits (size: bbits / tfmot_int8).
"""
import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bbits_tf  # noqa: E402
from bbits_tf import data as data_lib  # noqa: E402
from bbits_tf import models, training  # noqa: E402
from bbits_tf._keras import keras, tfmot  # noqa: E402
import tflite_export as te  # noqa: E402
from tflite_export.verify import make_interpreter, quantize_input  # noqa: E402

QUICK_EPOCHS = 1


def quick_bbits_model(data, seed):
    """1 epoch of the "fast" recipe without warm-up (469 steps of batch 128)."""
    recipe = training.get_recipe("fast", epochs=QUICK_EPOCHS, warmup_epochs=0)
    result = training.run(models.lenet5, recipe, data, method="bb", seed=seed, verbose=0, print_fn=print)
    return result.model, {"source": "trained here", "recipe": recipe.to_dict(),
                          "steps": QUICK_EPOCHS * int(np.ceil(len(data[0][0]) / recipe.batch_size)),
                          "train_images": len(data[0][0]), "wall_s": result.wall_time_s}


def load_bbits_model(path):
    with bbits_tf.quantize_scope():
        return keras.models.load_model(path, compile=False)


def convert_float(model):
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def convert_tfmot(model, x_train, y_train, steps, seed):
    qat = tfmot.quantization.keras.quantize_model(model)
    qat.compile(optimizer=keras.optimizers.Adam(1e-4),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if steps:
        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train), seed=seed).batch(64)
        qat.fit(ds.repeat(), steps_per_epoch=steps, epochs=1, verbose=0)
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def latencies(variants, x, runs, rounds, warmup, delegates):
    """Median / p90 microseconds per invoke of every variant, timed round-robin."""
    interps = {}
    for name, data in variants.items():
        interp = make_interpreter(data, num_threads=1, delegates=delegates)
        interp.allocate_tensors()
        inp = interp.get_input_details()[0]
        interp.set_tensor(inp["index"], quantize_input(x[:1], inp))
        for _ in range(warmup):
            interp.invoke()
        interps[name] = interp
    times = {name: [] for name in variants}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, interp in interps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                interp.invoke()
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, t in times.items():
        t = np.sort(np.asarray(t)) * 1e6
        out[name] = {"median_us": float(np.median(t)), "p90_us": float(t[int(0.9 * (len(t) - 1))]), "n": len(t)}
    return out


def weight_summary(tflite_bytes):
    flat = te.read_flatbuffer(tflite_bytes)
    return {"ops": [op.name for op in flat.ops],
            "weights": [{"op": op.name, "type": w.type, "shape": list(w.shape), "bytes": w.nbytes}
                        for op, w, _, _ in te.flatbuffer.weight_tensors(flat)]}


def markdown(summary):
    v = summary["variants"]
    lines = ["| variant | file bytes | accuracy | XNNPACK median us | builtin median us |", "|---|---:|---:|---:|---:|"]
    for name, r in v.items():
        lines.append(f"| {name} | {r['file_bytes']:,} | {100 * r['accuracy']:.2f}% | "
                     f"{r['latency_xnnpack']['median_us']:.1f} | {r['latency_builtin']['median_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bbits-model", help="a trained bbits_tf LeNet5 (SavedModel dir or .h5); default: train "
                                              "one here (1 epoch)")
    parser.add_argument("--save-bbits-model", help="save the quickly trained model here (.h5)")
    parser.add_argument("--qat-steps", type=int, default=100, help="tfmot QAT fine-tuning steps (batch 64)")
    parser.add_argument("--runs", type=int, default=1000, help="timed invokes per variant and kernel set")
    parser.add_argument("--rounds", type=int, default=10, help="round-robin rounds the runs are split into")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "export.json"))
    args = parser.parse_args(argv)

    start = time.time()
    keras.utils.set_random_seed(args.seed)
    data = data_lib.load_mnist()
    (x_train, y_train), (x_test, y_test) = data
    if args.bbits_model:
        qmodel, origin = load_bbits_model(args.bbits_model), {"source": os.path.abspath(args.bbits_model)}
    else:
        qmodel, origin = quick_bbits_model(data, args.seed)
        if args.save_bbits_model:
            qmodel.save(args.save_bbits_model, include_optimizer=False)
            origin["saved_to"] = args.save_bbits_model
    x_rep = x_train[:1000]

    float_model = te.plain_model(qmodel)  # the same LeNet5 with the bbits model's inference weights
    variants = {"float": convert_float(float_model),
                "tfmot_int8": convert_tfmot(float_model, x_train, y_train, args.qat_steps, args.seed)}
    reports = {}
    for name, options in (("bbits", {}), ("bbits_int4_all", {"int4": True}), ("bbits_int2", {"int2": True}),
                          ("bbits_int8w", {"int4": False})):
        reports[name] = te.export(qmodel, None, representative_data=x_rep, io="float", input_range=(0.0, 1.0),
                                  validation_data=(x_test, y_test), tflm=False, **options)
        variants[name] = reports[name].model_bytes

    keras_acc = float(np.mean(qmodel.predict(x_test, verbose=0, batch_size=500).argmax(-1) == y_test))
    lat = {d: latencies(variants, x_test, args.runs, args.rounds, args.warmup, d) for d in ("default", "none")}
    results = {}
    for name, data_bytes in variants.items():
        out = te.run_litert(data_bytes, x_test)
        results[name] = {"file_bytes": len(data_bytes), "accuracy": float(np.mean(out.argmax(-1) == y_test)),
                         "latency_xnnpack": lat["default"][name], "latency_builtin": lat["none"][name],
                         **weight_summary(data_bytes)}
    for name, report in reports.items():
        results[name]["export"] = te.bbits.jsonable({
            "verification": report.to_dict()["verification"], "checks": report.checks,
            "learned_weight_bytes": report.learned_weight_bytes, "stored_weight_bytes": report.stored_weight_bytes,
            "stored_bias_bytes": report.stored_bias_bytes, "layers": report.to_dict()["bbits_layers"],
            "lsb_diffs": report.lsb_diffs, "problems": report.problems, "notes": report.notes})
    t, b = results["tfmot_int8"], results["bbits"]
    ratios = {f"{name}_size_over_tfmot_int8": results[name]["file_bytes"] / t["file_bytes"]
              for name in reports}
    ratios["float_size_over_bbits"] = results["float"]["file_bytes"] / b["file_bytes"]
    for kernels in ("xnnpack", "builtin"):
        for name in reports:
            ratios[f"tfmot_int8_over_{name}_latency_{kernels}"] = (
                t[f"latency_{kernels}"]["median_us"] / results[name][f"latency_{kernels}"]["median_us"])
    summary = {
        "benchmark": "LeNet5: float TFLite vs tfmot int8 vs bbits_tf (tflite_export.export)",
        "model": origin, "bbits_keras_accuracy": keras_acc, "qat_steps": args.qat_steps,
        "runs": args.runs, "rounds": args.rounds, "warmup": args.warmup, "batch": 1, "threads": 1,
        "bbits_profile": [dataclass_row(r) for r in bbits_tf.summary(qmodel).layers],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "tensorflow": tf.__version__,
                    "litert": _version("ai-edge-litert")},
        "ratios": ratios, "variants": results, "wall_s": time.time() - start,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=1)
    print(markdown(summary))
    print(reports["bbits"].format())
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    return summary


def dataclass_row(row):
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in vars(row).items()}


def _version(dist):
    try:
        from importlib.metadata import version  # pylint: disable=import-outside-toplevel
        return version(dist)
    except Exception:  # pylint: disable=broad-except
        return None


if __name__ == "__main__":
    main()
