"""Compiled (numba) kernels of the tree-forest index; ``pipeline.forest`` is the public face.

Everything that runs per item or per query lives here, in one place, so the hot loops can be read
and profiled together. All kernels use ``cache=True``; nothing here allocates Python objects.
Every result that is stored, or decides a split, a code or an answer, is summed in a fixed order
(see "fixed-order arithmetic" below): an index is the same bytes on every CPU and thread count.

Array layout of a forest (global over all trees; see ``pipeline/forest.py`` for the file format):

- ``vectors``  (n, dv) float32: the indexed rows as the kernels read them: unit-normalised for
  ``angular``, raw for ``euclidean``/``manhattan``, and for ``dot`` the raw row plus one extra column
  ``sqrt(M^2 - |x|^2)`` (M = the largest norm) so that every row has norm M and the trees can split
  by angle (maximum inner product reduced to angular search for the tree walk).
- ``split_basis`` (P, dv) float32: orthonormal rows (top principal directions of a sample of the
  rows) spanning the split space; a query's split coordinates are ``y = split_basis @ x``. With
  P == 0 (small dv, or a version 1 index) the split space is the rows themselves (y = x).
- ``item_codes`` (n, P) uint8 and ``code_coefs`` (2, P) float32 = (scale, min): each item's split
  coordinates to within half a code step (``code * scale + min``); the query's lower bound on an
  item's distance reads only these P bytes (empty when P == 0).
- ``planes``   (S, P or dv) int8 and ``plane_coefs`` (S, 2) float32 = (scale, offset): split node s
  sends x to its right child when its margin ``scale * <planes[s], y> + offset`` is > 0. The unit
  normal is stored quantised to int8 (a quarter of the bytes of float32; the split is a heuristic,
  and the build assigns sides with the same quantised plane that queries use). An all-zero plane
  marks a random split.
- ``children`` (S, 2) int32: a child code ``c >= 0`` is split node ``c``; ``c < 0`` is leaf ``-c - 1``.
- ``roots``    (n_trees,) int32: child code of each tree's root.
- ``leaf_offsets`` (L + 1,) int64 and ``leaf_items`` (n_trees * n,) int32: leaf l holds the item ids
  ``leaf_items[leaf_offsets[l]:leaf_offsets[l + 1]]``; tree t's leaves tile ``[t * n, (t + 1) * n)``.
- ``block_order`` (ceil(dv / 64),) int32: the order in which blocks of 64 dimensions are summed
  for euclidean/manhattan distances, largest variance first, so that the early exit against the
  current k-th distance comes after few blocks (identity for angular/dot).
"""

from __future__ import annotations

import math
import operator

import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, overload, register_model

ANGULAR, EUCLIDEAN, MANHATTAN, DOT = 0, 1, 2, 3
METRIC_CODES = {"angular": ANGULAR, "euclidean": EUCLIDEAN, "manhattan": MANHATTAN, "dot": DOT}

# Two-means refinement steps per split and the retry policy for lopsided splits.
TWO_MEANS_ITERATIONS = 100
SPLIT_ATTEMPTS = 3
MAX_SIDE_FRACTION = 0.95
# Euclidean/manhattan distances are summed in blocks of this many dimensions; after each block a
# candidate that is already farther than the current k-th best is abandoned. The blocks are always
# summed in the same order, so the value (and hence the answer) does not depend on the abandoning.
BLOCK = _BLOCK = 64

_U64_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_U64_M1 = np.uint64(0xBF58476D1CE4E5B9)
_U64_M2 = np.uint64(0x94D049BB133111EB)
_U64_30 = np.uint64(30)
_U64_27 = np.uint64(27)
_U64_31 = np.uint64(31)
_U64_63 = np.uint64(63)


# --------------------------------------------------------------------------------------------
# randomness: a splitmix64 stream whose state is one uint64 in an array (explicit seed, no globals)


@njit(cache=True, nogil=True)
def _next_u64(state):
    state[0] += _U64_GOLDEN
    z = state[0]
    z = (z ^ (z >> _U64_30)) * _U64_M1
    z = (z ^ (z >> _U64_27)) * _U64_M2
    return z ^ (z >> _U64_31)


@njit(cache=True, nogil=True)
def _rand_below(state, n):
    return np.int64(_next_u64(state) % np.uint64(n))


@njit(cache=True, nogil=True)
def _rand_bit(state):
    return np.int64(_next_u64(state) >> _U64_63)


# --------------------------------------------------------------------------------------------
# fixed-order arithmetic
#
# Every number the index stores, and every number that decides a split, a code or which
# neighbour a query returns, is computed here in an order written out in the code, so that it is
# the same on every CPU, vector width and thread count (no BLAS, no ``fastmath``, no libm call
# other than sqrt). A reduction that should still run at SIMD speed is written with ``Lanes``: a
# value of 16 float32 (or 8 float64) lanes that LLVM keeps in vector registers. Group g of a sum
# (elements 16g..16g+15) is added to accumulator g mod 4 (float64: g mod 2), so lane l of an
# accumulator sums its elements j = l (mod 16) in increasing j; the accumulators are added lane by
# lane, (acc0 + acc1) + (acc2 + acc3); ``vsum`` adds the lanes in a fixed halving tree (lane i +
# lane i + 8, then + 4, + 2, + 1); the elements past the last whole group follow one by one in
# increasing j. Each lane operation is one IEEE operation, so SSE, AVX2 and AVX-512 give the same
# bits, and no multiply is fused with an add (no ``contract`` flag, no FMA intrinsic). Kernels
# that sum along another axis (second moments, projection) state their order in the docstring.


class Lanes(types.Type):
    """A numba type: ``count`` lanes of ``dtype`` (float32 x 16 or float64 x 8) in one LLVM vector."""

    def __init__(self, dtype, count):
        self.dtype = dtype
        self.count = count
        super().__init__(name=f"Lanes({dtype}x{count})")


F32X16 = Lanes(types.float32, 16)
F64X8 = Lanes(types.float64, 8)
LANES32 = 16  # elements per float32 group
LANES64 = 8  # elements per float64 group


def _lane_llvm_type(lanes_type):
    elem = ir.FloatType() if lanes_type.dtype == types.float32 else ir.DoubleType()
    return ir.VectorType(elem, lanes_type.count)


@register_model(Lanes)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _lane_llvm_type(fe_type))


def _lanes_of(dtype):
    """The Lanes type that loads of an array of ``dtype`` give (small ints convert exactly to float32)."""
    if dtype == types.float64:
        return F64X8
    if dtype in (types.float32, types.uint8, types.int8):
        return F32X16
    return None


def _check_array(arr, ndim, what):
    if not (isinstance(arr, types.Array) and arr.ndim == ndim and arr.layout == "C" and _lanes_of(arr.dtype)):
        raise TypingError(f"{what} needs a C-contiguous {ndim}-d float32, float64, uint8 or int8 array; got {arr}")


def _load_lanes(context, builder, aryty, ary_value, inds, out):
    """Load ``out.count`` consecutive elements starting at ``ary[inds]`` (no bounds check: the
    kernels only load whole groups inside the array) and convert them to ``out``'s lanes."""
    ary = context.make_array(aryty)(context, builder, ary_value)
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)
    src = ir.VectorType(context.get_data_type(aryty.dtype), out.count)
    value = builder.load(builder.bitcast(ptr, src.as_pointer()), align=aryty.dtype.bitwidth // 8)
    if aryty.dtype == types.uint8:
        value = builder.uitofp(value, _lane_llvm_type(out))
    elif aryty.dtype == types.int8:
        value = builder.sitofp(value, _lane_llvm_type(out))
    return value


@intrinsic
def lanes(typingctx, arr, j):
    """``arr[j:j + count]`` of a 1-d array as Lanes (uint8/int8 converted to float32)."""
    _check_array(arr, 1, "lanes()")
    out = _lanes_of(arr.dtype)

    def codegen(context, builder, signature, args):
        jj = context.cast(builder, args[1], signature.args[1], types.intp)
        return _load_lanes(context, builder, signature.args[0], args[0], [jj], out)

    return out(arr, j), codegen


@intrinsic
def lanes_row(typingctx, arr, i, j):
    """``arr[i, j:j + count]`` of a 2-d array as Lanes (uint8/int8 converted to float32)."""
    _check_array(arr, 2, "lanes_row()")
    out = _lanes_of(arr.dtype)

    def codegen(context, builder, signature, args):
        ii = context.cast(builder, args[1], signature.args[1], types.intp)
        jj = context.cast(builder, args[2], signature.args[2], types.intp)
        return _load_lanes(context, builder, signature.args[0], args[0], [ii, jj], out)

    return out(arr, i, j), codegen


@intrinsic
def store_lanes_row(typingctx, arr, i, j, value):
    """``arr[i, j:j + count] = value`` for a writable 2-d array of the lanes' dtype."""
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and arr.layout == "C" and arr.mutable
            and isinstance(value, Lanes) and arr.dtype == value.dtype):
        raise TypingError(f"store_lanes_row() needs a writable C-contiguous 2-d array of {value}; got {arr}")

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ii = context.cast(builder, args[1], signature.args[1], types.intp)
        jj = context.cast(builder, args[2], signature.args[2], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [ii, jj], wraparound=False)
        builder.store(args[3], builder.bitcast(ptr, args[3].type.as_pointer()), align=aryty.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.void(arr, i, j, value), codegen


@intrinsic
def splat(typingctx, x):
    """Lanes that all hold the float32 (x 16) or float64 (x 8) scalar x."""
    if x not in (types.float32, types.float64):
        raise TypingError(f"splat() needs a float32 or float64; got {x}")
    out = _lanes_of(x)

    def codegen(context, builder, signature, args):
        vty = _lane_llvm_type(out)
        i32 = ir.IntType(32)
        one = builder.insert_element(ir.Constant(vty, ir.Undefined), args[0], ir.Constant(i32, 0))
        return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined),
                                      ir.Constant(ir.VectorType(i32, out.count), [0] * out.count))

    return out(x), codegen


def _zeros(out):
    def typer(typingctx):
        def codegen(context, builder, signature, args):
            return ir.Constant(_lane_llvm_type(out), [0.0] * out.count)

        return out(), codegen

    return intrinsic(typer)


zeros32 = _zeros(F32X16)
zeros64 = _zeros(F64X8)


def _lane_binop(llvm_op):
    def typer(typingctx, a, b):
        if not (isinstance(a, Lanes) and a == b):
            raise TypingError(f"lane {llvm_op} needs two Lanes of one type; got {a}, {b}")

        def codegen(context, builder, signature, args):
            return getattr(builder, llvm_op)(args[0], args[1])

        return a(a, b), codegen

    return intrinsic(typer)


_vadd = _lane_binop("fadd")
_vsub = _lane_binop("fsub")
_vmul = _lane_binop("fmul")


@intrinsic
def vmax(typingctx, a, b):
    """Per lane ``a if a > b else b`` (a maximum is exact, so it needs no fixed order)."""
    if not (isinstance(a, Lanes) and a == b):
        raise TypingError(f"vmax() needs two Lanes of one type; got {a}, {b}")

    def codegen(context, builder, signature, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vmax_lanes(typingctx, a):
    """The largest lane (halving tree, as ``vsum``)."""
    if not isinstance(a, Lanes):
        raise TypingError(f"vmax_lanes() needs Lanes; got {a}")

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        value, n = args[0], a.count
        while n > 1:
            h = n // 2
            lo = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(i32, h), list(range(h))))
            hi = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(i32, h), list(range(h, n))))
            value, n = builder.select(builder.fcmp_ordered(">", lo, hi), lo, hi), h
        return builder.extract_element(value, ir.Constant(i32, 0))

    return a.dtype(a), codegen


@overload(operator.add)
def _lanes_add(a, b):
    if isinstance(a, Lanes) and a == b:
        return lambda a, b: _vadd(a, b)
    return None


@overload(operator.iadd)
def _lanes_iadd(a, b):
    if isinstance(a, Lanes) and a == b:
        return lambda a, b: _vadd(a, b)
    return None


@overload(operator.sub)
def _lanes_sub(a, b):
    if isinstance(a, Lanes) and a == b:
        return lambda a, b: _vsub(a, b)
    return None


@overload(operator.mul)
def _lanes_mul(a, b):
    if isinstance(a, Lanes) and a == b:
        return lambda a, b: _vmul(a, b)
    return None


@intrinsic
def vabs(typingctx, a):
    """|a| per lane."""
    if not isinstance(a, Lanes):
        raise TypingError(f"vabs() needs Lanes; got {a}")

    def codegen(context, builder, signature, args):
        vty = args[0].type
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty]),
                                            f"llvm.fabs.v{a.count}f{a.dtype.bitwidth}")
        return builder.call(fn, [args[0]])

    return a(a), codegen


@intrinsic
def vmax0(typingctx, a):
    """Per lane ``a if a > 0 else 0``."""
    if not isinstance(a, Lanes):
        raise TypingError(f"vmax0() needs Lanes; got {a}")

    def codegen(context, builder, signature, args):
        zero = ir.Constant(args[0].type, [0.0] * a.count)
        return builder.select(builder.fcmp_ordered(">", args[0], zero), args[0], zero)

    return a(a), codegen


@intrinsic
def vsum(typingctx, a):
    """The sum of the lanes in a fixed tree: the upper half is added lane by lane to the lower
    half until one lane is left ((l0 + l8) + (l4 + l12)) + ... for 16 lanes."""
    if not isinstance(a, Lanes):
        raise TypingError(f"vsum() needs Lanes; got {a}")

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        value, n = args[0], a.count
        while n > 1:
            h = n // 2
            lo = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(i32, h), list(range(h))))
            hi = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(i32, h), list(range(h, n))))
            value, n = builder.fadd(lo, hi), h
        return builder.extract_element(value, ir.Constant(i32, 0))

    return a.dtype(a), codegen


# The reductions below sum in the order above (four float32 accumulators keep four vector
# additions in flight). They take a row of a 2-d array by index instead of a view of it (a view
# costs two reference-count calls), and are inlined into their callers (a call per candidate or
# per item would cost as much as the sum).


@njit(cache=True, nogil=True, inline="always")
def _dot_row(a, m, r):
    """<a, m[r]> for a (d,) float32 and m (rows, d) float32, or int8/uint8 (converted exactly):
    float32, in the fixed lane order."""
    n = a.shape[0]
    n1 = n - n % LANES32
    n4 = n - n % (4 * LANES32)
    acc0 = zeros32()
    acc1 = zeros32()
    acc2 = zeros32()
    acc3 = zeros32()
    for j in range(0, n4, 4 * LANES32):
        acc0 += lanes(a, j) * lanes_row(m, r, j)
        acc1 += lanes(a, j + LANES32) * lanes_row(m, r, j + LANES32)
        acc2 += lanes(a, j + 2 * LANES32) * lanes_row(m, r, j + 2 * LANES32)
        acc3 += lanes(a, j + 3 * LANES32) * lanes_row(m, r, j + 3 * LANES32)
    if n1 > n4:
        acc0 += lanes(a, n4) * lanes_row(m, r, n4)
    if n1 > n4 + LANES32:
        acc1 += lanes(a, n4 + LANES32) * lanes_row(m, r, n4 + LANES32)
    if n1 > n4 + 2 * LANES32:
        acc2 += lanes(a, n4 + 2 * LANES32) * lanes_row(m, r, n4 + 2 * LANES32)
    s = vsum((acc0 + acc1) + (acc2 + acc3))
    for j in range(n1, n):
        s += a[j] * np.float32(m[r, j])
    return s


@njit(cache=True, nogil=True, inline="always")
def _dot(a, b):
    """<a, b> of a (d,) float32 or int8 and b (d,) float32: float32, in _dot_row's order."""
    n = a.shape[0]
    n1 = n - n % LANES32
    n4 = n - n % (4 * LANES32)
    acc0 = zeros32()
    acc1 = zeros32()
    acc2 = zeros32()
    acc3 = zeros32()
    for j in range(0, n4, 4 * LANES32):
        acc0 += lanes(b, j) * lanes(a, j)
        acc1 += lanes(b, j + LANES32) * lanes(a, j + LANES32)
        acc2 += lanes(b, j + 2 * LANES32) * lanes(a, j + 2 * LANES32)
        acc3 += lanes(b, j + 3 * LANES32) * lanes(a, j + 3 * LANES32)
    if n1 > n4:
        acc0 += lanes(b, n4) * lanes(a, n4)
    if n1 > n4 + LANES32:
        acc1 += lanes(b, n4 + LANES32) * lanes(a, n4 + LANES32)
    if n1 > n4 + 2 * LANES32:
        acc2 += lanes(b, n4 + 2 * LANES32) * lanes(a, n4 + 2 * LANES32)
    s = vsum((acc0 + acc1) + (acc2 + acc3))
    for j in range(n1, n):
        s += b[j] * np.float32(a[j])
    return s


@njit(cache=True, nogil=True, inline="always")
def _sqdist_row(a, m, r, j0, j1):
    """||a[j0:j1] - m[r, j0:j1]||^2 for a (d,) and m (rows, d) float32: float32, in the fixed
    lane order counted from j0."""
    n1 = j1 - (j1 - j0) % LANES32
    n4 = j1 - (j1 - j0) % (4 * LANES32)
    acc0 = zeros32()
    acc1 = zeros32()
    acc2 = zeros32()
    acc3 = zeros32()
    for j in range(j0, n4, 4 * LANES32):
        t0 = lanes(a, j) - lanes_row(m, r, j)
        t1 = lanes(a, j + LANES32) - lanes_row(m, r, j + LANES32)
        t2 = lanes(a, j + 2 * LANES32) - lanes_row(m, r, j + 2 * LANES32)
        t3 = lanes(a, j + 3 * LANES32) - lanes_row(m, r, j + 3 * LANES32)
        acc0 += t0 * t0
        acc1 += t1 * t1
        acc2 += t2 * t2
        acc3 += t3 * t3
    if n1 > n4:
        t0 = lanes(a, n4) - lanes_row(m, r, n4)
        acc0 += t0 * t0
    if n1 > n4 + LANES32:
        t1 = lanes(a, n4 + LANES32) - lanes_row(m, r, n4 + LANES32)
        acc1 += t1 * t1
    if n1 > n4 + 2 * LANES32:
        t2 = lanes(a, n4 + 2 * LANES32) - lanes_row(m, r, n4 + 2 * LANES32)
        acc2 += t2 * t2
    s = vsum((acc0 + acc1) + (acc2 + acc3))
    for j in range(n1, j1):
        t = a[j] - m[r, j]
        s += t * t
    return s


@njit(cache=True, nogil=True, inline="always")
def _l1dist_row(a, m, r, j0, j1):
    """sum |a[j0:j1] - m[r, j0:j1]| for a (d,) and m (rows, d) float32: float32, in the fixed
    lane order counted from j0."""
    n1 = j1 - (j1 - j0) % LANES32
    n4 = j1 - (j1 - j0) % (4 * LANES32)
    acc0 = zeros32()
    acc1 = zeros32()
    acc2 = zeros32()
    acc3 = zeros32()
    for j in range(j0, n4, 4 * LANES32):
        acc0 += vabs(lanes(a, j) - lanes_row(m, r, j))
        acc1 += vabs(lanes(a, j + LANES32) - lanes_row(m, r, j + LANES32))
        acc2 += vabs(lanes(a, j + 2 * LANES32) - lanes_row(m, r, j + 2 * LANES32))
        acc3 += vabs(lanes(a, j + 3 * LANES32) - lanes_row(m, r, j + 3 * LANES32))
    if n1 > n4:
        acc0 += vabs(lanes(a, n4) - lanes_row(m, r, n4))
    if n1 > n4 + LANES32:
        acc1 += vabs(lanes(a, n4 + LANES32) - lanes_row(m, r, n4 + LANES32))
    if n1 > n4 + 2 * LANES32:
        acc2 += vabs(lanes(a, n4 + 2 * LANES32) - lanes_row(m, r, n4 + 2 * LANES32))
    s = vsum((acc0 + acc1) + (acc2 + acc3))
    for j in range(n1, j1):
        s += abs(a[j] - m[r, j])
    return s


@njit(cache=True, nogil=True, inline="always")
def _dot64(a, b):
    """<a, b> of a, b (d,) float64, in the fixed lane order; float64."""
    n = a.shape[0]
    n1 = n - n % LANES64
    n2 = n - n % (2 * LANES64)
    acc0 = zeros64()
    acc1 = zeros64()
    for j in range(0, n2, 2 * LANES64):
        acc0 += lanes(a, j) * lanes(b, j)
        acc1 += lanes(a, j + LANES64) * lanes(b, j + LANES64)
    if n1 > n2:
        acc0 += lanes(a, n2) * lanes(b, n2)
    s = vsum(acc0 + acc1)
    for j in range(n1, n):
        s += a[j] * b[j]
    return s


@njit(cache=True, nogil=True)
def block_variances(data):
    """Summed per-dimension variance of each block of _BLOCK dimensions: (ceil(dv / _BLOCK),) float64."""
    n, dv = data.shape
    s1 = np.zeros(dv, np.float64)
    s2 = np.zeros(dv, np.float64)
    for i in range(n):
        row = data[i]
        for j in range(dv):
            v = np.float64(row[j])
            s1[j] += v
            s2[j] += v * v
    n_blocks = (dv + _BLOCK - 1) // _BLOCK
    out = np.zeros(n_blocks, np.float64)
    for j in range(dv):
        mean = s1[j] / n
        out[j // _BLOCK] += max(s2[j] / n - mean * mean, 0.0)
    return out


@njit(cache=True, nogil=True)
def _normalize_inplace(v):
    nrm = np.sqrt(_dot(v, v))
    if nrm > 0:
        for j in range(v.shape[0]):
            v[j] /= nrm
    return nrm


# --------------------------------------------------------------------------------------------
# build


# LLVM >= 15 has opaque pointers and names the intrinsic by address space only.
_PREFETCH_NAME = "llvm.prefetch.p0" if llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"


@intrinsic
def prefetch_row(typingctx, arr, row, col):
    """Hint the CPU to load the cache line holding ``arr[row, col]`` (no effect on results)."""
    sig = types.void(arr, row, col)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        r = context.cast(builder, args[1], signature.args[1], types.intp)
        c = context.cast(builder, args[2], signature.args[2], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [r, c], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH_NAME)
        # read access, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def byte_codes(data):
    """Per-dimension uint8 codes of the rows, data ~ codes * scale + min.

    data (n, dv) float32 -> (codes (n, dv) uint8, scale (dv,) float32, min (dv,) float32).
    """
    n, dv = data.shape
    lo = data[0].copy()
    hi = data[0].copy()
    for i in range(1, n):
        row = data[i]
        for j in range(dv):
            v = row[j]
            lo[j] = min(lo[j], v)
            hi[j] = max(hi[j], v)
    scale = np.empty(dv, np.float32)
    inv = np.empty(dv, np.float32)
    for j in range(dv):
        span = hi[j] - lo[j]
        scale[j] = span / np.float32(255.0) if span > 0 else np.float32(1.0)
        inv[j] = np.float32(1.0) / scale[j]
    codes = np.empty((n, dv), np.uint8)
    for i in range(n):
        row = data[i]
        out = codes[i]
        for j in range(dv):
            c = (row[j] - lo[j]) * inv[j] + np.float32(0.5)  # round half up; c >= 0.5 here
            out[j] = np.uint8(np.int32(min(c, np.float32(255.0))))
    return codes, scale, lo


@njit(cache=True, nogil=True)
def nonfinite_rows(x):
    """Ids (int64) of the rows of x (n, d) float32 that hold a NaN or an infinity."""
    bad = []
    for i in range(x.shape[0]):
        row = x[i]
        for j in range(x.shape[1]):
            if not np.isfinite(row[j]):
                bad.append(i)
                break
    out = np.empty(len(bad), np.int64)
    for i in range(len(bad)):
        out[i] = bad[i]
    return out


# --------------------------------------------------------------------------------------------
# split basis: the top principal directions (about the origin) of a sample of the rows, and the
# projection of every row onto them. All fixed-order (see "fixed-order arithmetic").

# Rows whose second moments give the basis (all rows when there are fewer). On MNIST 8192 rows
# capture as much of the data's energy in the top 64 directions as 16384 to 3 digits (0.9162 vs
# 0.9167; the exact top 64 of all 60,000 rows: 0.9171), but 50 trees built on them gave recall@10
# about 0.001 lower at search_k 1,600 over four seeds; 16384 costs about 0.09 s more there.
BASIS_SAMPLE_ROWS = 16384
# Rows summed in float32 before their sums are added into the float64 second-moment matrix.
_GRAM_CHUNK = 128
# Orthogonal (subspace) iterations when the split space is under half the width; then the block
# holds split_dim * 3 / 2 vectors. MNIST-784 (64 of 784): the Rayleigh-Ritz values match the
# exact eigenvalues to 2e-5 after 8 iterations.
SUBSPACE_ITERATIONS = 10
JACOBI_MAX_SWEEPS = 60


@njit(cache=True, nogil=True)
def sample_rows(n, size, seed):
    """``min(size, n)`` distinct row ids of range(n), int64 ascending (Floyd's algorithm on the
    splitmix64 stream of ``seed``)."""
    if size >= n:
        return np.arange(n)
    state = np.empty(1, np.uint64)
    state[0] = np.uint64(seed)
    taken = np.zeros(n, np.bool_)
    for j in range(n - size, n):
        t = _rand_below(state, j + 1)
        if taken[t]:
            taken[j] = True
        else:
            taken[t] = True
    return np.flatnonzero(taken)


@njit(cache=True, nogil=True)
def second_moments(data, rows):
    """X^T X of the rows X = ``data[rows]`` (data (n, dv) float32, rows (m,) int64), times a
    power of two: (dv, dv) float64.

    The rows are first scaled by the power of two 2^-e that brings their largest magnitude into
    [0.5, 1) (exact; it keeps float32 products from overflowing or underflowing). Entry (a, b)
    is then the float64 sum, in chunk order, of float32 sums over chunks of _GRAM_CHUNK rows
    taken in ``rows`` order, of the float32 products x_a * x_b. The blocks are computed with
    float32 lanes over b (4 rows a by 32 columns b at a time, accumulators in registers).
    """
    dv = data.shape[1]
    d = (dv + 2 * LANES32 - 1) // (2 * LANES32) * (2 * LANES32)  # padded with zero columns
    big = np.float32(0.0)
    lane_big = zeros32()
    d1 = dv - dv % LANES32
    for r in range(rows.shape[0]):
        for j in range(0, d1, LANES32):
            lane_big = vmax(lane_big, vabs(lanes_row(data, rows[r], j)))
        for j in range(d1, dv):
            big = max(big, abs(data[rows[r], j]))
    big = max(big, vmax_lanes(lane_big))
    scale = np.float32(1.0)
    if big > 0:
        scale = np.float32(math.ldexp(1.0, -math.frexp(big)[1]))
    total = np.zeros((d, d), np.float64)
    part = np.zeros((d, d), np.float32)
    buf = np.zeros((_GRAM_CHUNK, d), np.float32)
    for c0 in range(0, rows.shape[0], _GRAM_CHUNK):
        c1 = min(c0 + _GRAM_CHUNK, rows.shape[0])
        for r in range(c0, c1):
            src = data[rows[r]]
            for j in range(dv):
                buf[r - c0, j] = src[j] * scale
        for a0 in range(0, d, 4):
            # blocks on or above the diagonal; the lower triangle is mirrored at the end
            for b0 in range(a0 - a0 % (2 * LANES32), d, 2 * LANES32):
                s00 = zeros32()
                s01 = zeros32()
                s10 = zeros32()
                s11 = zeros32()
                s20 = zeros32()
                s21 = zeros32()
                s30 = zeros32()
                s31 = zeros32()
                for r in range(c1 - c0):
                    x0 = lanes_row(buf, r, b0)
                    x1 = lanes_row(buf, r, b0 + LANES32)
                    v = splat(buf[r, a0])
                    s00 += v * x0
                    s01 += v * x1
                    v = splat(buf[r, a0 + 1])
                    s10 += v * x0
                    s11 += v * x1
                    v = splat(buf[r, a0 + 2])
                    s20 += v * x0
                    s21 += v * x1
                    v = splat(buf[r, a0 + 3])
                    s30 += v * x0
                    s31 += v * x1
                store_lanes_row(part, a0, b0, s00)
                store_lanes_row(part, a0, b0 + LANES32, s01)
                store_lanes_row(part, a0 + 1, b0, s10)
                store_lanes_row(part, a0 + 1, b0 + LANES32, s11)
                store_lanes_row(part, a0 + 2, b0, s20)
                store_lanes_row(part, a0 + 2, b0 + LANES32, s21)
                store_lanes_row(part, a0 + 3, b0, s30)
                store_lanes_row(part, a0 + 3, b0 + LANES32, s31)
        for a in range(d):
            for b in range(a - a % (2 * LANES32), d):
                total[a, b] += np.float64(part[a, b])
    out = np.empty((dv, dv), np.float64)
    for a in range(dv):
        for b in range(a, dv):
            out[a, b] = total[a, b]
            out[b, a] = total[a, b]
    return out


@njit(cache=True, nogil=True)
def _jacobi_eigen(a, max_sweeps):
    """Eigenvalues (m,) and eigenvectors (rows of (m, m)) of the symmetric a (m, m) float64,
    which is overwritten: cyclic Jacobi rotations in row order with the thresholds of Numerical
    Recipes' ``jacobi`` (only +, -, *, / and sqrt: the same bits on every machine)."""
    m = a.shape[0]
    vt = np.zeros((m, m), np.float64)
    d = np.empty(m, np.float64)
    b = np.empty(m, np.float64)
    z = np.zeros(m, np.float64)
    for p in range(m):
        vt[p, p] = 1.0
        d[p] = a[p, p]
        b[p] = a[p, p]
    for sweep in range(max_sweeps):
        sm = 0.0
        for p in range(m):
            for q in range(p + 1, m):
                sm += abs(a[p, q])
        if sm == 0.0:
            break
        tresh = 0.2 * sm / (m * m) if sweep < 3 else 0.0
        for p in range(m):
            for q in range(p + 1, m):
                g = 100.0 * abs(a[p, q])
                if sweep > 3 and abs(d[p]) + g == abs(d[p]) and abs(d[q]) + g == abs(d[q]):
                    a[p, q] = 0.0
                    a[q, p] = 0.0
                    continue
                if abs(a[p, q]) <= tresh:
                    continue
                h = d[q] - d[p]
                if abs(h) + g == abs(h):
                    t = a[p, q] / h
                else:
                    theta = 0.5 * h / a[p, q]
                    t = 1.0 / (abs(theta) + np.sqrt(1.0 + theta * theta))
                    if theta < 0.0:
                        t = -t
                c = 1.0 / np.sqrt(1.0 + t * t)
                s = t * c
                tau = s / (1.0 + c)
                h = t * a[p, q]
                z[p] -= h
                z[q] += h
                d[p] -= h
                d[q] += h
                a[p, q] = 0.0
                a[q, p] = 0.0
                # rows p and q hold the upper and lower parts the rotation changes; the matrix is
                # kept symmetric by writing each new value into both places
                for k in range(m):
                    if k == p or k == q:
                        continue
                    gp = a[p, k]
                    gq = a[q, k]
                    np_ = gp - s * (gq + gp * tau)
                    nq = gq + s * (gp - gq * tau)
                    a[p, k] = np_
                    a[k, p] = np_
                    a[q, k] = nq
                    a[k, q] = nq
                for k in range(m):
                    gp = vt[p, k]
                    gq = vt[q, k]
                    vt[p, k] = gp - s * (gq + gp * tau)
                    vt[q, k] = gq + s * (gp - gq * tau)
        for p in range(m):
            b[p] += z[p]
            d[p] = b[p]
            z[p] = 0.0
    return d, vt


@njit(cache=True, nogil=True)
def _times_symmetric(cov, vecs, out):
    """out[c] = cov @ vecs[c] for cov (dv, dv) symmetric float64 and vecs, out (m, dv) float64.

    out[c, a] is the float64 sum over b in increasing order of vecs[c, b] * cov[b, a] (float64
    lanes over a, four rows c at a time, so a strip of cov is read once per four vectors).
    """
    m, dv = vecs.shape
    m4 = m - m % 4
    a8 = dv - dv % LANES64
    for a0 in range(0, a8, LANES64):
        for c in range(0, m4, 4):
            s0 = zeros64()
            s1 = zeros64()
            s2 = zeros64()
            s3 = zeros64()
            for b in range(dv):
                col = lanes_row(cov, b, a0)
                s0 += splat(vecs[c, b]) * col
                s1 += splat(vecs[c + 1, b]) * col
                s2 += splat(vecs[c + 2, b]) * col
                s3 += splat(vecs[c + 3, b]) * col
            store_lanes_row(out, c, a0, s0)
            store_lanes_row(out, c + 1, a0, s1)
            store_lanes_row(out, c + 2, a0, s2)
            store_lanes_row(out, c + 3, a0, s3)
        for c in range(m4, m):
            s0 = zeros64()
            for b in range(dv):
                s0 += splat(vecs[c, b]) * lanes_row(cov, b, a0)
            store_lanes_row(out, c, a0, s0)
    for a in range(a8, dv):
        for c in range(m):
            t = 0.0
            for b in range(dv):
                t += vecs[c, b] * cov[b, a]
            out[c, a] = t


@njit(cache=True, nogil=True)
def _orthonormalize(vecs, passes):
    """Modified Gram-Schmidt (``passes`` times) on the rows of vecs (m, dv) float64, in row order. A row
    that is (numerically) in the span of the rows before it is replaced by the first unit
    vector e_j that is not, so the rows stay orthonormal for rank-deficient data."""
    m, dv = vecs.shape
    next_unit = 0
    for c in range(m):
        row = vecs[c]
        before = np.sqrt(_dot64(row, row))
        while True:
            for _ in range(passes):
                for r in range(c):
                    coef = _dot64(row, vecs[r])
                    for j in range(dv):
                        row[j] -= coef * vecs[r, j]
            nrm = np.sqrt(_dot64(row, row))
            if (nrm > 1e-9 * before and nrm > 0.0) or next_unit >= dv:
                break  # (next_unit < dv always: the callers pass fewer rows than columns)
            row[:] = 0.0
            row[next_unit] = 1.0
            next_unit += 1
            before = 1.0
        if nrm > 0.0:
            for j in range(dv):
                row[j] /= nrm


@njit(cache=True, nogil=True)
def top_directions(cov, n_dirs, seed):
    """The ``n_dirs`` leading eigenvectors of the symmetric positive semi-definite cov (dv, dv)
    float64 as orthonormal rows (n_dirs, dv) float64, by decreasing eigenvalue (ties: lower
    index first), each with its largest-magnitude component positive.

    Up to twice n_dirs columns: Jacobi on cov itself. Wider: orthogonal iteration of a block of
    n_dirs * 3 / 2 vectors (started from the splitmix64 stream of ``seed``) for
    SUBSPACE_ITERATIONS steps, then Rayleigh-Ritz with Jacobi on the block's small matrix.
    """
    dv = cov.shape[0]
    if dv <= 2 * n_dirs:
        vals, vecs = _jacobi_eigen(cov.copy(), JACOBI_MAX_SWEEPS)
    else:
        m = n_dirs + n_dirs // 2
        state = np.empty(1, np.uint64)
        state[0] = np.uint64(seed)
        block = np.empty((m, dv), np.float64)
        for c in range(m):
            for j in range(dv):  # uniform in [-1, 1): 53 random bits, exact
                block[c, j] = np.float64(_next_u64(state) >> np.uint64(11)) * (2.0 ** -52) - 1.0
        _orthonormalize(block, 2)
        image = np.empty((m, dv), np.float64)
        for it in range(SUBSPACE_ITERATIONS):
            _times_symmetric(cov, block, image)
            _orthonormalize(image, 2 if it == SUBSPACE_ITERATIONS - 1 else 1)
            block, image = image, block
        _times_symmetric(cov, block, image)
        small = np.empty((m, m), np.float64)
        for c in range(m):
            for r in range(c, m):
                h = 0.5 * (_dot64(block[c], image[r]) + _dot64(block[r], image[c]))
                small[c, r] = h
                small[r, c] = h
        vals, rot = _jacobi_eigen(small, JACOBI_MAX_SWEEPS)
        vecs = np.zeros((m, dv), np.float64)
        for k in range(m):
            for c in range(m):
                w = rot[k, c]
                for j in range(dv):
                    vecs[k, j] += w * block[c, j]
    order = np.argsort(-vals, kind="mergesort")
    out = np.empty((n_dirs, dv), np.float64)
    for r in range(n_dirs):
        src = vecs[order[r]]
        big = 0
        for j in range(1, dv):
            if abs(src[j]) > abs(src[big]):
                big = j
        sign = -1.0 if src[big] < 0 else 1.0
        for j in range(dv):
            out[r, j] = sign * src[j]
    return out


@njit(cache=True, nogil=True)
def _project_pair(data, i, i2, bt, out):
    """Rows i and i2 of out (n, pp) float32 from rows i, i2 of data and bt (dv, pp) (see
    project_rows); i2 == i when there is no second row. Sharing each load of bt between two rows
    halves the reads from cache."""
    dv, pp = bt.shape
    c0 = 0
    while c0 + 4 * LANES32 <= pp:
        s0 = zeros32()
        s1 = zeros32()
        s2 = zeros32()
        s3 = zeros32()
        t0 = zeros32()
        t1 = zeros32()
        t2 = zeros32()
        t3 = zeros32()
        for j in range(dv):
            b0 = lanes_row(bt, j, c0)
            b1 = lanes_row(bt, j, c0 + LANES32)
            b2 = lanes_row(bt, j, c0 + 2 * LANES32)
            b3 = lanes_row(bt, j, c0 + 3 * LANES32)
            v = splat(data[i, j])
            s0 += v * b0
            s1 += v * b1
            s2 += v * b2
            s3 += v * b3
            v = splat(data[i2, j])
            t0 += v * b0
            t1 += v * b1
            t2 += v * b2
            t3 += v * b3
        store_lanes_row(out, i, c0, s0)
        store_lanes_row(out, i, c0 + LANES32, s1)
        store_lanes_row(out, i, c0 + 2 * LANES32, s2)
        store_lanes_row(out, i, c0 + 3 * LANES32, s3)
        store_lanes_row(out, i2, c0, t0)
        store_lanes_row(out, i2, c0 + LANES32, t1)
        store_lanes_row(out, i2, c0 + 2 * LANES32, t2)
        store_lanes_row(out, i2, c0 + 3 * LANES32, t3)
        c0 += 4 * LANES32
    while c0 < pp:
        s0 = zeros32()
        t0 = zeros32()
        for j in range(dv):
            b0 = lanes_row(bt, j, c0)
            s0 += splat(data[i, j]) * b0
            t0 += splat(data[i2, j]) * b0
        store_lanes_row(out, i, c0, s0)
        store_lanes_row(out, i2, c0, t0)
        c0 += LANES32


@njit(cache=True, nogil=True)
def project_rows(data, bt, out, start, stop):
    """Rows start..stop-1 of out (n, pp) float32: data (n, dv) float32 times bt (dv, pp)
    float32 (the split basis transposed, zero columns past P).

    Entry (i, r) is the float32 sum over j in increasing order of data[i, j] * bt[j, r]
    (float32 lanes over r), whichever thread computes row i.
    """
    n = stop - start
    for h in range((n + 1) // 2):
        i = start + 2 * h
        _project_pair(data, i, min(i + 1, stop - 1), bt, out)


@njit(cache=True, nogil=True)
def normalize_rows(x, start, stop):
    """Rows start..stop-1 of x (n, dv) float32 divided by their norms, in place (as a query's
    ``_normalize_inplace``, so an indexed row and the same vector as a query give the same floats)."""
    for i in range(start, stop):
        _normalize_inplace(x[i])


@njit(cache=True, nogil=True)
def squared_norms64(x):
    """sum_j x[i, j]^2 for x (n, d) float32: (n,) float64, summed in increasing j."""
    out = np.empty(x.shape[0], np.float64)
    for i in range(x.shape[0]):
        s = 0.0
        for j in range(x.shape[1]):
            v = np.float64(x[i, j])
            s += v * v
        out[i] = s
    return out


@njit(cache=True, nogil=True)
def _two_means(vecs, perm, s, e, metric, n_iter, state, p, q):
    """Two centroids p, q (dv,) float32 of the items perm[s:e], refined on sampled items."""
    size = e - s
    i = _rand_below(state, size)
    j = _rand_below(state, size - 1)
    if j >= i:
        j += 1
    p[:] = vecs[perm[s + i]]
    q[:] = vecs[perm[s + j]]
    angular = metric == ANGULAR or metric == DOT
    if angular:
        _normalize_inplace(p)
        _normalize_inplace(q)
    dv = p.shape[0]
    ic = 1.0
    jc = 1.0
    inv = 1.0
    n_lines = min((p.shape[0] * 4 + 63) // 64, 32)
    nxt = perm[s + _rand_below(state, size)] if n_iter > 0 else 0
    for it in range(n_iter):
        zi = nxt
        if it + 1 < n_iter:
            # draw the next sample now (same order of draws) so its row loads during this step
            nxt = perm[s + _rand_below(state, size)]
            for line in range(n_lines):
                prefetch_row(vecs, nxt, line * 16)
        z = vecs[zi]
        if angular:
            zz = _dot_row(z, vecs, zi)
            if zz <= 0:
                continue
            inv = 1.0 / np.sqrt(zz)
            di = ic * (2.0 - 2.0 * _dot_row(p, vecs, zi) * inv)
            dj = jc * (2.0 - 2.0 * _dot_row(q, vecs, zi) * inv)
        elif metric == MANHATTAN:
            di = ic * _l1dist_row(p, vecs, zi, 0, dv)
            dj = jc * _l1dist_row(q, vecs, zi, 0, dv)
        else:
            di = ic * _sqdist_row(p, vecs, zi, 0, dv)
            dj = jc * _sqdist_row(q, vecs, zi, 0, dv)
        if di < dj:
            for t in range(p.shape[0]):
                zt = z[t] * inv if angular else z[t]
                p[t] = (p[t] * ic + zt) / (ic + 1.0)
            ic += 1.0
            if angular:
                _normalize_inplace(p)
        elif dj < di:
            for t in range(q.shape[0]):
                zt = z[t] * inv if angular else z[t]
                q[t] = (q[t] * jc + zt) / (jc + 1.0)
            jc += 1.0
            if angular:
                _normalize_inplace(q)


@njit(cache=True, nogil=True)
def _assign_sides(codes, perm, s, e, w, c, side, state):
    """side[i - s] = 1 (right) if the build margin <w, codes[i]> + c is > 0, 0 if < 0, a coin
    flip if == 0. Returns the number of right-side items.

    The build reads the rows as per-dimension uint8 codes (see ``build_tree``): a quarter of the
    memory traffic of float32 in the passes that stream the whole data set.
    """
    n_right = 0
    n_zero = 0
    dv = codes.shape[1]
    n_lines = min((dv + 63) // 64, 16)
    ahead = max(2, 32 // n_lines)
    for i in range(s, e):
        if i + ahead < e:
            nxt = perm[i + ahead]
            for line in range(n_lines):
                prefetch_row(codes, nxt, line * 64)
        m = _dot_row(w, codes, perm[i]) + c
        b = np.int8(1) if m > 0 else np.int8(0)  # branch-free: the side is a coin flip to the CPU
        side[i - s] = b
        n_right += b
        n_zero += 1 if m == 0 else 0
    if n_zero > 0:
        # exact ties (duplicates on the plane): split them at random
        for i in range(s, e):
            if _dot_row(w, codes, perm[i]) + c == 0:
                b = np.int8(_rand_bit(state))
                side[i - s] = b
                n_right += b
    return n_right


@njit(cache=True, nogil=True)
def build_tree(vecs, codes, code_scale, code_min, metric, leaf_size, seed, n_iter):
    """Build one tree over all rows of ``vecs`` (n, dv) float32.

    ``codes`` (n, dv) uint8 with ``code_scale``/``code_min`` (dv,) float32 approximate the rows as
    ``code * scale + min``; they decide which side of a split an item goes to (only the tree shape
    depends on them; queries always use ``vecs``). Two-means uses the float rows.

    Returns ``(perm, planes, coefs, children, leaf_starts, root)`` in tree-local numbering:
    perm (n,) int32 item ids tiled by the leaves; planes (S, dv) int8; coefs (S, 2) float32;
    children (S, 2) int32 child codes; leaf_starts (L + 1,) int64 positions into perm; root int.
    Deterministic for a given seed (uint64).
    """
    n, dv = vecs.shape
    state = np.empty(1, np.uint64)
    state[0] = np.uint64(seed)
    perm = np.arange(n).astype(np.int32)
    tmp = np.empty(n, np.int32)
    side = np.empty(n, np.int8)
    cap = 2 * (n // max(leaf_size, 1)) + 16
    planes = np.empty((cap, dv), np.int8)
    coefs = np.empty((cap, 2), np.float32)
    children = np.empty((cap, 2), np.int32)
    leaf_starts = np.empty(cap + 1, np.int64)
    n_split = 0
    n_leaf = 0
    root = 0
    p = np.empty(dv, np.float32)
    q = np.empty(dv, np.float32)
    plane = np.empty(dv, np.float32)
    qplane = np.empty(dv, np.int8)
    w = np.empty(dv, np.float32)
    mid_pt = np.empty(dv, np.float32)
    # explicit DFS stack of (start, end, parent split node or -1, side); the left child is pushed
    # last so it is popped first, which makes the leaves appear in position order.
    stack = np.empty((64, 4), np.int64)
    sp = 0
    stack[0, 0] = 0
    stack[0, 1] = n
    stack[0, 2] = -1
    stack[0, 3] = 0
    sp = 1
    angular = metric == ANGULAR or metric == DOT
    while sp > 0:
        sp -= 1
        s = stack[sp, 0]
        e = stack[sp, 1]
        parent = stack[sp, 2]
        pside = stack[sp, 3]
        size = e - s
        if size <= leaf_size:
            if n_leaf + 1 >= leaf_starts.shape[0]:
                grown = np.empty(2 * leaf_starts.shape[0], np.int64)
                grown[: leaf_starts.shape[0]] = leaf_starts
                leaf_starts = grown
            leaf_starts[n_leaf] = s
            code = -(n_leaf + 1)
            n_leaf += 1
        else:
            ok = False
            offset = np.float32(0.0)
            scale = np.float32(0.0)
            n_right = 0
            for _attempt in range(SPLIT_ATTEMPTS):
                _two_means(vecs, perm, s, e, metric, min(n_iter, size), state, p, q)
                for t in range(dv):
                    plane[t] = p[t] - q[t]
                if _normalize_inplace(plane) <= 0:
                    continue
                amax = np.float32(0.0)
                for t in range(dv):
                    amax = max(amax, abs(plane[t]))
                scale = amax / np.float32(127.0)
                for t in range(dv):
                    qplane[t] = np.int8(np.round(plane[t] / scale))
                if angular:
                    offset = np.float32(0.0)
                else:
                    for t in range(dv):
                        mid_pt[t] = 0.5 * (p[t] + q[t])
                    offset = -scale * _dot(qplane, mid_pt)
                # margin of the decoded row: sum_t scale*qplane[t]*(code[t]*code_scale[t] + code_min[t])
                c0 = offset
                for t in range(dv):
                    pt = scale * np.float32(qplane[t])
                    w[t] = pt * code_scale[t]
                    c0 += pt * code_min[t]
                n_right = _assign_sides(codes, perm, s, e, w, c0, side, state)
                if max(n_right, size - n_right) <= MAX_SIDE_FRACTION * size:
                    ok = True
                    break
            if not ok:
                # random split: a zero plane gives every query margin 0, so both halves are
                # visited with the same priority
                qplane[:] = 0
                scale = np.float32(0.0)
                offset = np.float32(0.0)
                n_right = 0
                for i in range(size):
                    b = _rand_bit(state)
                    side[i] = b
                    n_right += b
                if n_right == 0 or n_right == size:
                    side[0] = 1 - side[0]
                    n_right = n_right + 1 if side[0] == 1 else n_right - 1
            # stable partition keeps ids ascending inside each segment (friendlier memory order)
            nl = 0
            nr = 0
            for i in range(s, e):
                item = perm[i]
                b = side[i - s]
                perm[s + nl] = item  # branch-free: write both places, advance one
                tmp[nr] = item
                nl += 1 - b
                nr += b
            for i in range(nr):
                perm[s + nl + i] = tmp[i]
            if n_split >= planes.shape[0]:
                new_cap = 2 * planes.shape[0]
                g_planes = np.empty((new_cap, dv), np.int8)
                g_planes[:n_split] = planes[:n_split]
                planes = g_planes
                g_coefs = np.empty((new_cap, 2), np.float32)
                g_coefs[:n_split] = coefs[:n_split]
                coefs = g_coefs
                g_ch = np.empty((new_cap, 2), np.int32)
                g_ch[:n_split] = children[:n_split]
                children = g_ch
            node = n_split
            n_split += 1
            planes[node] = qplane
            coefs[node, 0] = scale
            coefs[node, 1] = offset
            children[node, 0] = 0
            children[node, 1] = 0
            code = node
            if sp + 2 > stack.shape[0]:
                g_stack = np.empty((2 * stack.shape[0], 4), np.int64)
                g_stack[:sp] = stack[:sp]
                stack = g_stack
            mid = s + nl
            stack[sp, 0] = mid
            stack[sp, 1] = e
            stack[sp, 2] = node
            stack[sp, 3] = 1
            stack[sp + 1, 0] = s
            stack[sp + 1, 1] = mid
            stack[sp + 1, 2] = node
            stack[sp + 1, 3] = 0
            sp += 2
        if parent < 0:
            root = code
        else:
            children[parent, pside] = code
    leaf_starts[n_leaf] = n
    return (
        perm,
        planes[:n_split].copy(),
        coefs[:n_split].copy(),
        children[:n_split].copy(),
        leaf_starts[: n_leaf + 1].copy(),
        root,
    )


# --------------------------------------------------------------------------------------------
# query


@njit(cache=True, nogil=True)
def _heap_push(pri, node, size, p, c):
    """Push (p, c) onto the max-heap (pri, node) holding ``size`` entries (the caller makes room)."""
    i = size
    while i > 0:
        parent = (i - 1) >> 1
        if pri[parent] >= p:
            break
        pri[i] = pri[parent]
        node[i] = node[parent]
        i = parent
    pri[i] = p
    node[i] = c


@njit(cache=True, nogil=True)
def _heap_pop(pri, node, size):
    """Remove the top of the max-heap; ``size`` is the count before the pop."""
    size -= 1
    p = pri[size]
    c = node[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        right = left + 1
        child = left
        if right < size and pri[right] > pri[left]:
            child = right
        if pri[child] <= p:
            break
        pri[i] = pri[child]
        node[i] = node[child]
        i = child
    pri[i] = p
    node[i] = c


@njit(cache=True, nogil=True)
def _worse(d1, i1, d2, i2):
    return d1 > d2 or (d1 == d2 and i1 > i2)


@njit(cache=True, nogil=True)
def _topk_insert(kd, ki, size, k, d, item):
    """Keep the k best (distance, id) pairs in a max-heap ordered by (distance, id)."""
    if size < k:
        i = size
        while i > 0:
            parent = (i - 1) >> 1
            if not _worse(d, item, kd[parent], ki[parent]):
                break
            kd[i] = kd[parent]
            ki[i] = ki[parent]
            i = parent
        kd[i] = d
        ki[i] = item
        return size + 1
    if not _worse(kd[0], ki[0], d, item):
        return size
    _topk_sift_down(kd, ki, size, d, item)
    return size


@njit(cache=True, nogil=True)
def _topk_sift_down(kd, ki, size, d, item):
    """Put (d, item) at the root of the (distance, id) max-heap kd/ki[:size] (size >= 1), whose
    root entry is being replaced, and sift it down to its place."""
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        right = left + 1
        child = left
        if right < size and _worse(kd[right], ki[right], kd[left], ki[left]):
            child = right
        if not _worse(kd[child], ki[child], d, item):
            break
        kd[i] = kd[child]
        ki[i] = ki[child]
        i = child
    kd[i] = d
    ki[i] = item




@njit(cache=True, nogil=True, inline="always")
def _angular_sq_row(q, vectors, item, q_zero):
    """Squared angular distance 2 - 2cos of the unit (or all-zero) rows q (dv,) and
    vectors[item] (float32), as ||q - x||^2 so that identical rows give exactly 0; 2 when either
    row is all-zero (cosine 0 by definition). Both sums in the fixed lane order."""
    n = q.shape[0]
    n1 = n - n % LANES32
    acc = zeros32()
    xacc = zeros32()
    for j in range(0, n1, LANES32):
        xl = lanes_row(vectors, item, j)
        t = lanes(q, j) - xl
        acc += t * t
        xacc += xl * xl
    s = vsum(acc)
    xx = vsum(xacc)
    for j in range(n1, n):
        x = vectors[item, j]
        t = q[j] - x
        s += t * t
        xx += x * x
    if q_zero or xx < 0.5:
        return np.float32(2.0)
    return s


@njit(cache=True, nogil=True)
def _distance(qbuf, vectors, item, metric, bound, block_order, q_zero):
    """The ranking distance of row ``item`` (squared for euclidean/angular, negated for dot).

    Euclidean/manhattan sums run block by block in ``block_order`` (most varying dimensions first)
    and stop, returning a value > bound, once the partial sum passes bound; the blocks are always
    summed in the same order, so the value never depends on the stopping.
    """
    if metric == EUCLIDEAN or metric == MANHATTAN:
        dv = qbuf.shape[0]
        total = np.float32(0.0)
        for b in range(block_order.shape[0]):
            j0 = block_order[b] * _BLOCK
            j1 = min(j0 + _BLOCK, dv)
            if metric == EUCLIDEAN:
                total += _sqdist_row(qbuf, vectors, item, j0, j1)
            else:
                total += _l1dist_row(qbuf, vectors, item, j0, j1)
            if total > bound:
                return total
        return total
    if metric == ANGULAR:
        return _angular_sq_row(qbuf, vectors, item, q_zero)
    return -_dot_row(qbuf, vectors, item)


@njit(cache=True, nogil=True)
def _prefetch_candidate(vectors, item, block_order, pf_blocks):
    """Start loading the first ``pf_blocks`` blocks (in block_order) of row ``item``."""
    dv = vectors.shape[1]
    for b in range(pf_blocks):
        j0 = block_order[b] * _BLOCK
        for col in range(j0, min(j0 + _BLOCK, dv), 16):
            prefetch_row(vectors, item, col)


@njit(cache=True, nogil=True, inline="always")
def _lb_term(lb_q, item_codes, item, scale, lb_half, j):
    """Lanes of max(0, |lb_q - code * scale| - lb_half)^2 for the 16 split coordinates from j."""
    t = vmax0(vabs(lanes(lb_q, j) - lanes_row(item_codes, item, j) * lanes(scale, j)) - lanes(lb_half, j))
    return t * t


@njit(cache=True, nogil=True, inline="always")
def _lower_bound(lb_q, item_codes, item, scale, lb_half):
    """A lower bound of the squared euclidean distance between the query and row ``item``
    (float32, summed in the fixed lane order, four accumulators as _dot_row).

    The split basis U (P, dv) has orthonormal rows, so ||q - x||^2 >= ||U(q - x)||^2, and each
    projected coordinate of the item lies within half a code step of ``code * scale + min``
    (item_codes (n, P) uint8; lb_q (P,) is the projected query minus min, lb_half (P,) a little
    more than half a step).
    """
    n = lb_q.shape[0]
    n1 = n - n % LANES32
    n4 = n - n % (4 * LANES32)
    acc0 = zeros32()
    acc1 = zeros32()
    acc2 = zeros32()
    acc3 = zeros32()
    for j in range(0, n4, 4 * LANES32):
        acc0 += _lb_term(lb_q, item_codes, item, scale, lb_half, j)
        acc1 += _lb_term(lb_q, item_codes, item, scale, lb_half, j + LANES32)
        acc2 += _lb_term(lb_q, item_codes, item, scale, lb_half, j + 2 * LANES32)
        acc3 += _lb_term(lb_q, item_codes, item, scale, lb_half, j + 3 * LANES32)
    if n1 > n4:
        acc0 += _lb_term(lb_q, item_codes, item, scale, lb_half, n4)
    if n1 > n4 + LANES32:
        acc1 += _lb_term(lb_q, item_codes, item, scale, lb_half, n4 + LANES32)
    if n1 > n4 + 2 * LANES32:
        acc2 += _lb_term(lb_q, item_codes, item, scale, lb_half, n4 + 2 * LANES32)
    s = vsum((acc0 + acc1) + (acc2 + acc3))
    for j in range(n1, n):
        t = abs(lb_q[j] - np.float32(item_codes[item, j]) * scale[j]) - lb_half[j]
        t = t if t > 0 else np.float32(0.0)
        s += t * t
    return s


@njit(cache=True, nogil=True)
def _rank(qbuf, vectors, block_order, metric, k, todo, todo_lb, a, b, n_todo, kd, ki, found, bound,
          pf_blocks, ahead, q_zero, use_lb):
    """Rank todo[a:b] (item ids) into the top-k heap (kd, ki); returns (found, bound).

    A candidate whose lower bound (todo_lb) already exceeds the current k-th distance is skipped
    without reading its row. While ranking todo[c], the first blocks of todo[c + ahead] are
    prefetched.
    """
    for c in range(a, b):
        if c + ahead < n_todo:
            _prefetch_candidate(vectors, todo[c + ahead], block_order, pf_blocks)
        item = todo[c]
        if use_lb and found == k and todo_lb[c] > _lb_limit(bound, metric):
            continue
        dist = _distance(qbuf, vectors, item, metric, bound, block_order, q_zero)
        if found == k and dist > bound:
            continue
        found = _topk_insert(kd, ki, found, k, dist, item)
        if found == k:
            bound = kd[0]
    return found, bound


@njit(cache=True, nogil=True)
def _lb_limit(bound, metric):
    """The largest lower bound (a squared euclidean distance) a candidate may have and still beat
    the k-th ranking distance ``bound``, with a relative margin for float rounding."""
    if metric == MANHATTAN:
        bound = bound * bound  # |q - x|_1 >= |q - x|_2
    return bound * np.float32(1.0001)


@njit(cache=True, nogil=True)
def _prefetch_node(planes, coefs, children, c, p_lines):
    """Start loading what visiting split node c reads (its plane, scale/offset and children)."""
    for line in range(p_lines):
        prefetch_row(planes, c, line * 64)
    prefetch_row(coefs, c, 0)
    prefetch_row(children, c, 0)


@njit(cache=True, nogil=True)
def _search_one(
    qraw, vectors, basis, item_codes, code_coefs, planes, coefs, children, roots, leaf_offsets, leaf_items,
    block_order, metric, k, search_k, scratch, kd, ki, out_ids, out_dists,
):
    """Answer one query into out_ids (k,) int64 and out_dists (k,) float32; returns the count found.

    qraw (d,) float32 is the query as given; ``scratch`` comes from ``new_scratch`` (its visited
    map is all zero on entry and again on return; nothing in it grows, see there). Candidates are
    collected from ONE max-heap over all trees keyed by the smallest margin on the path, until
    ``search_k`` leaf entries (duplicates included, as Annoy counts) have been seen and at least k
    distinct items are known.

    Memory latency dominates: a leaf's new candidates are first screened by a lower bound from
    their one-line codes (when the index has a split basis), the rows of the survivors are
    prefetched, and they are ranked one leaf later, so their loads overlap with the tree walk.
    """
    n, dv = vectors.shape
    visited, cand, todo, todo_lb, pri, node, qbuf, qsplit = scratch
    d_in = qraw.shape[0]
    for j in range(d_in):
        qbuf[j] = qraw[j]
    for j in range(d_in, dv):
        qbuf[j] = 0.0
    q_zero = False
    if metric == ANGULAR:
        q_zero = _normalize_inplace(qbuf) <= 0
    # the walk reads the query in the split space: its coordinates in the basis, or itself
    n_basis = basis.shape[0]
    if n_basis > 0:
        for r in range(n_basis):
            qsplit[r] = _dot_row(qbuf, basis, r)
        qw = qsplit  # (P,) when basis is (P, dv)
    else:
        qw = qbuf
    # lower bounds from the item codes (euclidean distances in the basis; not for dot)
    use_lb = n_basis > 0 and item_codes.shape[0] == n and n > 0 and metric != DOT
    n_code = item_codes.shape[1] if use_lb else 0
    lb_q = np.empty(n_code, np.float32)
    lb_half = np.empty(n_code, np.float32)
    for j in range(n_code):
        lb_q[j] = qsplit[j] - code_coefs[1, j]
        lb_half[j] = np.float32(0.505) * code_coefs[0, j]
    code_scale = code_coefs[0]
    n_trees = roots.shape[0]
    hsize = 0
    inf = np.float32(np.inf)
    for t in range(n_trees):
        _heap_push(pri, node, hsize, inf, roots[t])
        hsize += 1
    n_cand = 0
    n_todo = 0
    ranked = 0
    pf_blocks = min(block_order.shape[0], 2)
    n_lines = min((dv * 4 + 63) // 64, pf_blocks * (_BLOCK // 16))
    ahead = max(4, 64 // n_lines)  # candidates prefetched ahead: about 64 lines in flight
    p_lines = min((planes.shape[1] + 63) // 64, 4)
    seen = 0
    found = 0
    bound = inf
    while hsize > 0 and (seen < search_k or n_cand < k):
        p = pri[0]
        c = node[0]
        _heap_pop(pri, node, hsize)
        hsize -= 1
        # Walk down from the popped node while the nearer child would be the next node popped
        # anyway (its priority is at least the heap's top): the same visiting order as pushing and
        # popping it, without the two heap operations. The farther child is always pushed.
        # (child codes are in range and form trees: Forest.load checks every index it opens)
        while c >= 0:
            c0 = children[c, 0]
            c1 = children[c, 1]
            # both children are known before the margin: start loading them now, so the one
            # walked next is (partly) on its way while the plane product runs
            if c0 >= 0:
                _prefetch_node(planes, coefs, children, c0, p_lines)
            if c1 >= 0:
                _prefetch_node(planes, coefs, children, c1, p_lines)
            m = coefs[c, 0] * _dot_row(qw, planes, c) + coefs[c, 1]
            if m > 0:
                near = c1
                far = c0
            else:
                near = c0
                far = c1
            am = abs(m)
            _heap_push(pri, node, hsize, p if p < -am else -am, far)
            hsize += 1
            if am < p:
                p = am
            if pri[0] > p:
                # another branch is more promising: queue the nearer child and pop that one
                _heap_push(pri, node, hsize, p, near)
                hsize += 1
                break
            c = near
        if c >= 0:
            continue
        leaf = -c - 1
        a = leaf_offsets[leaf]
        b = leaf_offsets[leaf + 1]
        seen += b - a
        new = n_cand
        for pos in range(a, b):
            item = leaf_items[pos]
            if item < 0 or item >= n or visited[item] != 0:
                continue
            visited[item] = 1
            cand[n_cand] = item
            n_cand += 1
            if use_lb:
                prefetch_row(item_codes, item, 0)
        before = n_todo
        limit = _lb_limit(bound, metric)
        for c in range(new, n_cand):
            item = cand[c]
            lb = np.float32(0.0)
            if use_lb:
                lb = _lower_bound(lb_q, item_codes, item, code_scale, lb_half)
                if found == k and lb > limit:
                    continue  # farther than the current k-th best: its row is never read
            todo[n_todo] = item
            todo_lb[n_todo] = lb
            n_todo += 1
        for c in range(before, min(n_todo, before + ahead)):
            _prefetch_candidate(vectors, todo[c], block_order, pf_blocks)
        found, bound = _rank(qbuf, vectors, block_order, metric, k, todo, todo_lb, ranked, before, n_todo,
                             kd, ki, found, bound, pf_blocks, ahead, q_zero, use_lb)
        ranked = before
    found, bound = _rank(qbuf, vectors, block_order, metric, k, todo, todo_lb, ranked, n_todo, n_todo, kd, ki,
                         found, bound, pf_blocks, ahead, q_zero, use_lb)
    for c in range(n_cand):
        visited[cand[c]] = 0
    # sort the k best by (distance, id): pop the max-heap from the back
    size = found
    while size > 0:
        dlast = kd[0]
        ilast = ki[0]
        size -= 1
        if size > 0:  # the last entry takes the root's place
            _topk_sift_down(kd, ki, size, kd[size], ki[size])
        out_ids[size] = ilast
        if metric == EUCLIDEAN or metric == ANGULAR:
            out_dists[size] = np.sqrt(dlast)
        else:
            out_dists[size] = dlast
    return found


@njit(cache=True, nogil=True)
def new_scratch(vectors, basis, planes, leaf_offsets):
    """Per-thread working memory of ``_search_one`` for the index with these arrays (n items of dv
    columns, n_nodes = split nodes plus leaves): (visited (n,) uint8 all zero, cand/todo (n,) int32,
    todo_lb (n,) float32, heap priorities (n_nodes,) float32 and nodes (n_nodes,) int32, qbuf
    (dv,) and qsplit (max(P, 1),) float32).

    Nothing in it ever grows: a query sees each item at most once and, as every node has exactly
    one parent (checked by ``Forest.load``), pushes each node at most once.
    """
    n, dv = vectors.shape
    n_nodes = planes.shape[0] + leaf_offsets.shape[0] - 1
    return (np.zeros(n, np.uint8), np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.float32),
            np.empty(n_nodes, np.float32), np.empty(n_nodes, np.int32), np.empty(dv, np.float32),
            np.empty(max(basis.shape[0], 1), np.float32))


@njit(cache=True, nogil=True)
def query_one(qraw, vectors, basis, item_codes, code_coefs, planes, coefs, children, roots, leaf_offsets,
              leaf_items, block_order, metric, k, search_k, scratch):
    """One query; returns (ids (found,) int64, dists (found,) float32), nearest first.

    scratch comes from ``new_scratch`` and is kept between calls (one per thread).
    """
    kd = np.empty(k, np.float32)
    ki = np.empty(k, np.int64)
    out_ids = np.empty(k, np.int64)
    out_dists = np.empty(k, np.float32)
    found = _search_one(qraw, vectors, basis, item_codes, code_coefs, planes, coefs, children, roots,
                        leaf_offsets, leaf_items, block_order, metric, k, search_k, scratch, kd, ki, out_ids,
                        out_dists)
    return out_ids[:found], out_dists[:found]


@njit(cache=True, nogil=True, parallel=True)
def query_batch(queries, vectors, basis, item_codes, code_coefs, planes, coefs, children, roots, leaf_offsets,
                leaf_items, block_order, metric, k, search_k, n_workers):
    """Many queries (nq, d) float32 on ``n_workers`` threads (query i goes to worker i % n_workers).

    Returns (ids (nq, k) int64, dists (nq, k) float32, found (nq,) int64). Each query runs the same
    ``_search_one`` as ``query_one``, so the answers are identical to one-by-one queries.
    """
    nq = queries.shape[0]
    ids = np.full((nq, k), -1, np.int64)
    dists = np.full((nq, k), np.inf, np.float32)
    found = np.zeros(nq, np.int64)
    for w in prange(n_workers):
        scratch = new_scratch(vectors, basis, planes, leaf_offsets)
        kd = np.empty(k, np.float32)
        ki = np.empty(k, np.int64)
        out_ids = np.empty(k, np.int64)
        out_dists = np.empty(k, np.float32)
        for i in range(w, nq, n_workers):
            f = _search_one(queries[i], vectors, basis, item_codes, code_coefs, planes, coefs, children, roots,
                            leaf_offsets, leaf_items, block_order, metric, k, search_k, scratch, kd, ki,
                            out_ids, out_dists)
            found[i] = f
            for j in range(f):
                ids[i, j] = out_ids[j]
                dists[i, j] = out_dists[j]
    return ids, dists, found
