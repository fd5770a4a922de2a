"""``precision(compute=..., accumulate=...)``: the numerics ops read when they choose their dtypes.

The setting is a per-thread stack: nested contexts restore the outer one on exit, and threads never see each
other's setting. ``accumulate`` is the dtype reductions sum in (f32 by default for half types, f64 when asked);
``compute`` is the dtype ops that honour it (the stable variants) upcast their inputs to.
"""
import contextlib
import threading

import numpy

from . import dtypes

_local = threading.local()
_DEFAULT = {"compute": None, "accumulate": None}


def _stack():
    if not hasattr(_local, "stack"):
        _local.stack = [dict(_DEFAULT)]
    return _local.stack


def current():
    """The active setting: a dict with 'compute' and 'accumulate' (a DType, or None for the op's default)."""
    return dict(_stack()[-1])


@contextlib.contextmanager
def precision(compute=None, accumulate=None):
    """Set compute and/or accumulate dtypes for the ops run inside; unspecified ones keep the outer setting."""
    setting = current()
    for key, value in (("compute", compute), ("accumulate", accumulate)):
        if value is not None:
            value = dtypes.as_dtype(value)
            if not value.is_floating or value.is_fp8:
                raise dtypes.DTypeError(f"precision({key}=...) expects f16, bf16, f32 or f64, got {value.name}")
            setting[key] = value
    _stack().append(setting)
    try:
        yield setting
    finally:
        _stack().pop()


def accumulate_storage(storage):
    """The NumPy dtype a reduction over ``storage`` values accumulates in."""
    storage = numpy.dtype(storage)
    asked = _stack()[-1]["accumulate"]
    if storage.kind != "f" and storage != dtypes.bf16.storage:
        return storage
    if asked is not None:
        return asked.storage if asked.itemsize >= storage.itemsize else storage
    return numpy.dtype(numpy.float32) if storage.itemsize < 4 else storage


def compute_dtype(default):
    """The DType an op that honours ``compute`` should run in: the asked one, else ``default``."""
    asked = _stack()[-1]["compute"]
    return asked if asked is not None else dtypes.as_dtype(default)
