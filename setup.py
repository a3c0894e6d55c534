"""Packaging for bbits_tf (Bayesian Bits quantization on tf_keras) and tflite_export."""
from setuptools import find_packages, setup

_TOP = ["bbits_tf", "tflite_export"]

setup(
    name="bbits_tf",
    version="0.1.0",
    description="Bayesian Bits: joint mixed-precision quantization and pruning for tf_keras, with TFLite export.",
    python_requires=">=3.11",
    # The top-level names are listed explicitly so that packaging works before/without an __init__.py;
    # find_packages adds any sub-packages.
    packages=sorted(set(_TOP) | set(find_packages(include=[f"{p}.*" for p in _TOP]))),
    # The shipped MNIST copy (IDX, gzip) that bbits_tf.data.load_mnist() reads by default.
    # csrc: the fused quantizer op's source, compiled on first use (bbits_tf.kernels; no compiler: graph fallback).
    package_data={"bbits_tf": ["datasets/mnist/*.gz", "csrc/*.cc"]},
    # The tested set (see ARCHITECTURE.md, "Verified facts about the stack").
    install_requires=[
        "tensorflow==2.21.*",
        "tf_keras==2.21.*",
        "tensorflow-model-optimization==0.8.*",
        "keras-tuner==1.4.*",
        "tensorboard==2.21.*",  # keras-tuner needs it at search time; TF 2.21 no longer pulls it in
        "tensorflow-datasets",
        "ai-edge-litert==2.3.*",
        "tflite-micro",  # examples/mnist.py runs the exported int8 model in the TFLite Micro interpreter
        "numpy",
        "matplotlib",
        "grpcio",  # bbits_tf.tuning's chief/worker sweeps (TensorFlow pulls it in today; imported directly)
        "flatbuffers",  # tflite_export.int2 rewrites the flatbuffer (also a TensorFlow dependency today)
    ],
    # constraints.txt pins the exact versions behind the README's numbers: pip install -e . -c constraints.txt
    extras_require={"test": ["pytest"]},
)
