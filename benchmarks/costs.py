"""Deployment-cost predictions against exported files: bytes, TFLite Micro arena, LiteRT latency (issue 11).

Usage:
    python benchmarks/costs.py                                        # LeNet5 cases with forced gates
    python benchmarks/costs.py --models runs/flash32k-s0/model.h5 runs/fast-s0/model.h5   # trained models too
    python benchmarks/costs.py --smoke                                # two cases, few invokes (for the tests)

For each case, a Bayesian Bits LeNet5 (``bbits_tf.quantize_model``, ranges set on 32 MNIST-sized images) whose
gates are forced to a bit width and pruned fraction per layer, or a trained model: ``tflite_export.export``
(int8 io, the exporter's defaults, TFLite Micro run and arena search) beside ``bbits_tf.flash.flash_bytes``,
``bbits_tf.arena.arena_bytes`` and ``bbits_tf.latency.latency_us`` (with a table from
``tflite_export.profile_latency`` of the float LeNet5, measured once at the start). The file's latency is timed
as the table was (XNNPACK, batch 1, one thread, median of ``--runs`` invokes). Writes
``benchmarks/results/costs.json``: per case the three predictions, the three measurements and the relative errors
(the issue's targets: file bytes within 2 %, arena within 5 %, latency within 15 %).
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import bbits_tf  # noqa: E402
from bbits_tf import arena, flash, latency, models  # noqa: E402
from bbits_tf._keras import keras  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# log_alpha of the (z4, z8, z16, z32) bit gates that pick a bit width; -6 truncates the chain.
_BITS = {2: (-6.0, -6.0, -6.0, -6.0), 4: (6.0, -6.0, -6.0, -6.0), 8: (6.0, 6.0, -6.0, -6.0)}
# name -> layer -> (weight bits, output activation bits or None, kept fraction of the output channels)
CASES = {
    "init_w8a8": {},
    "light": {"conv1": (8, 8, 0.9), "conv2": (8, 4, 0.8), "fc1": (2, 8, 0.7)},
    "medium": {"conv1": (4, 8, 0.75), "conv2": (2, 4, 0.5), "fc1": (2, 8, 0.4), "fc2": (8, None, 1.0)},
    "small": {"conv1": (8, 2, 0.4), "conv2": (8, 2, 0.25), "fc1": (4, 4, 0.2), "fc2": (4, None, 1.0)},
    "tiny": {"conv1": (8, 2, 0.3), "conv2": (8, 2, 0.15), "fc1": (8, 4, 0.1), "fc2": (2, None, 1.0)},
}


def force(qmodel, spec, seed=0):
    rng = np.random.default_rng(seed)
    for wrapper, role, _, v in bbits_tf.bayesian_bits_quantizers(qmodel):
        name = wrapper.layer.name
        if name not in spec:
            continue
        w_bits, a_bits, keep = spec[name]
        bits = a_bits if role == "activation" else w_bits
        if bits is not None:
            v["log_alpha"].assign(_BITS[bits][: v["log_alpha"].shape[0]])
        if role == "weight" and "log_alpha_2" in v:
            la2 = np.full(v["log_alpha_2"].shape, 6.0, np.float32).reshape(-1)
            la2[rng.permutation(la2.size)[: int(round((1 - keep) * la2.size))]] = -6.0
            v["log_alpha_2"].assign(la2.reshape(v["log_alpha_2"].shape))


def measure(name, qmodel, x, table, runs):
    import tflite_export as te  # pylint: disable=import-outside-toplevel
    report = te.export(qmodel, None, representative_data=x, io="int8", lsb_samples=0, tflm_samples=5,
                       latency_table={**table, "runs": runs})
    p = report.predicted
    row = {"case": name, "file_bytes": report.file_bytes, "predicted_flash_bytes": p["flash_bytes"],
           "flash_error": p["flash_error"], "tflm_arena_bytes": report.tflm_arena_bytes,
           "predicted_arena_bytes": p["arena_bytes"], "arena_error": p["arena_error"],
           "measured_latency_us": p["measured_latency_us"], "predicted_latency_us": p["latency_us"],
           "latency_error": p["latency_error"], "checks_passed": report.passed,
           "relative_bops": bbits_tf.relative_bops(qmodel)}
    print(f"{name:<28}{row['file_bytes']:>9,} B ({100 * row['flash_error']:+.2f}%)  arena "
          f"{row['tflm_arena_bytes']:>8,} B ({100 * row['arena_error']:+.2f}%)  latency "
          f"{row['measured_latency_us']:6.1f} us ({100 * row['latency_error']:+.1f}%)", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[], help="trained Bayesian Bits LeNet5 models (model.h5)")
    parser.add_argument("--runs", type=int, default=1000, help="invokes per latency (median)")
    parser.add_argument("--smoke", action="store_true", help="two cases, 50 invokes, a coarse table")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "costs.json"))
    args = parser.parse_args(argv)
    import tflite_export as te  # pylint: disable=import-outside-toplevel

    started = time.time()
    runs = 50 if args.smoke else args.runs
    keras.utils.set_random_seed(0)
    fractions = (0.5,) if args.smoke else tuple(k / 8 for k in range(1, 9))
    table = te.profile_latency(models.lenet5(), fractions=fractions, runs=runs)
    x = np.random.default_rng(0).uniform(0, 1, (64, 28, 28, 1)).astype(np.float32)
    rows = []
    for name, spec in list(CASES.items())[: 2 if args.smoke else None]:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1)
        qmodel(x[:32], training=True)
        force(qmodel, spec)
        rows.append(measure(name, qmodel, x, table, runs))
    if args.models:
        from bbits_tf.data import load_mnist  # pylint: disable=import-outside-toplevel
        x_train = load_mnist()[0][0][:1000]
        for path in args.models:
            rows.append(measure(path, bbits_tf.load_model(path), x_train, table, runs))
    errors = {k: max(abs(r[k]) for r in rows) for k in ("flash_error", "arena_error", "latency_error")}
    result = {"rows": rows, "max_abs_error": errors, "latency_table": {k: v for k, v in table.items() if k != "layers"},
              "command_line": " ".join([sys.executable, *sys.argv]), "smoke": args.smoke,
              "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
              "date": datetime.date.today().isoformat(), "wall_time_s": time.time() - started}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1, default=float))
    print(f"largest errors: file {100 * errors['flash_error']:.2f}%, arena {100 * errors['arena_error']:.2f}%, "
          f"latency {100 * errors['latency_error']:.1f}%; wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
