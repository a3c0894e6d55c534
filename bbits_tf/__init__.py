"""bbits_tf: Bayesian Bits (learned mixed-precision quantization and pruning) for tf_keras and TFLite."""
from bbits_tf import gates, kernels, models, ops
from bbits_tf.configs import BayesianBitsQuantizeConfig
from bbits_tf.quantize import (
    QuantizeReport,
    bayesian_bits_quantizers,
    get_mu,
    initialize_ranges,
    load_model,
    quantize_model,
    quantize_scope,
    ranges_initialized,
    regularization_loss,
    register_loading_objects,
    set_input_range,
    set_mu,
    variable_groups,
)
from bbits_tf.quantizers import BayesianBitsQuantizer
from bbits_tf.scheme import BayesianBitsQuantizeScheme

__version__ = "0.1.0"
from bbits_tf.bops import layer_bops, relative_bops  # noqa: E402
from bbits_tf.summary import ModelProfile, LayerProfile, format_summary, plot_summary, summary  # noqa: E402
from bbits_tf import callbacks  # noqa: E402  (NonFiniteGuard, BopsLogger, ...)
from bbits_tf._keras import keras  # noqa: E402  (tf_keras, the Keras 2 that tfmot needs: `from bbits_tf import keras`)

register_loading_objects()
kernels.library(build_if_missing=False)  # registers the fused quantizer op if built (SavedModels that hold it load)
