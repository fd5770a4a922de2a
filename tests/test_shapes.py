"""Shape-checked functions: TensorSpec parsing, @function binding of named dims, expressions, dtypes, returns."""
import builtins
import inspect
import typing
from typing import Optional

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tessera_cp
from tessera_cp.dtypes import bf16, f32, fp8_e4m3, int32, uint8
from tessera_cp.errors import DTypeError, ShapeError
from tessera_cp.shapes import Bindings, TensorSpec, Tile, function
from tessera_cp.tensor import Tensor


def z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


# --------------------------------------------------------------------------------------------------------------
# TensorSpec and Tile
# --------------------------------------------------------------------------------------------------------------

def test_tensor_and_tile_make_specs():
    spec = Tensor["B", "S", "D"]
    assert isinstance(spec, TensorSpec)
    assert spec.dims == ("B", "S", "D") and spec.dtype is None
    assert Tensor["D"].dims == ("D",)
    tile = Tile["S", "D", bf16]
    assert tile.dims == ("S", "D") and tile.dtype is bf16
    assert Tensor["S", "D", bf16] == tile
    assert TensorSpec(("S", "D"), dtype="bf16") == tile
    assert Tile[4, "D/2"].dims == (4, "D/2")
    assert Tile["B*H", "S", "Dh+1"].names == ("B", "H", "S", "Dh")
    assert Tensor["...", "D"].dims == (Ellipsis, "D")
    assert repr(Tile["S", "D", bf16]) == "Tensor['S', 'D', bf16]"


def test_public_names():
    assert tessera_cp.function is function
    assert tessera_cp.Tile is Tile


@pytest.mark.parametrize("bad", [
    "__import__('builtins').setattr(__import__('builtins'), 'tessera_pwned', 1)",
    "D**2", "D%2", "x.y", "D[0]", "-D", "D/", "", "lambda: 1", "f(D)", "D if D else 1", "1.5", "True",
    -1, 2.0, None, True, ("D", "...", "..."), ("...", Ellipsis),
])
def test_malformed_or_unsafe_dims_are_refused(bad):
    with pytest.raises(ShapeError):
        TensorSpec(bad)
    assert not hasattr(builtins, "tessera_pwned")


# --------------------------------------------------------------------------------------------------------------
# @function: arguments
# --------------------------------------------------------------------------------------------------------------

@function
def rms_like(x: Tensor["B", "S", "D"], weight: Tensor["D"], eps: float = 1e-6) -> Tensor["B", "S", "D"]:
    """Returns x unchanged: the tests are about the checks."""
    return x


def test_matching_shapes_pass_and_the_result_comes_back():
    x = z(2, 3, 8)
    assert rms_like(x, z(8)) is x
    assert rms_like(x, weight=z(8), eps=0.5) is x


def test_wraps_the_function():
    assert rms_like.__name__ == "rms_like"
    assert rms_like.__doc__.startswith("Returns x unchanged")
    assert list(inspect.signature(rms_like).parameters) == ["x", "weight", "eps"]


def test_rank_mismatch_names_function_argument_and_shape():
    with pytest.raises(ShapeError) as e:
        rms_like(z(2, 3), z(3))
    msg = str(e.value)
    assert "rms_like" in msg and "argument 'x'" in msg and "3 dims" in msg and "(2, 3)" in msg


def test_named_dim_bound_twice_names_parameter_dim_and_both_sizes():
    with pytest.raises(ShapeError) as e:
        rms_like(z(2, 3, 64), z(32))
    msg = str(e.value)
    assert "rms_like" in msg and "argument 'weight'" in msg
    assert "dim 0 ('D') is 32" in msg and "D=64 from argument 'x'" in msg


def test_same_name_in_different_positions():
    @function
    def f(a: Tensor["B", "D"], b: Tensor["D", "B"]):
        return None

    f(z(2, 5), z(5, 2))
    with pytest.raises(ShapeError, match=r"argument 'b'.*dim 1 \('B'\) is 3, but B=2 from argument 'a'"):
        f(z(2, 5), z(5, 3))


def test_literal_dims():
    @function
    def f(x: Tensor[4, "D"]):
        return None

    f(z(4, 7))
    with pytest.raises(ShapeError, match=r"argument 'x' of shape \(5, 7\).*dim 0 is 5, expected 4"):
        f(z(5, 7))


def test_none_and_non_arrays_are_refused_for_required_tensors():
    with pytest.raises(ShapeError, match="argument 'weight' must be a Tensor or an array.*got NoneType"):
        rms_like(z(1, 1, 2), None)
    with pytest.raises(ShapeError, match="got list"):
        rms_like(z(1, 1, 2), [0.0, 0.0])


def test_optional_tensor_may_be_none_and_is_checked_when_given():
    @function
    def attention(q: Tensor["B", "H", "S", "D"], mask: Optional[Tensor["S", "S"]] = None):
        return None

    q = z(1, 2, 3, 4)
    attention(q)
    attention(q, None)
    attention(q, mask=z(3, 3))
    with pytest.raises(ShapeError, match=r"argument 'mask'.*dim 1 \('S'\) is 4, but S=3 from argument 'q'"):
        attention(q, mask=z(3, 4))


def test_pipe_none_is_optional_too():
    @function
    def f(x: Tensor["S"], m: Tensor["S"] | None):
        return None

    f(z(3), None)
    with pytest.raises(ShapeError):
        f(z(3), z(2))


def test_default_tensor_is_checked():
    @function
    def f(x: Tensor["D"], y: Tensor["D"] = np.zeros(3)):
        return None

    f(z(3))
    with pytest.raises(ShapeError, match=r"argument 'y'.*dim 0 \('D'\) is 3, but D=4 from argument 'x'"):
        f(z(4))


def test_var_positional_arguments_each_checked():
    @function
    def f(*xs: Tensor["D"]):
        return None

    f(z(3), z(3), z(3))
    with pytest.raises(ShapeError, match=r"argument 'xs\[2\]'.*is 4, but D=3 from argument 'xs\[0\]'"):
        f(z(3), z(3), z(4))


def test_string_annotations_are_resolved():
    @function
    def f(x: "Tensor['B', 'D']", w: "Tile['D', f32]"):
        return None

    f(z(2, 5), z(5))
    with pytest.raises(ShapeError):
        f(z(2, 5), z(6))
    with pytest.raises(DTypeError):
        f(z(2, 5), z(5, dtype=np.float64))


def test_methods_and_unannotated_arguments():
    class Layer:
        @function
        def __call__(self, x: Tensor["B", "D"], scale) -> Tensor["B", "D"]:
            return x * scale

    out = Layer()(z(2, 3) + 1, 2.0)
    np.testing.assert_array_equal(out, np.full((2, 3), 2.0, np.float32))
    with pytest.raises(ShapeError):
        Layer()(z(2), 2.0)


# --------------------------------------------------------------------------------------------------------------
# Ellipsis
# --------------------------------------------------------------------------------------------------------------

def test_ellipsis_takes_any_number_of_dims():
    @function
    def f(x: Tensor["...", "D"], w: Tensor["D"]) -> Tensor["...", "D"]:
        return x

    f(z(2, 3, 8), z(8))
    f(z(8), z(8))
    with pytest.raises(ShapeError, match=r"argument 'w'.*dim 0 \('D'\) is 7, but D=8 from argument 'x'"):
        f(z(2, 3, 8), z(7))
    with pytest.raises(ShapeError, match=r"argument 'x' must have at least 1 dims.*got shape \(\)"):
        f(z(), z(8))

    @function
    def g(x: Tensor["...", "S", "D"], y: Tensor["S"]):
        return None

    with pytest.raises(ShapeError, match=r"argument 'y'.*but S=3 from argument 'x'"):
        g(z(5, 4, 3, 2), z(4))  # S is axis 2 of x (3), not axis 1

    @function
    def h(x: Tensor["B", "...", "D"], y: Tensor["B", "D"]):
        return None

    h(z(2, 7), z(2, 7))
    h(z(2, 5, 5, 7), z(2, 7))
    with pytest.raises(ShapeError, match=r"argument 'y'.*dim 1 \('D'\) is 7, but D=6 from argument 'x'"):
        h(z(2, 5, 6), z(2, 7))

    @function
    def h2(y: Tensor["B", "D"], x: Tensor["B", "...", "D"]):
        return None

    with pytest.raises(ShapeError, match=r"argument 'x' of shape \(2, 5, 6\).*dim 2 \('D'\) is 6, but D=7 from "
                                         r"argument 'y'"):
        h2(z(2, 7), z(2, 5, 6))
    with pytest.raises(ShapeError, match=r"at least 2 dims"):
        h(z(2), z(2, 7))


# --------------------------------------------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------------------------------------------

@function
def halves(x: Tensor["B", "D"], h: Tensor["B", "D/2"]):
    return None


def test_expression_checked_after_names_bind():
    halves(z(2, 64), z(2, 32))
    with pytest.raises(ShapeError, match=r"argument 'h'.*dim 1 \('D/2'\) is 33, expected 32 since D=64"):
        halves(z(2, 64), z(2, 33))


def test_division_must_be_exact():
    with pytest.raises(ShapeError, match=r"D=63 from argument 'x' and 63/2 is not a whole number"):
        halves(z(2, 63), z(2, 31))


def test_product_of_two_names():
    @function
    def flatten(x: Tensor["B", "S", "D"], flat: Tensor["B*S", "D"]):
        return None

    flatten(z(2, 3, 4), z(6, 4))
    with pytest.raises(ShapeError, match=r"argument 'flat'.*dim 0 \('B\*S'\) is 7, expected 6 since B=2 .*S=3"):
        flatten(z(2, 3, 4), z(7, 4))
    flatten(z(0, 5, 4), z(0, 4))


def test_floor_division_and_parentheses():
    @function
    def f(x: Tensor["D"], a: Tensor["D//2"], b: Tensor["(D+1)/4"]):
        return None

    f(z(7), z(3), z(2))
    with pytest.raises(ShapeError, match=r"argument 'a'.*is 4, expected 3"):
        f(z(7), z(4), z(2))
    with pytest.raises(ShapeError, match=r"argument 'b'.*is 3, expected 2"):
        f(z(7), z(3), z(3))


def test_expression_solves_its_one_unknown():
    @function
    def f(h: Tensor["D/2"]) -> Tensor["D"]:
        return np.zeros(2 * h.shape[0] + f.extra)

    f.extra = 0
    f(z(32))
    f.extra = 1
    with pytest.raises(ShapeError, match=r"the return value of shape \(65,\).*is 65, but D=64 from argument 'h' "
                                         r"\(dim 0, 'D/2'\)"):
        f(z(32))


def test_plain_names_bind_before_expressions():
    @function
    def f(w: Tensor["H*Dh"], h: Tensor["H"], v: Tensor["Dh"]):
        return None

    f(z(64), z(4), z(16))
    with pytest.raises(ShapeError, match=r"argument 'w'.*is 64, expected 60 since H=4 from argument 'h', "
                                         r"Dh=15 from argument 'v'"):
        f(z(64), z(4), z(15))


def test_solving_uses_names_already_bound():
    @function
    def f(w: Tensor["H*Dh"], h: Tensor["H"]) -> Tensor["Dh"]:
        return np.zeros(f.n)

    f.n = 16
    f(z(64), z(4))
    f.n = 15
    with pytest.raises(ShapeError, match=r"return value.*is 15, but Dh=16 from argument 'w' \(dim 0, 'H\*Dh'\)"):
        f(z(64), z(4))
    with pytest.raises(ShapeError, match=r"no whole Dh >= 0 gives H\*Dh = 65 with H=4 from argument 'h'"):
        f(z(65), z(4))


def test_solutions_chain_across_arguments_in_any_order():
    @function
    def f(a: Tensor["A*B"], b: Tensor["B+1"], c: Tensor["A"]):
        return None

    f(z(12), z(4), z(4))  # c binds A=4 first; then A*B=12 gives B=3; B+1=4 checks
    with pytest.raises(ShapeError):
        f(z(12), z(4), z(5))

    @function
    def g(a: Tensor["A*B"], b: Tensor["B+1"]) -> Tensor["A"]:
        return np.zeros(g.n)

    g.n = 4
    g(z(12), z(4))  # only expressions: B=3 from b, then A=4 from a
    g.n = 5
    with pytest.raises(ShapeError, match=r"A=4 from argument 'a'"):
        g(z(12), z(4))


def test_unsolvable_linear_expression_is_a_mismatch():
    @function
    def f(h: Tensor["2*D"]):
        return None

    f(z(8))
    with pytest.raises(ShapeError, match=r"no whole D >= 0 gives 2\*D = 7"):
        f(z(7))

    @function
    def g(x: Tensor["D+5"]):
        return None

    g(z(5))
    with pytest.raises(ShapeError, match=r"no whole D >= 0 gives D\+5 = 3"):
        g(z(3))


def test_expression_of_names_never_bound_checks_nothing():
    @function
    def f(x: Tensor["B*S", "D"]):
        return None

    f(z(7, 3))


def test_zero_product_waits_for_the_other_name():
    @function
    def f(w: Tensor["B*S"], b: Tensor["B"], s: Tensor["S"]):
        return None

    f(z(0), z(0), z(5))
    with pytest.raises(ShapeError, match=r"argument 'w'.*is 1, expected 0"):
        f(z(1), z(0), z(5))


# --------------------------------------------------------------------------------------------------------------
# Return values
# --------------------------------------------------------------------------------------------------------------

def test_return_value_checked_with_the_arguments_bindings():
    @function
    def f(x: Tensor["B", "D"]) -> Tensor["B", "D"]:
        return x[:, :-1]

    with pytest.raises(ShapeError, match=r"f: the return value of shape \(2, 4\).*dim 1 \('D'\) is 4, "
                                         r"but D=5 from argument 'x'"):
        f(z(2, 5))


@pytest.mark.parametrize("annotation", [
    tuple[Tensor["B", "D"], Tensor["B"]],
    typing.Tuple[Tensor["B", "D"], Tensor["B"]],
    (Tensor["B", "D"], Tensor["B"]),
])
def test_tuple_returns(annotation):
    def body(x, n):
        return x, np.zeros(n)

    body.__annotations__.update(x=Tensor["B", "D"], n=int, **{"return": annotation})
    checked = function(body)
    checked(z(3, 4), 3)
    with pytest.raises(ShapeError, match=r"return value \[1\] of shape \(2,\).*is 2, but B=3 from argument 'x'"):
        checked(z(3, 4), 2)


def test_tuple_return_needs_a_tuple_of_the_declared_length():
    @function
    def f(x: Tensor["B"]) -> tuple[Tensor["B"], Tensor["B"]]:
        return f.out

    f.out = (z(2),)
    with pytest.raises(ShapeError, match="tuple of 2 items, got 1"):
        f(z(2))
    f.out = z(2)
    with pytest.raises(ShapeError, match="must be a tuple, got ndarray"):
        f(z(2))


def test_homogeneous_tuple_return():
    @function
    def split(x: Tensor["B", "D"]) -> tuple[Tensor["B", "..."], ...]:
        return split.out

    split.out = (z(2, 1), z(2, 5, 5))
    split(z(2, 6))
    split.out = (z(2, 1), z(3, 5))
    with pytest.raises(ShapeError, match=r"return value \[1\]"):
        split(z(2, 6))


def test_tuple_return_with_non_tensor_items():
    @function
    def f(x: Tensor["B"]) -> tuple[Tensor["B"], int]:
        return f.out

    f.out = (z(2), 7)
    f(z(2))
    f.out = (z(3), 7)
    with pytest.raises(ShapeError):
        f(z(2))


# --------------------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------------------

@function
def wants_bf16(x: Tile["S", "D", bf16], w: Tile["D", f32]):
    return None


def test_dtype_mismatch_raises_dtype_error():
    with pytest.raises(DTypeError, match=r"wants_bf16: argument 'x' must have dtype bf16.*got float32"):
        wants_bf16(z(2, 3), z(3))
    with pytest.raises(DTypeError, match=r"argument 'w' must have dtype f32.*got float64"):
        wants_bf16(Tensor(z(2, 3)).astype(bf16), z(3, dtype=np.float64))


def test_dtypes_of_tensors_and_arrays():
    wants_bf16(Tensor(z(2, 3)).astype(bf16), Tensor(z(3)))
    wants_bf16(z(2, 3, dtype=bf16.storage), z(3))
    with pytest.raises(DTypeError, match="got f16"):
        wants_bf16(Tensor(z(2, 3)).astype("f16"), z(3))


def test_fp8_spec_accepts_uint8_bits_of_raw_arrays_but_not_uint8_tensors():
    @function
    def f(x: Tile["N", fp8_e4m3]):
        return None

    f(Tensor(z(4, dtype=np.uint8), dtype=fp8_e4m3))
    f(z(4, dtype=np.uint8))  # a raw array carries only its storage
    with pytest.raises(DTypeError, match="got uint8"):
        f(Tensor(z(4, dtype=np.uint8), dtype=uint8))
    with pytest.raises(DTypeError):
        f(z(4, dtype=np.int8))


def test_rank_is_checked_before_dtype():
    @function
    def f(x: Tile["N", int32]):
        return None

    f(z(3, dtype=np.int32))
    with pytest.raises(ShapeError):
        f(z(3, 1, dtype=np.float32))  # wrong rank reported first
    with pytest.raises(DTypeError):
        f(z(3, dtype=np.int64))


# --------------------------------------------------------------------------------------------------------------
# Bindings (the machinery kernels use) and a property over many shapes
# --------------------------------------------------------------------------------------------------------------

def test_bindings_bound_up_front():
    shapes = Bindings("kernel k")
    shapes.bind("D", 5, "argument 'D'")
    with pytest.raises(ShapeError, match=r"kernel k: argument 'x'.*is 6, but D=5 from argument 'D'"):
        shapes.check("argument 'x'", z(6), Tile["D"])
    shapes = Bindings("kernel k")
    shapes.check("argument 'x'", z(3, 8), Tile["S", "D/2"])
    shapes.finish()
    assert shapes.sizes == {"S": 3, "D": 16}


@settings(max_examples=60, deadline=None)
@given(b=st.integers(0, 6), d=st.integers(0, 12), b2=st.integers(0, 6), h=st.integers(0, 7))
def test_halves_pass_exactly_when_shapes_agree(b, d, b2, h):
    ok = b == b2 and d == 2 * h
    try:
        halves(z(b, d), z(b2, h))
        passed = True
    except ShapeError:
        passed = False
    assert passed == ok
