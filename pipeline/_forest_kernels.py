"""Compiled (numba) kernels of the tree-forest index; ``pipeline.forest`` is the public face.

Everything that runs per item or per query lives here, in one place, so the hot loops can be read
and profiled together. All kernels use ``cache=True``; nothing here allocates Python objects.

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

import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

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
# small vector helpers (float32 accumulation; fastmath lets LLVM vectorise the reductions)


@njit(cache=True, nogil=True, fastmath=True)
def _dot(a, b):
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        s += a[j] * b[j]
    return s


@njit(cache=True, nogil=True, fastmath=True)
def _dot_i8(a, b):
    """<a, b> for a (dv,) int8 and b (dv,) float32."""
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        s += np.float32(a[j]) * b[j]
    return s


@njit(cache=True, nogil=True, fastmath=True)
def _sqdist(a, b):
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        t = a[j] - b[j]
        s += t * t
    return s


@njit(cache=True, nogil=True, fastmath=True)
def _l1dist(a, b):
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        s += abs(a[j] - b[j])
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
            zz = _dot(z, z)
            if zz <= 0:
                continue
            inv = 1.0 / np.sqrt(zz)
            di = ic * (2.0 - 2.0 * _dot(p, z) * inv)
            dj = jc * (2.0 - 2.0 * _dot(q, z) * inv)
        elif metric == MANHATTAN:
            di = ic * _l1dist(p, z)
            dj = jc * _l1dist(q, z)
        else:
            di = ic * _sqdist(p, z)
            dj = jc * _sqdist(q, z)
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


@njit(cache=True, nogil=True, fastmath=True)
def _dot_u8(w, x):
    """<w, x> for w (dv,) float32 and x (dv,) uint8."""
    s = np.float32(0.0)
    for j in range(w.shape[0]):
        s += w[j] * np.float32(x[j])
    return s


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
        m = _dot_u8(w, codes[perm[i]]) + c
        b = np.int8(1) if m > 0 else np.int8(0)  # branch-free: the side is a coin flip to the CPU
        side[i - s] = b
        n_right += b
        n_zero += 1 if m == 0 else 0
    if n_zero > 0:
        # exact ties (duplicates on the plane): split them at random
        for i in range(s, e):
            if _dot_u8(w, codes[perm[i]]) + c == 0:
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
                    offset = -scale * _dot_i8(qplane, mid_pt)
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




@njit(cache=True, nogil=True, fastmath=True)
def _sqdist_row(q, vectors, item, j0, j1):
    """Squared L2 between q[j0:j1] and vectors[item, j0:j1] (unsigned offsets: no wraparound
    checks, so the loop vectorises)."""
    s = np.float32(0.0)
    u0 = np.uint64(j0)
    for j in range(np.uint64(j1) - u0):
        t = q[u0 + j] - vectors[item, u0 + j]
        s += t * t
    return s


@njit(cache=True, nogil=True, fastmath=True)
def _l1dist_row(q, vectors, item, j0, j1):
    s = np.float32(0.0)
    u0 = np.uint64(j0)
    for j in range(np.uint64(j1) - u0):
        s += abs(q[u0 + j] - vectors[item, u0 + j])
    return s


@njit(cache=True, nogil=True, fastmath=True)
def _dot_row(q, vectors, item):
    s = np.float32(0.0)
    for j in range(q.shape[0]):
        s += q[j] * vectors[item, j]
    return s


@njit(cache=True, nogil=True, fastmath=True)
def _angular_sq_row(q, vectors, item, q_zero):
    """Squared angular distance 2 - 2cos of unit (or all-zero) rows, as ||q - x||^2 so that
    identical rows give exactly 0; 2 when either row is all-zero (cosine 0 by definition)."""
    s = np.float32(0.0)
    xx = np.float32(0.0)
    for j in range(q.shape[0]):
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


@njit(cache=True, nogil=True, fastmath=True)
def _lower_bound(lb_q, item_codes, item, scale, lb_half):
    """A lower bound of the squared euclidean distance between the query and row ``item``.

    The split basis U (P, dv) has orthonormal rows, so ||q - x||^2 >= ||U(q - x)||^2, and each
    projected coordinate of the item lies within half a code step of ``code * scale + min``
    (lb_q is the projected query minus min, lb_half a little more than half a step).
    """
    s = np.float32(0.0)
    for j in range(lb_q.shape[0]):
        t = abs(lb_q[j] - np.float32(item_codes[item, j]) * scale[j]) - lb_half[j]
        t = max(t, np.float32(0.0))
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


@njit(cache=True, nogil=True, fastmath=True)
def _dot_i8_row(planes, c, q):
    """<planes[c], q> for planes (S, P) int8 and q (P,) float32."""
    s = np.float32(0.0)
    for j in range(q.shape[0]):
        s += np.float32(planes[c, j]) * q[j]
    return s


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
        # (child codes are in range and form trees: check_structure runs on every loaded index)
        while c >= 0:
            c0 = children[c, 0]
            c1 = children[c, 1]
            # both children are known before the margin: start loading them now, so the one
            # walked next is (partly) on its way while the plane product runs
            if c0 >= 0:
                _prefetch_node(planes, coefs, children, c0, p_lines)
            if c1 >= 0:
                _prefetch_node(planes, coefs, children, c1, p_lines)
            m = coefs[c, 0] * _dot_i8_row(planes, c, qw) + coefs[c, 1]
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
                lb = _lower_bound(lb_q, item_codes, item, code_coefs[0], lb_half)
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
    one parent (``check_structure``), pushes each node at most once.
    """
    n, dv = vectors.shape
    n_nodes = planes.shape[0] + leaf_offsets.shape[0] - 1
    return (np.zeros(n, np.uint8), np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.float32),
            np.empty(n_nodes, np.float32), np.empty(n_nodes, np.int32), np.empty(dv, np.float32),
            np.empty(max(basis.shape[0], 1), np.float32))


@njit(cache=True, nogil=True)
def check_structure(children, roots, n_leaves):
    """0 if every child code and root is in range and every split node and leaf has exactly one
    parent (the roots being the parents of the tree tops), else 1 + the first bad node
    (split s as s, leaf l as n_splits + l). The query kernel relies on this."""
    n_splits = children.shape[0]
    seen = np.zeros(n_splits + n_leaves, np.uint8)
    for i in range(roots.shape[0] + 2 * n_splits):
        if i < roots.shape[0]:
            c = np.int64(roots[i])
        else:
            j = i - roots.shape[0]
            c = np.int64(children[j // 2, j % 2])
        if c >= n_splits or c < -n_leaves:
            return 1 + i  # out of range (reported as a position; the caller says which)
        slot = c if c >= 0 else n_splits + (-c - 1)
        if seen[slot] != 0:
            return 1 + slot
        seen[slot] = 1
    for slot in range(n_splits + n_leaves):
        if seen[slot] == 0:
            return 1 + slot
    return 0


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
