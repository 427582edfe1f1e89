import gzip

import numpy as np
import pytest

from pipeline.errors import FormatError
from pipeline.formats.idx import read_idx, write_idx
from conftest import SHARED_DATA


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip_every_dtype(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    path = write_idx(tmp_path / "a.idx", array, compress=compress)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_reads_big_endian_header_and_data(tmp_path):
    # Hand-written bytes: magic 0x00000C01 (int32, 1 dim), length 2, values 1 and 258 big-endian.
    path = tmp_path / "labels.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 2]))
    np.testing.assert_array_equal(read_idx(path), [1, 258])


def test_wrong_magic_is_named(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(FormatError, match=r"bad\.idx.*magic number.*1234"):
        read_idx(path)


def test_unknown_dtype_code(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(FormatError, match="unknown IDX dtype code 0x07"):
        read_idx(path)


def test_truncated_data_says_expected_and_found(tmp_path):
    path = write_idx(tmp_path / "images.idx", np.zeros((10, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"truncated.*\(10, 28, 28\) needs 7840 bytes, found 7740"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    path = write_idx(tmp_path / "images.gz", np.ones((50, 28, 28), dtype=np.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(FormatError, match="gzip stream is truncated or corrupt"):
        read_idx(path)


def test_unexpected_dimensions(tmp_path):
    path = write_idx(tmp_path / "labels.idx", np.zeros(5, dtype=np.uint8))
    with pytest.raises(FormatError, match="1 dimensions, expected 3"):
        read_idx(path, expect_ndim=3)


def test_trailing_bytes(tmp_path):
    path = write_idx(tmp_path / "labels.idx", np.zeros(5, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(FormatError, match="trailing bytes"):
        read_idx(path)


def test_gzip_and_plain_give_same_array(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, size=(7, 5, 5), dtype=np.uint8)
    plain = write_idx(tmp_path / "a.idx", array)
    (tmp_path / "b.gz").write_bytes(gzip.compress(plain.read_bytes()))
    np.testing.assert_array_equal(read_idx(plain), read_idx(tmp_path / "b.gz"))


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="../shared/data/mnist is not beside this checkout")
def test_real_mnist_test_set():
    images = read_idx(SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(SHARED_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test labels
