"""The README's "Beyond LeNet" table: VGG7, ResNet20 and MobileNetV2 on MNIST padded to 32x32.

    bash examples/beyond_lenet.sh                  # the three runs (examples/mnist.py --model ...), in runs/beyond/
    python examples/beyond_lenet.py                # the table, from runs/beyond/*/results.json

For each finished run it prints the test accuracy, the relative BOPs, the exported file (``model.tflite``, int8 io)
beside the same float architecture converted by tfmot's 8-bit QAT (``tfmot.quantization.keras.quantize_model``,
then the TFLite converter with int8 io and a representative set): the tfmot file's size depends on the architecture
only (int8 weights, int32 biases), so it is converted untrained. Then the LiteRT top-1 agreement of the exported
file with the Keras model, and the command. Writes ``results/beyond_lenet.json``.
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bbits_tf._keras import tfmot  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mnist as mnist_example  # noqa: E402  (MODELS, model_images)

RUNS = ("vgg7", "resnet20", "resnet20-fixed-mu", "mobilenet_v2")  # run folders in --runs, in table order


def tfmot_int8_bytes(model_name, images):
    """Bytes of the tfmot 8-bit QAT model of ``--model model_name`` converted to int8 TFLite (int8 io)."""
    float_model = mnist_example.build_model(model_name)()
    qat = tfmot.quantization.keras.quantize_model(float_model)
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None]] for x in images)
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return len(converter.convert())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/beyond", help="folder with one run folder per model")
    parser.add_argument("--output", default="results/beyond_lenet.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for run in RUNS:
        path = Path(args.runs) / run / "results.json"
        if not path.exists():
            print(f"{run}: no {path} (run examples/beyond_lenet.sh)")
            continue
        r = json.loads(path.read_text())
        if not r.get("complete"):
            print(f"{run}: {path} is not complete (run still going, or interrupted: the same command resumes it)")
            continue
        name = r.get("model", "lenet5")
        images = mnist_example.model_images(rng.random((16, 28, 28, 1)).astype(np.float32), name)
        t = r.get("tflite") or {}
        v = t.get("verification") or {}
        row = {
            "run": run, "model": name, "test_accuracy": r["test_accuracy"], "relative_bops": r["relative_bops"],
            "train_images": r["settings"]["train_images"], "epochs": r["epochs"],
            "tflite_bytes": t.get("file_bytes"), "tfmot_int8_bytes": tfmot_int8_bytes(name, images),
            "agreement": v.get("top1_agreement"), "agreement_on_grid": v.get("top1_agreement_on_grid"),
            "accuracy_tflite": v.get("accuracy_tflite"), "edgetpu_passed": (t.get("edgetpu") or {}).get("passed"),
            "export_checks_passed": t.get("passed"),
            "failed_checks": sorted(k for k, ok in (t.get("checks") or {}).items() if not ok),
            "accuracy_before_bn_recalibration": r["history"][-1].get("test_accuracy_before_bn_recalibration"),
            "tflm_arena_bytes": t.get("tflm_arena_bytes"), "wall_time_s": r["wall_time_s"],
            "command": "python examples/" + r["settings"]["command_line"].split("examples/", 1)[-1],
            "machine": r["settings"]["machine"], "date": r["settings"].get("date"),
            # examples/reexport.py: evaluated and exported again with later inference / export code
            "reexported": (r.get("reexported") or {}).get("date"),
        }
        rows.append(row)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    print("| run | train images, epochs | test accuracy (before BN recalibration) | relative BOPs | .tflite bytes "
          "| tfmot int8 bytes | ratio | LiteRT agreement (on grid) | failed export checks | training time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        size = row["tflite_bytes"]
        ratio = f"{size / row['tfmot_int8_bytes']:.3f}" if size else "-"
        agree = "-" if row["agreement"] is None else (
            f"{100 * row['agreement']:.2f} % ({100 * (row['agreement_on_grid'] or row['agreement']):.2f} %)")
        before = row["accuracy_before_bn_recalibration"]
        before = "" if before is None else f" ({100 * before:.2f} %)"
        failed = ", ".join(row["failed_checks"]) or "none"
        print(f"| {row['run']} | {row['train_images']:,}, {row['epochs']} | {100 * row['test_accuracy']:.2f} %{before} | "
              f"{row['relative_bops']:.3f} % | {size:,} | {row['tfmot_int8_bytes']:,} | {ratio} | {agree} | {failed} | "
              f"{row['wall_time_s'] / 60:.0f} min |")
    for row in rows:
        again = f" (evaluated and exported again on {row['reexported']}: `python examples/reexport.py " \
                f"runs/beyond/{row['run']}`)" if row["reexported"] else ""
        print(f"- {row['run']}: `{row['command']}`{again}")
    return rows


if __name__ == "__main__":
    main()
