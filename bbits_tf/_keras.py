"""The one place bbits_tf imports Keras.

tfmot 0.8 is built on Keras 2, which TensorFlow >= 2.16 ships separately as ``tf_keras``; ``tf.keras`` on
TF 2.21 is Keras 3 and breaks tfmot. Every module of the project imports Keras from here.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # makes tfmot and tfds pick tf_keras too

import tf_keras as keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
from tf_keras.src.engine.base_layer_utils import call_context  # noqa: E402  (the layer being called)

__all__ = ["call_context", "keras", "tfmot"]
