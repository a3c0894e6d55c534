"""Microcontrollers: the model as a C array, and a run in the TFLite Micro interpreter (from Python, on this CPU)."""
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional, Tuple

import numpy as np

from .verify import dequantize_output, output_scale, quantize_input, run_litert_any_batch

XXD_QUALIFIERS = ""  # what `xxd -i` writes: `unsigned char name[] = {...}; unsigned int name_len = N;`
MCU_QUALIFIERS = "alignas(16) const"  # flash-resident and aligned as TFLM wants its model


def c_identifier(name: str) -> str:
    """The identifier ``xxd -i`` derives from a file name: every character outside [A-Za-z0-9] becomes '_'."""
    ident = re.sub(r"[^A-Za-z0-9]", "_", name)
    return "__" + ident if ident[:1].isdigit() else ident


def to_c_array(tflite_bytes: bytes, name: str, *, qualifiers: str = MCU_QUALIFIERS) -> Tuple[str, str]:
    """(C source, header) holding the model bytes, laid out as ``xxd -i`` lays them out (12 bytes a line).

    Args:
        tflite_bytes: the model.
        name: array name (sanitized like xxd does); the length is ``<name>_len``.
        qualifiers: prefix of both definitions. ``XXD_QUALIFIERS`` ("") reproduces ``xxd -i`` byte for byte;
            the default ``MCU_QUALIFIERS`` keeps the array in flash and 16-byte aligned.
    """
    ident = c_identifier(name)
    data = bytes(tflite_bytes)
    lines = [", ".join(f"0x{b:02x}" for b in data[i:i + 12]) for i in range(0, len(data), 12)]
    prefix = f"{qualifiers} " if qualifiers else ""
    len_prefix = "const " if "const" in qualifiers.split() else ""
    source = (f"{prefix}unsigned char {ident}[] = {{\n  " + ",\n  ".join(lines) + "\n};\n"
              f"{len_prefix}unsigned int {ident}_len = {len(data)};\n")
    guard = ident.upper() + "_H_"
    const = "const " if "const" in qualifiers.split() else ""
    header = (f"#ifndef {guard}\n#define {guard}\n\n"
              f"extern {const}unsigned char {ident}[];\nextern {const}unsigned int {ident}_len;\n\n"
              f"#endif  // {guard}\n")
    return source, header


def _runtime():
    from tflite_micro.python.tflite_micro import runtime  # pylint: disable=import-outside-toplevel
    return runtime


def tflm_interpreter(tflite_bytes: bytes, arena_size: Optional[int] = None):
    """A TFLM interpreter (``arena_size`` None: the runtime's default, 10x the model size)."""
    return _runtime().Interpreter.from_bytes(bytes(tflite_bytes), arena_size=arena_size)


_PROBE = """
import sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
try:
    interp = runtime.Interpreter.from_file(sys.argv[1], arena_size=int(sys.argv[2]))
    detail = interp.get_input_details(0)
    interp.set_input(np.zeros(detail["shape"], detail["dtype"]), 0)
    interp.invoke()
except RuntimeError:
    sys.exit(1)
"""


def tflm_arena_bytes(tflite_bytes: bytes, granularity: int = 64) -> int:
    """The smallest tensor arena (to ``granularity`` bytes) in which TFLM allocates and invokes the model.

    Each size is tried in a child process: TFLite Micro's Python runtime (0.dev20261023182759) crashes the process
    (a segfault) for some arenas that are too small, instead of raising, e.g. for a MobileNetV2 at 60-70 KB
    ("Failed to allocate tail memory"). A crash counts as "does not fit".
    """
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.tflite")
        with open(path, "wb") as f:
            f.write(bytes(tflite_bytes))

        def fits(size):
            done = subprocess.run([sys.executable, "-c", _PROBE, path, str(size)], capture_output=True, check=False)
            return done.returncode == 0

        hi = max(4096, len(tflite_bytes))
        while not fits(hi):
            hi *= 2
            if hi > 1 << 30:
                raise RuntimeError("TFLM could not allocate the model in 1 GiB")
        lo = 0
        while hi - lo > granularity:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def run_tflm(tflite_bytes: bytes, x: np.ndarray, *, raw: bool = False, arena_size: Optional[int] = None):
    """Outputs of the model in TFLite Micro, one sample at a time (TFLM has a fixed batch of 1).

    Args:
        raw: return the stored output (int8 for int8 io) instead of dequantized floats.
    """
    interp = tflm_interpreter(tflite_bytes, arena_size)
    inp, out = interp.get_input_details(0), interp.get_output_details(0)
    results = []
    for sample in np.asarray(x):
        interp.set_input(quantize_input(sample[None], inp).reshape(inp["shape"]), 0)
        interp.invoke()
        y = np.array(interp.get_output(0))
        results.append(y if raw else dequantize_output(y, out))
    return np.concatenate(results)


def write_c_arrays(tflite_bytes: bytes, output_path: str, name: Optional[str] = None):
    """``<stem>_data.cc`` / ``<stem>_data.h`` next to ``output_path`` (array ``g_<stem>``, 16-byte aligned, const).

    The source includes its header: a namespace-scope ``const`` array has internal linkage in C++ unless an
    ``extern`` declaration is in scope.
    """
    stem = os.path.splitext(os.path.basename(output_path))[0]
    name = c_identifier(name or f"g_{stem}")
    base = os.path.join(os.path.dirname(os.path.abspath(output_path)), f"{stem}_data")
    source, header = to_c_array(tflite_bytes, name)
    with open(base + ".h", "w") as f:
        f.write(header)
    with open(base + ".cc", "w") as f:
        f.write(f'#include "{os.path.basename(base)}.h"\n\n' + source)
    return base + ".cc", base + ".h"


def tflm_check(tflite_bytes: bytes, x: np.ndarray):
    """(max |TFLM - LiteRT builtin| in output LSBs, arena bytes) on the inputs ``x`` (one at a time in TFLM)."""
    lite = run_litert_any_batch(tflite_bytes, x, raw=True, delegates="none")
    micro = run_tflm(tflite_bytes, x, raw=True)
    diff = np.abs(lite.astype(np.float64) - micro.astype(np.float64)).max() if len(x) else 0.0
    if lite.dtype == np.float32:  # float output: in steps of the int8 tensor behind the DEQUANTIZE
        diff = diff / output_scale(tflite_bytes)
    return float(diff), tflm_arena_bytes(tflite_bytes)
