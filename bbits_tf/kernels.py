"""The fused quantizer kernels: a TensorFlow custom op in C++ (``csrc/quantize_op.cc``), built on first use.

``bbits_tf.ops.quantize`` runs the gated residual quantizer as one op forward (``BbitsQuantize``) and one op
backward (``BbitsQuantizeGrad``: the input gradient and every per-level sum in one pass) where this module can
build and load the library, and as a TensorFlow graph (``ops._fused_quantize``: a division, rounding, clip and
multiply-add per level, forward and again backward) where it cannot. Both give the same values and gradients
(tests/test_kernels.py); the op is only faster.

Building: the first use compiles the source with the C++ compiler (``$CXX``, else ``g++``, ``c++`` or
``clang++``) against the installed TensorFlow's headers (``tf.sysconfig``), about 10 s, and caches the library in
``$BBITS_TF_CACHE`` (default ``~/.cache/bbits_tf``) under a name that hashes the source, the TensorFlow version,
the compiler and the CPU (it is built with ``-march=native``). No compiler, a failed build or a failed load: a
warning that says why, and the TensorFlow-graph path. The plain ``pip install -e .`` needs no compiler.

Switch: ``BBITS_TF_FUSED_OP=0`` (or ``set_enabled(False)``, before a model's train step is traced) uses the
TensorFlow-graph path; ``BBITS_TF_FUSED_OP=require`` raises instead of falling back. The op has a CPU kernel
only: where TensorFlow sees a GPU the graph path runs.
"""
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import tensorflow as tf

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "quantize_op.cc")
FLAGS = ["-std=c++17", "-shared", "-fPIC", "-O3", "-march=native", "-ffp-contract=off",
         "-Wno-deprecated-declarations"]
ENV_SWITCH = "BBITS_TF_FUSED_OP"
ENV_CACHE = "BBITS_TF_CACHE"
BUILD_TIMEOUT_S = 600

# Called while a train step is traced: not for AutoGraph to convert (it cannot read the standard library's source).
_plain_python = tf.autograph.experimental.do_not_convert

_state = {"lib": None, "tried": False, "reason": None, "path": None, "build_s": None, "enabled": None}


@_plain_python
def cache_dir():
    """Where built libraries are kept: ``$BBITS_TF_CACHE`` or ``~/.cache/bbits_tf``."""
    return os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "bbits_tf")


@_plain_python
def compiler():
    """The C++ compiler to build with (``$CXX`` first), or ``None``."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@_plain_python
def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor()


@_plain_python
@functools.lru_cache(maxsize=None)
def library_path(cxx):
    """The cached library's path for this source, TensorFlow, compiler and CPU (asks the compiler its version
    once per process)."""
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    for part in (tf.__version__, " ".join(FLAGS), version, platform.machine(), _cpu_flags(),
                 " ".join(tf.sysconfig.get_compile_flags())):
        key.update(part.encode())
    return os.path.join(cache_dir(), f"quantize_op-{tf.__version__}-{key.hexdigest()[:16]}.so")


@_plain_python
def build(cxx=None, verbose=True):
    """Compiles the op (if its cached library is missing) and returns the library's path; raises ``RuntimeError``
    with the compiler's message when it cannot."""
    cxx = cxx or compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, g++, c++, clang++)")
    path = library_path(cxx)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if verbose:
        print(f"bbits_tf: building the fused quantizer op with {cxx} (once per TensorFlow version and machine, "
              f"about 10 s) -> {path}", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        cmd = ([cxx] + FLAGS + [SOURCE, "-o", tmp] + tf.sysconfig.get_compile_flags()
               + tf.sysconfig.get_link_flags())
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        _state["build_s"] = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cxx)} failed (exit {done.returncode}): "
                               f"{done.stderr.strip()[-1500:]}")
        os.replace(tmp, path)  # atomic: processes building at once each write their own file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@_plain_python
def _mode():
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value not in ("0", "1", "require", "false", "true", "off", "on"):
        raise ValueError(f"${ENV_SWITCH} must be 0, 1 or require. Received: {ENV_SWITCH}={value!r}")
    return {"false": "0", "off": "0", "true": "1", "on": "1"}.get(value, value)


@_plain_python
def library(build_if_missing=True):
    """The loaded op library, or ``None`` (``status()['reason']`` says why). Tries once per process."""
    if _state["lib"] is not None or _state["tried"]:
        return _state["lib"]
    try:
        cxx = compiler()
        if build_if_missing:
            path = build(cxx)
        else:
            path = library_path(cxx) if cxx else None
            if path is None or not os.path.exists(path):
                return None  # not built yet; a later library() call builds it
        _state["lib"], _state["path"] = tf.load_op_library(path), path
    except (RuntimeError, OSError, subprocess.SubprocessError, tf.errors.OpError) as error:
        _state["reason"] = f"{type(error).__name__}: {error}"
        if _mode() == "require":
            raise RuntimeError(f"bbits_tf: the fused quantizer op is required (${ENV_SWITCH}=require) but "
                               f"unavailable: {_state['reason']}") from error
        warnings.warn(f"bbits_tf: the fused quantizer op is unavailable, quantizers run as TensorFlow graphs "
                      f"(same results, slower training). Reason: {_state['reason']}", RuntimeWarning, stacklevel=2)
    _state["tried"] = True
    return _state["lib"]


def set_enabled(value):
    """Uses (``True``) or not (``False``) the op in models traced from now on; ``None`` returns to the
    ``$BBITS_TF_FUSED_OP`` setting."""
    _state["enabled"] = None if value is None else bool(value)


@_plain_python
def enabled():
    """Whether ``ops.quantize`` uses the op in the graph it builds now (builds the library on the first call)."""
    if _state["enabled"] is False or (_state["enabled"] is None and _mode() == "0"):
        return False
    if tf.config.list_logical_devices("GPU"):
        if _state["reason"] is None:
            _state["reason"] = "a GPU is visible (the op has a CPU kernel only)"
        return False
    return library() is not None


@_plain_python
def in_xla_context():
    """Whether the graph being built now is compiled by XLA (``jit_compile=True``), which has no kernel for the op:
    there ``ops.quantize`` builds the TensorFlow-graph path."""
    from tensorflow.python.ops import control_flow_util  # pylint: disable=import-outside-toplevel

    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


@_plain_python
def status():
    """Plain data: whether the op is used, the library's path, its build time this process, why not."""
    return {"enabled": enabled(), "path": _state["path"], "build_s": _state["build_s"], "reason": _state["reason"],
            "switch": os.environ.get(ENV_SWITCH, "1")}


def _reset_for_tests():
    _state.update(lib=None, tried=False, reason=None, path=None, build_s=None, enabled=None)
