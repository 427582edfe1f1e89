"""Reader for the IDX format of the MNIST files (gzip-compressed or not).

Layout: two zero bytes, a dtype code, the number of dimensions, then one big-endian uint32 per
dimension, then the values in big-endian row-major order. Read as one big-endian uint32, the first
four bytes are the file's "magic number": 2049 (0x00000801, uint8, 1 dimension) for MNIST labels,
2051 (0x00000803, uint8, 3 dimensions) for MNIST images.

The errors say what is wrong with the file; they do not say what to do about it, because only the
caller knows where the file came from (``pipeline.decode`` adds that for a fetched source).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import FormatError

_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise FormatError(
            f"{path}: the gzip stream is truncated or corrupt ({exc})"
        ) from exc


def read_idx(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file into a native-endian numpy array of the shape its header gives.

    MNIST images come back as uint8 (n, 28, 28), labels as uint8 (n,).
    Raises FormatError for a wrong magic number, an unknown dtype code, a number of dimensions other
    than ``expect_ndim`` (a labels file given as images says so, with both magic numbers), a corrupt
    gzip stream, or a data section shorter or longer than the header promises.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise FormatError(f"{path}: {len(data)} bytes is too short for an IDX header (expected at least 4)")
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00":
        raise FormatError(
            f"{path}: not an IDX file: magic number starts with {zero.hex()} (expected 0000); "
            "is this the right file?"
        )
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise FormatError(f"{path}: unknown IDX dtype code 0x{code:02X} (expected one of {known})")
    if ndim == 0:
        raise FormatError(f"{path}: IDX header declares 0 dimensions (expected at least 1)")
    if expect_ndim is not None and ndim != expect_ndim:
        magic, wanted = int.from_bytes(data[:4], "big"), (code << 8) | expect_ndim
        raise FormatError(
            f"{path}: this is an IDX {_kind(ndim)} file (magic {magic}: {_DTYPES[code].name}, {_dims(ndim)}), "
            f"expected {_kind(expect_ndim)} (magic {wanted}: {_dims(expect_ndim)})"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise FormatError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header_len})")
    shape = tuple(int(x) for x in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise FormatError(
            f"{path}: IDX data section {what}: header shape {shape} needs {expected} bytes, found {actual}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _kind(ndim: int) -> str:
    """What an IDX file of ``ndim`` dimensions holds by MNIST's convention."""
    return {1: "labels", 3: "images"}.get(ndim, f"{ndim}-dimensional")


def _dims(ndim: int) -> str:
    return f"{ndim} dimension" + ("" if ndim == 1 else "s")


def write_idx(path: str | Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` as an IDX file (used by tests and by users preparing their own data)."""
    path = Path(path)
    array = np.asarray(array)
    for code, dtype in _DTYPES.items():
        if dtype.kind == array.dtype.kind and dtype.itemsize == array.dtype.itemsize:
            break
    else:
        raise FormatError(f"{path}: dtype {array.dtype} has no IDX code")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(dtype, copy=False).tobytes()
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path
