"""Argument checks with Keras-style messages ("... Received: name=value"), shared by the public entry points."""
import math
import numbers


def number(name, value, *, minimum=None, maximum=None, strict_minimum=False):
    """``value`` as a float if it is a finite real number within the bounds; otherwise a clear error.

    Strings and booleans are rejected (``mu="0.1"`` would otherwise fail deep inside TensorFlow, ``True`` would
    silently count as 1).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number. Received: {name}={value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite. Received: {name}={value!r}")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise ValueError(f"`{name}` must be {'>' if strict_minimum else '>='} {minimum}. Received: {name}={value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}. Received: {name}={value!r}")
    return value


def integer(name, value, *, minimum=None):
    """``value`` as an int if it is one (NumPy ints too; not bools, not floats such as 15.0); otherwise an error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int. Received: {name}={value!r} of type {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}. Received: {name}={value!r}")
    return int(value)


def boolean(name, value):
    """``value`` if it is a bool (NumPy bools too); ``prune="no"`` would otherwise count as True."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"`{name}` must be True or False. Received: {name}={value!r} of type {type(value).__name__}")


def numbers_of_length(name, values, length):
    """``values`` as a tuple of ``length`` finite floats."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"`{name}` must be a sequence of {length} numbers. Received: {name}={values!r}")
    if len(values) != length:
        raise ValueError(f"`{name}` must have exactly {length} values. Received: {name}={tuple(values)!r}")
    return tuple(number(f"{name}[{i}]", v) for i, v in enumerate(values))
