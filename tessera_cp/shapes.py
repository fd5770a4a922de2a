"""Shape-checked functions: ``Tensor["B", "S", "D"]`` annotations and the ``@tessera_cp.function`` decorator.

A ``TensorSpec`` lists one entry per dimension:

* a name (``"D"``): every dimension with that name, across all arguments and the return value, has ONE size;
* a literal int (``4``);
* an expression over names and ints with ``+ - * / //`` and parentheses (``"D/2"``, ``"B*S"``, ``"H*Dh"``).
  ``/`` must divide exactly. Expressions are parsed with ``ast`` into a small tree of their own; nothing is eval'd;
* ``"..."`` (or ``...``), once: any number of dimensions there, unchecked (``Tensor["...", "D"]``).

``Tensor[...]`` (the Tensor class's ``__class_getitem__``) and ``Tile[...]`` both make a TensorSpec; a dtype as the
last entry (``Tile["S", "D", bf16]``) is checked too.

``@function`` binds the arguments at call time: plain names first (in argument order), then expressions, solving
one whose only unknown name appears once (``"D/2"`` of size 32 gives D=64); an expression whose names never get
bound checks nothing. The return value is checked against the return annotation with the same bindings.
"""
import ast
import functools
import inspect
import typing

import numpy

from .dtypes import DType, as_dtype
from .errors import DTypeError, ShapeError

__all__ = ["TensorSpec", "Tile", "function", "Bindings", "spec_of"]


# ----------------------------------------------------------------------------------------------------------
# One dimension of a spec
# ----------------------------------------------------------------------------------------------------------

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//"}


class _NotWhole(Exception):
    """An exact division ('/') left a remainder; the message is the division, e.g. '7/2'."""


class _Dim:
    """A parsed dimension: kind is 'int', 'name', 'expr' or 'ellipsis'; text is how the user wrote it."""

    __slots__ = ("kind", "text", "value", "node", "names")

    def __init__(self, kind, text, value=None, node=None, names=()):
        self.kind, self.text, self.value, self.node, self.names = kind, text, value, node, names

    def evaluate(self, sizes):
        """The size this dimension must have, given sizes for all its names; raises _NotWhole."""
        return _evaluate(self.node, sizes)

    def solve(self, size, sizes):
        """The one unknown name and its value so that this expression equals ``size``.

        None when it cannot be solved directly (several unknowns, a name twice, or '//' on the path);
        raises _NotWhole when no whole, non-negative value works.
        """
        unknown = [n for n in self.names if n not in sizes]
        if len(set(unknown)) != 1 or len(unknown) != 1:
            return None
        name, node, target = unknown[0], self.node, size
        while isinstance(node, ast.BinOp):  # walk down to the unknown, inverting each operation on the way
            left_has = any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node.left))
            known = _evaluate(node.right if left_has else node.left, sizes)
            op = type(node.op)
            if op is ast.FloorDiv:
                return None  # x // k == t has k solutions
            if op is ast.Add:
                target = target - known
            elif op is ast.Sub:
                target = target + known if left_has else known - target
            elif op is ast.Mult:
                if known == 0 and target == 0:
                    return None  # 0 * x == 0 for every x: wait for x to be bound elsewhere
                target = _exact_div(target, known)
            elif left_has:  # x / k == t
                if known == 0:
                    raise _NotWhole(f"x/{known}")
                target = target * known
            else:  # k / x == t
                if known == 0 and target == 0:
                    return None
                target = _exact_div(known, target)
            node = node.left if left_has else node.right
        if target < 0:
            raise _NotWhole(f"{name}={target}")
        return name, target


def _exact_div(a, b):
    if b == 0 or a % b:
        raise _NotWhole(f"{a}/{b}")
    return a // b


def _evaluate(node, sizes):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return sizes[node.id]
    a, b = _evaluate(node.left, sizes), _evaluate(node.right, sizes)
    op = type(node.op)
    if op is ast.Add:
        return a + b
    if op is ast.Sub:
        return a - b
    if op is ast.Mult:
        return a * b
    if op is ast.Div:
        return _exact_div(a, b)
    if b == 0:
        raise _NotWhole(f"{a}//{b}")
    return a // b


def _check_node(node, text):
    """Allow only ints, names and + - * / // (the whole grammar of a dimension expression)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return
    if isinstance(node, ast.Name):
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        _check_node(node.left, text)
        _check_node(node.right, text)
        return
    raise ShapeError(f"dimension {text!r}: only names, ints, + - * / // and parentheses are allowed, "
                     f"found {ast.dump(node)[:60]}")


def _parse_dim(entry):
    if entry is Ellipsis or entry == "...":
        return _Dim("ellipsis", "...")
    if isinstance(entry, (int, numpy.integer)) and not isinstance(entry, (bool, numpy.bool_)):
        if entry < 0:
            raise ShapeError(f"a literal dimension must be >= 0, got {entry}")
        return _Dim("int", str(int(entry)), value=int(entry))
    if not isinstance(entry, str):
        raise ShapeError(f"a dimension is a name, an int, an expression string or '...', got {entry!r}")
    text = entry.strip()
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ShapeError(f"dimension {entry!r} is not a name, an int or an expression such as 'D/2'") from None
    _check_node(node, entry)
    if isinstance(node, ast.Constant):
        return _Dim("int", text, value=node.value)
    if isinstance(node, ast.Name):
        return _Dim("name", text, value=node.id, names=(node.id,))
    names = tuple(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
    if not names:  # an expression of ints only, e.g. "2*64": a literal
        try:
            return _Dim("int", text, value=_evaluate(node, {}))
        except _NotWhole:
            raise ShapeError(f"dimension {entry!r} is not a whole number") from None
    return _Dim("expr", text, node=node, names=names)


# ----------------------------------------------------------------------------------------------------------
# TensorSpec and Tile
# ----------------------------------------------------------------------------------------------------------

def _is_dtype_like(entry):
    return isinstance(entry, (DType, numpy.dtype)) or (isinstance(entry, type) and issubclass(entry, numpy.generic))


class TensorSpec:
    """The declared shape (and optionally dtype) of a tensor argument: what ``Tensor["B", "S", "D"]`` returns."""

    __slots__ = ("dims", "dtype", "_head", "_tail", "_ellipsis")

    def __init__(self, dims, dtype=None):
        if not isinstance(dims, tuple):
            dims = (dims,)
        if dtype is None and dims and _is_dtype_like(dims[-1]):
            dims, dtype = dims[:-1], dims[-1]
        parsed = tuple(_parse_dim(d) for d in dims)
        ellipses = [i for i, d in enumerate(parsed) if d.kind == "ellipsis"]
        if len(ellipses) > 1:
            raise ShapeError(f"a tensor spec may hold one '...', got {list(dims)}")
        self.dims = tuple(Ellipsis if d.kind == "ellipsis" else e for d, e in zip(parsed, dims))
        self.dtype = None if dtype is None else as_dtype(dtype)
        # dims before '...' count from the first axis, those after it from the last
        self._head = parsed[:ellipses[0]] if ellipses else parsed
        self._tail = parsed[ellipses[0] + 1:] if ellipses else ()
        self._ellipsis = bool(ellipses)

    @property
    def names(self):
        """Every dimension name this spec mentions, in order of first appearance."""
        return tuple(dict.fromkeys(n for d in self._head + self._tail for n in d.names))

    def __repr__(self):
        parts = ["..." if d is Ellipsis else repr(d) for d in self.dims]
        if self.dtype is not None:
            parts.append(self.dtype.name)
        return f"Tensor[{', '.join(parts)}]"

    def __eq__(self, other):
        return isinstance(other, TensorSpec) and (self.dims, self.dtype) == (other.dims, other.dtype)

    def __hash__(self):
        return hash((self.dims, self.dtype))

    # ``Tensor["S", "S"] | None`` as an annotation, like Optional[...]
    def __or__(self, other):
        return typing.Union[self, other]

    def __ror__(self, other):
        return typing.Union[other, self]

    def __call__(self, *args, **kwargs):
        # Python 3.10's typing.Optional[...] accepts only callables; a spec is an annotation, not a constructor.
        raise TypeError(f"{self!r} is a shape annotation; make tensors with tessera_cp.tensor(...)")


class _TileMeta(type):
    def __getitem__(cls, item):
        return TensorSpec(item)


class Tile(metaclass=_TileMeta):
    """``Tile["S", "D", bf16]``: a TensorSpec, its dtype (optional) last; the seeds annotate kernel arguments so."""

    def __new__(cls, *args, **kwargs):
        raise TypeError("Tile[...] is an annotation; it makes a TensorSpec and has no instances")


def spec_of(annotation):
    """(spec, optional) for an annotation that is a TensorSpec or Optional[TensorSpec]; (None, False) otherwise."""
    if isinstance(annotation, TensorSpec):
        return annotation, False
    if typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        specs = [a for a in args if isinstance(a, TensorSpec)]
        if len(specs) == 1 and len(args) == 2 and type(None) in args:
            return specs[0], True
    return None, False


# ----------------------------------------------------------------------------------------------------------
# Binding dimension names to sizes
# ----------------------------------------------------------------------------------------------------------

def _dtype_matches(expected, value):
    found = value.dtype
    if isinstance(found, DType):  # a Tensor knows its tessera dtype
        return found is expected, found.name
    try:
        np_dtype = numpy.dtype(found)
    except TypeError:
        return False, repr(found)
    # A raw array has only its storage: uint8 bits stand for fp8 (fp8 has no CuPy dtype).
    if expected.is_fp8 and np_dtype == expected.storage:
        return True, str(np_dtype)
    try:
        return as_dtype(np_dtype) is expected, str(np_dtype)
    except DTypeError:
        return False, str(np_dtype)


class Bindings:
    """Sizes bound to dimension names while checking the tensors of one call.

    ``where`` names the checked callable in messages ("rms_norm", "kernel scale_rows"). Call ``check`` for each
    (label, value, spec), then ``finish`` once to check the expressions; ``sizes`` maps each bound name to its size.
    """

    def __init__(self, where):
        self.where = where
        self.sizes = {}
        self.origin = {}    # name -> where its size came from, e.g. "argument 'x'"
        self._pending = []  # expression dims waiting for their names: (label, shape, axis, dim, spec)

    def bind(self, name, size, origin):
        """Bind ``name`` to ``size`` up front (e.g. from an int argument of the same name)."""
        self.sizes[name] = size
        self.origin[name] = origin

    def _bound(self, names):
        return ", ".join(f"{n}={self.sizes[n]} from {self.origin[n]}" for n in dict.fromkeys(names))

    def _fail(self, label, shape, spec, axis, dim, found, why):
        shown = f"dim {axis}" if dim.kind == "int" and dim.text == str(dim.value) else f"dim {axis} ({dim.text!r})"
        raise ShapeError(f"{self.where}: {label} of shape {shape} does not fit {spec!r}: {shown} is {found}, {why}")

    def check(self, label, value, spec, optional=False):
        """Check one value's kind, rank, dtype, literal and named dims; queue its expressions for ``finish``."""
        if value is None and optional:
            return
        shape = getattr(value, "shape", None)
        if shape is None:
            raise ShapeError(f"{self.where}: {label} must be a Tensor or an array to fit {spec!r}, "
                             f"got {type(value).__name__}")
        shape = tuple(int(s) for s in shape)
        rank = len(spec._head) + len(spec._tail)
        if spec._ellipsis:
            if len(shape) < rank:
                raise ShapeError(f"{self.where}: {label} must have at least {rank} dims to fit {spec!r}, "
                                 f"got shape {shape} ({len(shape)} dims)")
        elif len(shape) != rank:
            raise ShapeError(f"{self.where}: {label} must have {rank} dims to fit {spec!r}, "
                             f"got shape {shape} ({len(shape)} dims)")
        if spec.dtype is not None:
            ok, found = _dtype_matches(spec.dtype, value)
            if not ok:
                raise DTypeError(f"{self.where}: {label} must have dtype {spec.dtype.name} to fit {spec!r}, "
                                 f"got {found}")
        axes = [*enumerate(spec._head), *enumerate(spec._tail, start=len(shape) - len(spec._tail))]
        for axis, dim in axes:
            found = shape[axis]
            if dim.kind == "int":
                if found != dim.value:
                    self._fail(label, shape, spec, axis, dim, found, f"expected {dim.value}")
            elif dim.kind == "name":
                name = dim.value
                if name not in self.sizes:
                    self.bind(name, found, label)
                elif self.sizes[name] != found:
                    self._fail(label, shape, spec, axis, dim, found, f"but {self._bound([name])}")
            else:
                self._pending.append((label, shape, axis, dim, spec))

    def finish(self):
        """Check (or solve, then check) the queued expressions; those whose names stay unbound check nothing."""
        pending, progress = self._pending, True
        while pending and progress:
            progress, waiting = False, []
            for item in pending:
                label, shape, axis, dim, spec = item
                found = shape[axis]
                if all(n in self.sizes for n in dim.names):
                    self._check_expr(item)
                    progress = True
                    continue
                try:
                    solved = dim.solve(found, self.sizes)
                except (_NotWhole, ZeroDivisionError):
                    unknown = next(n for n in dim.names if n not in self.sizes)
                    known = [n for n in dim.names if n in self.sizes]
                    given = f" with {self._bound(known)}" if known else ""
                    self._fail(label, shape, spec, axis, dim, found,
                               f"but no whole {unknown} >= 0 gives {dim.text} = {found}{given}")
                if solved is None:
                    waiting.append(item)
                    continue
                self.bind(solved[0], solved[1], f"{label} (dim {axis}, {dim.text!r})")
                self._check_expr(item)
                progress = True
            pending = waiting
        self._pending = []

    def _check_expr(self, item):
        label, shape, axis, dim, spec = item
        found = shape[axis]
        try:
            expected = dim.evaluate(self.sizes)
        except _NotWhole as e:
            self._fail(label, shape, spec, axis, dim, found,
                       f"but {self._bound(dim.names)} and {e} is not a whole number")
        if expected != found:
            self._fail(label, shape, spec, axis, dim, found, f"expected {expected} since {self._bound(dim.names)}")


# ----------------------------------------------------------------------------------------------------------
# @function
# ----------------------------------------------------------------------------------------------------------

def resolved_signature(fn):
    """fn's signature with string annotations (``from __future__ import annotations``) evaluated when possible."""
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:  # a name the annotation uses is not defined yet: keep the strings (they check nothing)
        return inspect.signature(fn)


def _return_specs(annotation):
    """[(index, spec, optional)] for a return annotation; index None for a single tensor, 'each' for tuple[X, ...]."""
    spec, optional = spec_of(annotation)
    if spec is not None:
        return [(None, spec, optional)]
    if typing.get_origin(annotation) is tuple:
        items = typing.get_args(annotation)
    elif isinstance(annotation, tuple):
        items = annotation
    else:
        return []
    if len(items) == 2 and items[1] is Ellipsis:
        spec, optional = spec_of(items[0])
        return [("each", spec, optional)] if spec is not None else []
    out = [(i, *spec_of(item)) for i, item in enumerate(items)]
    if not any(s is not None for _, s, _ in out):
        return []
    return [("tuple", len(items), False)] + [o for o in out if o[1] is not None]


def function(fn):
    """Check a function's tensor arguments and return value against their ``Tensor[...]`` annotations.

    Raises ShapeError naming the function, the argument, the dimension (position and name), the size it should
    have (and which argument bound it) and the size it has; DTypeError for a dtype in a spec that does not match.
    """
    sig = resolved_signature(fn)
    where = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    params = []
    for p in sig.parameters.values():
        spec, optional = spec_of(p.annotation)
        if spec is not None:
            params.append((p.name, p.kind, spec, optional or p.default is None, p.default))
    returns = _return_specs(sig.return_annotation)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not params and not returns:
            return fn(*args, **kwargs)
        arguments = sig.bind(*args, **kwargs).arguments
        shapes = Bindings(where)
        for name, kind, spec, optional, default in params:
            value = arguments.get(name, default)
            if value is inspect.Parameter.empty:
                continue
            if kind is inspect.Parameter.VAR_POSITIONAL:
                for i, v in enumerate(value):
                    shapes.check(f"argument '{name}[{i}]'", v, spec, optional)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                for k, v in value.items():
                    shapes.check(f"argument '{name}[{k!r}]'", v, spec, optional)
            else:
                shapes.check(f"argument '{name}'", value, spec, optional)
        shapes.finish()
        result = fn(*args, **kwargs)
        if returns:
            _check_return(shapes, result, returns)
            shapes.finish()
        return result

    wrapper.__tessera_signature__ = sig
    return wrapper


def _check_return(shapes, result, returns):
    index, spec, optional = returns[0]
    if index is None:
        shapes.check("the return value", result, spec, optional)
        return
    if not isinstance(result, (tuple, list)):
        raise ShapeError(f"{shapes.where}: the return value must be a tuple, got {type(result).__name__}")
    if index == "each":
        for i, value in enumerate(result):
            shapes.check(f"return value [{i}]", value, spec, optional)
        return
    if len(result) != spec:  # ("tuple", length, False): the declared length
        raise ShapeError(f"{shapes.where}: the return value must be a tuple of {spec} items, got {len(result)}")
    for i, item_spec, item_optional in returns[1:]:
        shapes.check(f"return value [{i}]", result[i], item_spec, item_optional)

