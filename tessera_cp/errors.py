"""The errors tessera_cp raises. Each message says what was expected and what came."""


class TesseraError(Exception):
    """Base class of every error tessera_cp raises on bad input or a failed kernel build."""


class ShapeError(TesseraError, ValueError):
    """A tensor's rank or a dimension's size is not what the operation expects."""


class DTypeError(TesseraError, TypeError):
    """A tensor's dtype is not one the operation accepts."""


class DeviceError(TesseraError, RuntimeError):
    """The device asked for is missing, or tensors live on different devices."""


class CompileError(TesseraError, RuntimeError):
    """A CUDA source failed to compile; the message names the file and carries the compiler log."""


class IndexOutOfRangeError(TesseraError, IndexError):
    """An index points outside the tensor (raised before any read, on both backends)."""
