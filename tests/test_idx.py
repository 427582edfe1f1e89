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
    with pytest.raises(FormatError, match=r"1 dimension\), expected images"):
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


# --- what the decode stage says about a file that passed its checksum ------------------------------


def test_labels_file_given_as_images_says_so(tmp_path):
    path = write_idx(tmp_path / "labels.idx", np.zeros(5, dtype=np.uint8))
    with pytest.raises(FormatError) as caught:
        read_idx(path, expect_ndim=3)
    assert str(caught.value) == (f"{path}: this is an IDX labels file (magic 2049: uint8, 1 dimension), "
                                 "expected images (magic 2051: 3 dimensions)")


def test_images_file_given_as_labels_says_so(tmp_path):
    path = write_idx(tmp_path / "images.gz", np.zeros((4, 28, 28), dtype=np.uint8), compress=True)
    with pytest.raises(FormatError, match=r"this is an IDX images file \(magic 2051: uint8, 3 dimensions\), "
                                          r"expected labels \(magic 2049: 1 dimension\)"):
        read_idx(path, expect_ndim=1)


def _fetched_tiny(tmp_path, **damage):
    """A fetch directory with four tiny IDX files and the validated config that names them, after
    ``damage`` (source name -> bytes written over that file *before* the config records its sha256)."""
    from conftest import tiny_digits, write_tiny_config
    from pipeline.config import load_config_file

    fetched = tmp_path / "fetched"
    fetched.mkdir()
    train_x, train_y = tiny_digits(30, seed=1)
    test_x, test_y = tiny_digits(10, seed=2)
    files = {
        "train_images": write_idx(fetched / "train-images.gz", train_x, compress=True),
        "train_labels": write_idx(fetched / "train-labels.gz", train_y, compress=True),
        "test_images": write_idx(fetched / "test-images.gz", test_x, compress=True),
        "test_labels": write_idx(fetched / "test-labels.gz", test_y, compress=True),
    }
    for name, data in damage.items():
        files[name].write_bytes(data)
    configs = tmp_path / "configs"
    configs.mkdir()
    path = write_tiny_config(configs, "tinymnist", files, urls=["https://example.org/mnist"])
    return load_config_file(path), fetched, files


def _decode(cfg, fetched, tmp_path):
    from pipeline.decode import decode_idx

    decoded = decode_idx(cfg, fetched, tmp_path, lambda fraction, message: None)
    [(vectors, keys, labels, splits)] = decoded.batches  # IDX files are read whole: one batch
    return vectors, keys, labels, splits, decoded.meta


def test_decode_with_the_labels_source_as_images_names_the_key_and_says_the_config_is_wrong(tmp_path):
    cfg, fetched, _ = _fetched_tiny(tmp_path)
    cfg = cfg.with_values({"decode.train_images": "train_labels"})  # what a config with the two swapped says
    with pytest.raises(FormatError) as caught:
        _decode(cfg, fetched, tmp_path)
    message = str(caught.value)
    assert "this is an IDX labels file (magic 2049: uint8, 1 dimension), expected images (magic 2051" in message
    assert "decode.train_images = 'train_labels' (sources.train_labels, train-labels.gz)" in message
    assert "passed its sha256 check, so fetching it again gives the same bytes: the config is wrong" in message
    assert "fetch it again" not in message.replace("fetching it again", "")


def test_checksummed_corrupt_file_says_the_source_or_checksum_is_wrong(tmp_path):
    """The config pins the sha256 of a damaged file (the publisher's file was truncated when the
    checksum was taken, or the checksum names another file): fetching again cannot help."""
    good = write_idx(tmp_path / "good.gz", np.ones((10, 28, 28), dtype=np.uint8), compress=True).read_bytes()
    cfg, fetched, _ = _fetched_tiny(tmp_path, test_images=good[:-20])
    with pytest.raises(FormatError) as caught:
        _decode(cfg, fetched, tmp_path)
    message = str(caught.value)
    assert "test-images.gz: the gzip stream is truncated or corrupt" in message
    assert "decode.test_images = 'test_images'" in message and "in " + cfg.path in message
    assert "passed its sha256 check, so fetching it again gives the same bytes: the config is wrong" in message
    assert "the URLs and sha256 of sources.test_images" in message
    assert "delete" not in message


def test_checksummed_file_with_a_short_data_section_says_the_config_is_wrong(tmp_path):
    short = write_idx(tmp_path / "short.idx", np.zeros((10, 28, 28), dtype=np.uint8)).read_bytes()[:-100]
    cfg, fetched, _ = _fetched_tiny(tmp_path, train_images=short)
    with pytest.raises(FormatError, match=r"truncated: header shape \(10, 28, 28\) needs 7840 bytes, found 7740\. "
                                          r"decode\.train_images = .*passed its sha256 check"):
        _decode(cfg, fetched, tmp_path)


def test_fetched_copy_damaged_after_verification_says_rebuild(tmp_path):
    cfg, fetched, files = _fetched_tiny(tmp_path)
    files["test_labels"].write_bytes(files["test_labels"].read_bytes()[:-5])  # bit rot after the fetch
    with pytest.raises(FormatError) as caught:
        _decode(cfg, fetched, tmp_path)
    message = str(caught.value)
    assert "decode.test_labels = 'test_labels'" in message
    assert "no longer has its sha256" in message and "grove run tinymnist --rebuild" in message
    assert "config is wrong" not in message


def test_image_and_label_counts_that_differ_name_both_keys(tmp_path):
    from conftest import tiny_digits

    cfg, fetched, files = _fetched_tiny(tmp_path)
    write_idx(files["test_labels"], tiny_digits(9, seed=3)[1], compress=True)
    import hashlib

    cfg = cfg.with_values({"sources.test_labels.sha256": hashlib.sha256(files["test_labels"].read_bytes()).hexdigest()})
    with pytest.raises(FormatError, match=r"has 10 images but .*test-labels.gz has 9 labels.*decode\.test_images "
                                          r"and decode\.test_labels.*passed its sha256 check"):
        _decode(cfg, fetched, tmp_path)


def test_images_that_are_not_uint8_are_refused_not_wrapped(tmp_path):
    """int16 pixels of 300 would silently become 44 as uint8: the decoder refuses them instead."""
    wide = np.full((10, 28, 28), 300, dtype=np.int16)
    cfg, fetched, _ = _fetched_tiny(tmp_path, test_images=write_idx(tmp_path / "wide.idx", wide).read_bytes())
    with pytest.raises(FormatError, match=r"test-images.gz: pixels are int16, expected uint8 \(IDX magic 2051\)\. "
                                          r"decode\.test_images = 'test_images'"):
        _decode(cfg, fetched, tmp_path)


def test_test_files_alone_are_the_whole_dataset(tmp_path):
    """mnist-small: no train sources; the keys are the test files' own (test/0...)."""
    cfg, fetched, _ = _fetched_tiny(tmp_path)
    cfg = cfg.with_values({"decode.train_images": None, "decode.train_labels": None, "split.method": "holdout",
                           "split.n_queries": 3})
    vectors, keys, labels, splits, meta = _decode(cfg, fetched, tmp_path)
    assert vectors.shape == (10, 784) and vectors.dtype == np.uint8
    assert keys == [f"test/{i}" for i in range(10)] and set(splits) == {"test"}
    assert meta["image_shape"] == [28, 28]


def test_run_with_swapped_sources_fails_with_the_reason_on_the_terminal(tiny_mnist, capsys):
    """The user's view: `grove run` exits 1 and the failure says what to check in the config."""
    from tasks.cli import main

    config = tiny_mnist["config"]
    config.write_text(config.read_text().replace('train_images = "train_images"', 'train_images = "train_labels"'))
    assert main(["run", "tinymnist"]) == 1
    out = capsys.readouterr()
    shown = out.out + out.err
    assert "this is an IDX labels file (magic 2049: uint8, 1 dimension), expected images (magic 2051" in shown
    assert "decode.train_images = 'train_labels'" in shown
    assert "fetching it again gives the same bytes: the config is wrong" in shown
