"""What ``examples/mnist.py`` does after training: export, verify, write C arrays, return a JSON-able summary."""
import os
from typing import Dict

import numpy as np

from .bbits import export_bbits
from .report import jsonable


def export_for_example(qmodel, output_dir, x_test, y_test, *, x_train=None, io: str = "int8",
                       input_range=(0.0, 1.0), print_fn=print, latency_table=None) -> Dict:
    """What examples/mnist.py does after training: write ``model.tflite`` and ``model_data.cc/.h`` to
    ``output_dir``, verify on the test set (LiteRT vs the bbits model, TFLM vs LiteRT), print, return a summary.

    Args:
        qmodel: the trained bbits model.
        output_dir: folder for the files.
        x_test, y_test: the test set (verification on all of it).
        x_train: training images; the first 1000 are the representative data (default: the first 1000 test images,
            which only set the logits' int8 range).
        io: "int8" (default: the file runs on microcontrollers as-is, and on phones) or "float".
        input_range: range of the 8-bit model input ((0, 1): MNIST pixels, exactly on the grid k / 255).
        print_fn: where the table goes (None: silent).
        latency_table: ``profile_latency``'s data, to compare the predicted latency with the file's.

    Returns:
        JSON-able dict: paths, sizes, checks, verification, per-layer accounting.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(str(output_dir), "model.tflite")
    rep = np.asarray(x_train if x_train is not None else x_test, np.float32)[:1000]
    report = export_bbits(qmodel, path, representative_data=rep, io=io, validation_data=(x_test, y_test),
                          input_range=input_range, c_array=True, tflm=True, latency_table=latency_table)
    if print_fn is not None:
        print_fn(f"TFLite export: {path} ({report.file_bytes} bytes), C arrays {report.c_source_path}, "
                 f"{report.c_header_path}")
        print_fn(report.format())
    d = report.to_dict()
    d.pop("prune", None)
    return jsonable(d)
