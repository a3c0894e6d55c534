"""Bayesian Bits -> integer TFLite: remove pruned channels, carry each learned grid exactly, verify, emit C arrays.

The exporter's input is plain data (``LayerPlan`` per layer), not training-side classes::

    plans = {"conv1": LayerPlan(weight_bits=4, weight_step=0.05, act_bits=4, act_step=0.1, out_mask=mask), ...}
    report = export(float_model, "model.tflite", plans=plans, representative_data=x_train[:200], io="int8")
    verify(report.model_bytes, reference_keras_model, x_test, y_test)
    source, header = to_c_array(report.model_bytes, "model")

A trained Bayesian Bits model (``bbits_tf.quantize_model``) brings its own plans (``export_bbits``)::

    report = export(qmodel, "model.tflite", representative_data=x_train[:1000], io="int8",
                    validation_data=(x_test, y_test), c_array=True)     # -> BbitsExportReport
    print(report.format())
"""
from .export import (ExportReport, LayerExport, convert, deployment_model, export_plans, grid_weights, inspect,
                     planned_layers)
from .edgetpu import EdgeTpuProblem, EdgeTpuReport, edgetpu_check
from .example import export_for_example
from .bbits import (export, export_bbits, is_bbits_model, output_grids_from_bbits, plain_model,
                    plans_from_bbits)
from .flatbuffer import read as read_flatbuffer
from .micro import run_tflm, tflm_arena_bytes, to_c_array
from .plan import LayerPlan, quantize_activation, quantize_weight
from .prune import PruneReport, prune, prune_model
from .report import BbitsExportReport, BbitsLayer
from .quantizers import (FixedGridActivationQuantizer, FixedGridOutputConfig, FixedGridQuantizeConfig,
                         FixedGridScheme, FixedGridWeightQuantizer, FixedRangeQuantizer, quantize_scope)
from .verify import LayerRef, VerifyReport, layer_io, lsb_histograms, run_litert, verify

__all__ = [
    "BbitsExportReport", "BbitsLayer", "EdgeTpuProblem", "EdgeTpuReport", "edgetpu_check", "export_bbits", "export_for_example", "is_bbits_model", "plain_model",
    "plans_from_bbits", "output_grids_from_bbits",
    "ExportReport", "FixedGridActivationQuantizer", "FixedGridOutputConfig", "FixedGridQuantizeConfig",
    "FixedGridScheme",
    "FixedGridWeightQuantizer", "FixedRangeQuantizer", "LayerExport", "LayerPlan", "PruneReport",
    "VerifyReport", "convert", "deployment_model", "export", "export_plans", "grid_weights", "inspect",
    "planned_layers",
    "prune", "prune_model", "quantize_activation", "quantize_scope", "quantize_weight", "read_flatbuffer",
    "LayerRef", "layer_io", "lsb_histograms", "run_litert", "run_tflm", "tflm_arena_bytes", "to_c_array", "verify",
]
from .latency import profile_latency  # noqa: E402
from .verify import time_file  # noqa: E402

__all__ += ["profile_latency", "time_file"]
