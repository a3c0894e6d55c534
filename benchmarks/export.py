"""Float TFLite, tfmot int8 and bbits_tf TFLite of one model: file size, accuracy and LiteRT latency, in one run.

Usage:
    python benchmarks/export.py                                   # trains a quick bbits_tf LeNet5 first
    python benchmarks/export.py --bbits-model runs/mnist-bb-0/model.h5   # a trained model (.h5 or SavedModel)
    python benchmarks/export.py --runs 2000 --output benchmarks/results/export.json
    python benchmarks/export.py --model mobilenet_v2              # -> benchmarks/results/export_mobilenet_v2.json
    python benchmarks/export.py --model mobilenet_v2 --smoke      # a few steps and runs (for the tests)

``--model lenet5`` (the default) is described first; ``--model mobilenet_v2`` below.

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

``--model mobilenet_v2``: tf_keras ``applications.MobileNetV2`` (alpha 0.35, 32x32x3, 10 classes, logits;
``benchmarks/train_step.py``'s ``mobilenet_v2``) on MNIST padded to 32x32 with the channel repeated three times.
There is no trained run: the float model is trained ``--train-steps`` steps (batch 64, Adam 1e-3), then
``bbits_tf.quantize_model`` of it (mu 0.01, BatchNorm folded; ``--fixed-weight-bits`` fixes every weight's bit
width, else all gates stay at their initial w8a8) gets ``bbits_tf.initialize_ranges`` and ``--qat-steps`` steps
(Adam 1e-4), as does ``tfmot.quantization.keras.quantize_model`` of the same float model. Variants:

* ``float``: the trained float model, TFLiteConverter without optimizations (float input/output).
* ``tfmot_int8``: the tfmot QAT model converted with ``Optimize.DEFAULT`` and ``--io`` input/output (default int8).
* ``bbits``: ``tflite_export.export(qmodel, None, representative_data=..., io="int8", input_range=(0, 1))``
  (``bbits_int4_all`` too, ``int4=True``, when ``--fixed-weight-bits`` is 4 or less).

Accuracy on the first ``--test-images`` test images (default 2000; at these few steps it says little). If tfmot
cannot quantize or convert the model, its error is in ``errors`` and the ratios to it are left out.
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
from tflite_export.report import jsonable  # noqa: E402
from tflite_export.verify import make_interpreter, quantize_input  # noqa: E402
from benchmarks.train_step import MU, mnist_32x32x3, mobilenet_v2  # noqa: E402

QUICK_EPOCHS = 1
MODELS = ("lenet5", "mobilenet_v2")
QAT_LR = 1e-4  # fine-tuning learning rate of the quantized models (tfmot; bbits for mobilenet_v2)
# Per model: io, test images (None: all 10,000), representative images, LSB samples (None: export's default).
DEFAULTS = {"lenet5": {"io": "float", "test_images": None, "rep_images": 1000, "lsb_samples": None},
            "mobilenet_v2": {"io": "int8", "test_images": 2000, "rep_images": 200, "lsb_samples": 100}}
SMOKE = {"train_steps": 2, "qat_steps": 2, "runs": 20, "rounds": 2, "warmup": 5, "test_images": 100,
         "rep_images": 32, "lsb_samples": 10, "train_images": 1024}


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


def fine_tune(model, x_train, y_train, steps, lr, seed, batch_size=64):
    """Compiles ``model`` (Adam ``lr``, sparse cross-entropy on logits) and trains it ``steps`` steps."""
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if steps:
        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train), seed=seed)
        model.fit(ds.batch(batch_size).repeat(), steps_per_epoch=steps, epochs=1, verbose=0)
    return model


def convert_tfmot(model, x_train, y_train, steps, seed, io="float"):
    qat = fine_tune(tfmot.quantization.keras.quantize_model(model), x_train, y_train, steps, QAT_LR, seed)
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if io == "int8":
        converter.inference_input_type = converter.inference_output_type = tf.int8
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


def lenet5_variants(args, data):
    """The bbits LeNet5 (loaded or trained here) and its float model: ``(qmodel, float_model, origin)``."""
    if args.bbits_model:
        return load_bbits_model(args.bbits_model), None, {"source": os.path.abspath(args.bbits_model)}
    qmodel, origin = quick_bbits_model(data, args.seed)
    if args.save_bbits_model:
        qmodel.save(args.save_bbits_model, include_optimizer=False)
        origin["saved_to"] = args.save_bbits_model
    return qmodel, None, origin


def mobilenet_v2_variants(args, data):
    """MobileNetV2 trained ``--train-steps`` float steps, and bbits_tf of it fine-tuned ``--qat-steps`` steps."""
    (x_train, y_train), _ = data
    start = time.time()
    float_model = fine_tune(mobilenet_v2(args.seed), x_train, y_train, args.train_steps, 1e-3, args.seed)
    qmodel = bbits_tf.quantize_model(float_model, mu=MU["mobilenet_v2"], fixed_weight_bits=args.fixed_weight_bits,
                                     input_range=(0.0, 1.0))  # the export's input range
    bbits_tf.initialize_ranges(qmodel, x_train)
    fine_tune(qmodel, x_train, y_train, args.qat_steps, QAT_LR, args.seed)
    origin = {"source": "trained here", "float_steps": args.train_steps, "qat_steps": args.qat_steps,
              "batch_size": 64, "float_lr": 1e-3, "qat_lr": QAT_LR, "mu": MU["mobilenet_v2"],
              "fixed_weight_bits": args.fixed_weight_bits, "train_images": len(x_train),
              "wall_s": time.time() - start}
    return qmodel, float_model, origin


def load_data(args):
    """MNIST in the model's input shape; the training set cut to what the steps read, the test set to
    ``--test-images``."""
    train_limit = SMOKE["train_images"] if args.smoke else None
    if args.model == "mobilenet_v2":  # 32x32x3 float32 is 12 KB an image: keep only what training reads
        train_limit = min(60_000, max(1024, 64 * max(args.train_steps, args.qat_steps)))
    (x_train, y_train), (x_test, y_test) = data_lib.load_mnist(train_limit=train_limit)
    x_test, y_test = x_test[: args.test_images], y_test[: args.test_images]
    if args.model == "mobilenet_v2":
        x_train, x_test = mnist_32x32x3(x_train), mnist_32x32x3(x_test)
    return (x_train, y_train), (x_test, y_test)


def export_variants(args, qmodel, float_model, data, errors):
    """``(variants, reports, convert_s)``: the .tflite bytes by variant name, the bbits export reports and the
    seconds each conversion took. A tfmot failure goes to ``errors`` instead of ``variants``."""
    (x_train, y_train), (x_test, y_test) = data
    if float_model is None:
        float_model = te.plain_model(qmodel)  # LeNet5 with the bbits model's inference weights
    variants, convert_s = {}, {}
    start = time.time()
    variants["float"] = convert_float(float_model)
    convert_s["float"] = time.time() - start
    start = time.time()
    try:
        variants["tfmot_int8"] = convert_tfmot(float_model, x_train, y_train, args.qat_steps, args.seed, args.io)
        convert_s["tfmot_int8"] = time.time() - start  # QAT fine-tuning included
    except Exception as error:  # pylint: disable=broad-except
        errors["tfmot_int8"] = f"tfmot quantize_model / int8 conversion failed: {type(error).__name__}: {error}"
        print(f"tfmot_int8: left out, {errors['tfmot_int8']}")
    if args.model == "lenet5":
        options = (("bbits", {}), ("bbits_int4_all", {"int4": True}), ("bbits_int2", {"int2": True}),
                   ("bbits_int8w", {"int4": False}))
    else:
        options = (("bbits", {}),) + ((("bbits_int4_all", {"int4": True}),)
                                      if args.fixed_weight_bits and args.fixed_weight_bits <= 4 else ())
    lsb = {} if args.lsb_samples is None else {"lsb_samples": args.lsb_samples}
    reports = {}
    for name, option in options:
        start = time.time()
        reports[name] = te.export(qmodel, None, representative_data=x_train[: args.rep_images], io=args.io,
                                  input_range=(0.0, 1.0), validation_data=(x_test, y_test), tflm=False,
                                  **lsb, **option)
        variants[name] = reports[name].model_bytes
        convert_s[name] = time.time() - start  # verification included
    return variants, reports, convert_s


def ratios_of(results, reports):
    """Size ratios bbits / tfmot_int8 and latency ratios tfmot_int8 / bbits (none without tfmot_int8)."""
    ratios = {}
    if "tfmot_int8" in results:
        t = results["tfmot_int8"]
        ratios.update({f"{name}_size_over_tfmot_int8": results[name]["file_bytes"] / t["file_bytes"]
                       for name in reports})
    ratios["float_size_over_bbits"] = results["float"]["file_bytes"] / results["bbits"]["file_bytes"]
    if "tfmot_int8" in results:
        for kernels in ("xnnpack", "builtin"):
            for name in reports:
                ratios[f"tfmot_int8_over_{name}_latency_{kernels}"] = (
                    t[f"latency_{kernels}"]["median_us"] / results[name][f"latency_{kernels}"]["median_us"])
    return ratios


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default="lenet5")
    parser.add_argument("--bbits-model", help="a trained bbits_tf LeNet5 (SavedModel dir or .h5); default: train "
                                              "one here (1 epoch)")
    parser.add_argument("--save-bbits-model", help="save the quickly trained model here (.h5)")
    parser.add_argument("--train-steps", type=int, default=200,
                        help="mobilenet_v2: float training steps (batch 64) before quantization")
    parser.add_argument("--qat-steps", type=int, default=100,
                        help="tfmot QAT fine-tuning steps (batch 64); for mobilenet_v2 the bbits model's too")
    parser.add_argument("--fixed-weight-bits", type=int, help="mobilenet_v2: every weight at this bit width "
                                                              "(bbits_tf.quantize_model(fixed_weight_bits=...))")
    parser.add_argument("--io", choices=("float", "int8"), help="model input/output type of the bbits and tfmot "
                                                               "files (default: float for lenet5, int8 for "
                                                               "mobilenet_v2)")
    parser.add_argument("--test-images", type=int, help="test images for accuracy and verification (default: "
                                                        "10,000 for lenet5, 2,000 for mobilenet_v2)")
    parser.add_argument("--runs", type=int, default=1000, help="timed invokes per variant and kernel set")
    parser.add_argument("--rounds", type=int, default=10, help="round-robin rounds the runs are split into")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="a quick check: few training steps and invokes, few test images, small training set "
                             "(lenet5); default output *_smoke.json")
    parser.add_argument("--output", help="default benchmarks/results/export.json (lenet5) or "
                                         "export_<model>.json")
    args = parser.parse_args(argv)
    if args.model != "lenet5" and (args.bbits_model or args.save_bbits_model):
        parser.error(f"--bbits-model and --save-bbits-model are for LeNet5. Received: --model {args.model}")
    if args.model == "lenet5" and args.fixed_weight_bits is not None:
        parser.error("--fixed-weight-bits is for the model trained here (mobilenet_v2). Received: --model lenet5")
    defaults = dict(DEFAULTS[args.model])
    if args.smoke:
        defaults.update(test_images=SMOKE["test_images"], rep_images=SMOKE["rep_images"],
                        lsb_samples=SMOKE["lsb_samples"])
        args.train_steps, args.qat_steps = SMOKE["train_steps"], SMOKE["qat_steps"]
        args.runs, args.rounds, args.warmup = SMOKE["runs"], SMOKE["rounds"], SMOKE["warmup"]
    args.io = args.io or defaults["io"]
    args.test_images = args.test_images or defaults["test_images"]
    args.rep_images, args.lsb_samples = defaults["rep_images"], defaults["lsb_samples"]
    if args.output is None:
        stem = "export" + ("" if args.model == "lenet5" else f"_{args.model}") + ("_smoke" if args.smoke else "")
        args.output = os.path.join("benchmarks", "results", f"{stem}.json")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    keras.utils.set_random_seed(args.seed)
    data = load_data(args)
    (x_train, _), (x_test, y_test) = data
    build = lenet5_variants if args.model == "lenet5" else mobilenet_v2_variants
    qmodel, float_model, origin = build(args, data)
    errors = {}
    variants, reports, convert_s = export_variants(args, qmodel, float_model, data, errors)

    keras_acc = float(np.mean(qmodel.predict(x_test, verbose=0, batch_size=500).argmax(-1) == y_test))
    lat = {d: latencies(variants, x_test, args.runs, args.rounds, args.warmup, d) for d in ("default", "none")}
    results = {}
    for name, data_bytes in variants.items():
        out = te.run_litert(data_bytes, x_test)
        results[name] = {"file_bytes": len(data_bytes), "accuracy": float(np.mean(out.argmax(-1) == y_test)),
                         "latency_xnnpack": lat["default"][name], "latency_builtin": lat["none"][name],
                         "convert_s": convert_s[name], **weight_summary(data_bytes)}
    for name, report in reports.items():
        results[name]["export"] = jsonable({
            "verification": report.to_dict()["verification"], "checks": report.checks,
            "learned_weight_bytes": report.learned_weight_bytes, "stored_weight_bytes": report.stored_weight_bytes,
            "stored_bias_bytes": report.stored_bias_bytes, "layers": report.to_dict()["bbits_layers"],
            "lsb_diffs": report.lsb_diffs, "problems": report.problems, "notes": report.notes})
    ratios = ratios_of(results, reports)
    title = {"lenet5": "LeNet5", "mobilenet_v2": "MobileNetV2 (alpha 0.35, 32x32x3)"}[args.model]
    summary = {
        "benchmark": f"{title}: float TFLite vs tfmot int8 vs bbits_tf (tflite_export.export)",
        "model": origin, "bbits_keras_accuracy": keras_acc, "qat_steps": args.qat_steps,
        "runs": args.runs, "rounds": args.rounds, "warmup": args.warmup, "batch": 1, "threads": 1,
        "bbits_profile": [dataclass_row(r) for r in bbits_tf.summary(qmodel).layers],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "tensorflow": tf.__version__,
                    "litert": _version("ai-edge-litert")},
        "ratios": ratios, "variants": results, "wall_s": time.time() - start,
        "model_name": args.model, "io": args.io, "test_images": len(x_test), "errors": errors, "smoke": args.smoke,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=1)
    print(markdown(summary))
    print(reports["bbits"].format())
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    for name, error in errors.items():
        print(f"{name}: {error}")
    print(f"wrote {args.output}")
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
