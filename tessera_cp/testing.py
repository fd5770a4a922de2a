"""Test helpers: finite-difference gradient checks in float64 on the CPU, and low-precision error bounds."""
import numpy

from . import autograd
from .errors import TesseraError
from .tensor import Tensor


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0):
    """Check the tape's gradients of ``fn(*inputs)`` against central finite differences in float64.

    ``inputs`` are Tensors (those with requires_grad are checked; they must be f64 on the CPU so the differences
    are exact enough). The output is contracted with a fixed random cotangent, so every output element counts.
    Returns True or raises AssertionError naming the input and the worst element.
    """
    checked = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise TesseraError("gradcheck: no input requires grad")
    for t in checked:
        if t.data.dtype != numpy.float64 or t.device != "cpu":
            raise TesseraError(f"gradcheck needs f64 CPU inputs, got {t.dtype.name} on {t.device}")
    out = fn(*inputs)
    cotangent = numpy.random.default_rng(seed).standard_normal(out.shape)

    def objective():
        with autograd.no_grad():
            return float((fn(*inputs).data * cotangent).sum())

    for t in checked:
        t.grad = None
    (out * Tensor(cotangent)).sum().backward()
    for position, t in enumerate(checked):
        analytic = numpy.zeros(t.shape) if t.grad is None else t.grad.data
        numeric = numpy.zeros(t.shape)
        flat = t.data.reshape(-1)  # a view: perturbing it perturbs the input
        for i in range(flat.size):
            original = flat[i]
            flat[i] = original + eps
            plus = objective()
            flat[i] = original - eps
            minus = objective()
            flat[i] = original
            numeric.reshape(-1)[i] = (plus - minus) / (2 * eps)
        error = numpy.abs(analytic - numeric)
        bound = atol + rtol * numpy.abs(numeric)
        if (error > bound).any():
            worst = numpy.unravel_index(numpy.argmax(error - bound), t.shape)
            raise AssertionError(f"gradcheck: input {position} (shape {t.shape}) element {worst}: "
                                 f"analytic {analytic[worst]:.8g}, numeric {numeric[worst]:.8g}")
    return True


def relative_error(result, reference):
    """‖result − reference‖ / ‖reference‖ in float64 (NaN anywhere gives inf)."""
    result = numpy.asarray(result, dtype=numpy.float64)
    reference = numpy.asarray(reference, dtype=numpy.float64)
    if not numpy.isfinite(result).all():
        return float("inf")
    return float(numpy.linalg.norm(result - reference) / max(numpy.linalg.norm(reference), 1e-300))


def assert_low_precision_close(result, reference64, same_precision_reference, atol=1e-5, factor=2.0):
    """The flash-attention rule: a kernel's max error against the float64 result may be at most ``factor`` times
    the error of the plain reference run in the same low precision, plus ``atol``."""
    result = numpy.asarray(result, dtype=numpy.float64)
    reference64 = numpy.asarray(reference64, dtype=numpy.float64)
    plain = numpy.asarray(same_precision_reference, dtype=numpy.float64)
    assert numpy.isfinite(result).all(), "result has NaN or inf"
    kernel_error = float(numpy.abs(result - reference64).max())
    plain_error = float(numpy.abs(plain - reference64).max())
    assert kernel_error <= factor * plain_error + atol, (
        f"kernel error {kernel_error:.3g} exceeds {factor} x same-precision reference error {plain_error:.3g} + {atol}")
