"""Bring a finished ``examples/mnist.py`` run up to today's inference and exporter, without training again.

Loads ``RUN/model.h5``, evaluates it on the run's test set (the same images, padding and limits as the run's own
command line) and, for runs that exported, exports it again the way ``examples/mnist.py`` does
(``tflite_export.export_for_example``: ``model.tflite``, C arrays, verification on the test set). The run's
``results.json`` gets the new ``test_accuracy`` and ``tflite`` entries, and a ``reexported`` entry saying when,
with which command, and the values it replaced.

It gives what the run's own command gives with today's code only where training itself did not change: use it
for changes to inference or export (e.g. the int32 bias grid of 2026-11-30, ``BayesianBitsQuantizer.bias_on_grid``,
which changes what a model computes in inference only). Training changes need the run again.

Usage::

    python examples/reexport.py runs/beyond/resnet20 runs/fast-s0 ...
"""
import argparse
import datetime
import gc
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import mnist  # noqa: E402  (examples/mnist.py: its data handling)

import bbits_tf  # noqa: E402
from bbits_tf._keras import keras  # noqa: E402


def reexport(run_dir, export="auto", print_fn=print):
    """Re-evaluates (and re-exports) one run folder in place; returns the ``reexported`` entry.

    ``export``: "auto" exports the runs that exported (``results["tflite"]``), "always" every Bayesian Bits run,
    "never" none."""
    run_dir = pathlib.Path(run_dir)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text())
    args = results["settings"]["args"]
    data = mnist.load_data(args.get("data_dir"), args.get("tfds"), args.get("train_limit"), args.get("test_limit"),
                           args.get("model") or "lenet5")
    (x_train, _), (x_test, y_test) = data
    model = bbits_tf.load_model(str(run_dir / "model.h5"))
    if bbits_tf.bayesian_bits_quantizers(model):  # as examples/mnist.py now quantizes (training.run(input_range=...))
        bbits_tf.set_input_range(model, mnist.INPUT_RANGE)
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    accuracy = float(model.evaluate(x_test, y_test, batch_size=1000, verbose=0, return_dict=True)["accuracy"])
    entry = {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
             "replaced": {"test_accuracy": results.get("test_accuracy")}}
    results["test_accuracy"] = accuracy
    wanted = export == "always" or (export == "auto" and results.get("tflite") is not None)
    if wanted and bbits_tf.bayesian_bits_quantizers(model):
        import tflite_export  # pylint: disable=import-outside-toplevel

        old = results.get("tflite") or {}
        entry["replaced"]["tflite"] = {k: old.get(k) for k in ("file_bytes", "verification", "checks", "problems",
                                                               "tflm_max_lsb_diff")}
        results["tflite"] = tflite_export.export_for_example(model, run_dir, x_test, y_test, x_train=x_train,
                                                            print_fn=None)
    results["reexported"] = entry
    results_path.write_text(json.dumps(results, indent=2))
    if print_fn is not None:
        t = results.get("tflite") or {}
        v = t.get("verification") or {}
        print_fn(f"{run_dir}: test accuracy {entry['replaced']['test_accuracy']} -> {accuracy}"
                 + (f"; file {t.get('file_bytes')} B, top-1 agreement {v.get('top1_agreement')} "
                    f"(on grid {v.get('top1_agreement_on_grid')}), failed checks "
                    f"{[k for k, ok in (t.get('checks') or {}).items() if not ok]}" if t else ""))
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders of examples/mnist.py (with model.h5, results.json)")
    parser.add_argument("--export", choices=("auto", "always", "never"), default="auto",
                        help="auto: export again the runs that exported; always: every Bayesian Bits run; never")
    args = parser.parse_args(argv)
    for run in args.runs:
        reexport(run, export=args.export)
        keras.backend.clear_session()  # one model at a time: four mobile models in one process ran out of memory
        gc.collect()


if __name__ == "__main__":
    main()
