"""A table read from a file answers key lookups from its Arrow key column (VectorTable.find, key_of)
without building a Python string per row, with the answers of the list of keys."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.vectors import VectorTable, _find_string, read_vectors, write_vectors

KEYS = ["the", "theory", "he", "", "thé", "中国", "river", "he", "chinese_river", "a", "ab", "b", "ba"]


@pytest.mark.parametrize("start", [0, 1, 4])
def test_find_matches_list_index_on_substrings_repeats_unicode_and_slices(start):
    array = pa.array(KEYS, type=pa.string()).slice(start)
    keys = KEYS[start:]
    for key in [*KEYS, "t", "h", "e", "rive", "x", "中", "bab"]:
        want = keys.index(key) if key in keys else None
        assert _find_string(array, key.encode()) == want, key


def test_a_table_read_from_a_file_builds_its_key_list_only_when_asked(tmp_path):
    vectors = np.arange(len(KEYS) * 2, dtype=np.float32).reshape(len(KEYS), 2)
    write_vectors(tmp_path / "t.arrow", vectors, KEYS)
    table = read_vectors(tmp_path / "t.arrow")
    assert isinstance(table._keys, (pa.Array, pa.ChunkedArray))  # nothing built yet
    assert [table.find(k) for k in ("river", "he", "nope")] == [6, 2, None]
    assert table.key_of(8) == "chinese_river" and isinstance(table._keys, (pa.Array, pa.ChunkedArray))
    assert table.keys == KEYS and list(table.splits) == [""] * len(KEYS)
    assert table.find("he") == 2  # from the built list too
    given = VectorTable(vectors, list(KEYS), np.full(len(KEYS), -1, np.int32), np.array([""] * len(KEYS)))
    assert given.find("ba") == 12 and given.key_of(0) == "the"
