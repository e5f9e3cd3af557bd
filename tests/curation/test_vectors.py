"""Vector store: atomic parts, memory-mapped round trip, lookup by uid, blocks."""

from __future__ import annotations

import numpy as np
import pytest

from lvd.curation.vectors import open_vectors, part_paths, write_vectors


def unit16(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture()
def store_dir(tmp_path):
    # parts written out of order, one of them empty; uids of different lengths
    parts = {
        2: (["c0", "c1"], unit16(2, 8, 2)),
        0: ([f"a{i}" for i in range(5)], unit16(5, 8, 0)),
        1: ([], np.zeros((0, 8), np.float16)),
        3: (["d-long-uid"], unit16(1, 8, 3)),
    }
    for idx, (uids, vecs) in parts.items():
        write_vectors(tmp_path, idx, uids, vecs)
    return tmp_path, parts


def test_round_trip_is_memory_mapped_and_in_part_order(store_dir):
    folder, parts = store_dir
    store = open_vectors(folder)
    order = sorted(parts)
    assert store.part_indices == order and len(store) == 8 and store.dim == 8
    assert store.uids.tolist() == [u for i in order for u in parts[i][0]]
    everything = np.concatenate([parts[i][1] for i in order])
    loaded = store.load()
    assert loaded.vecs_ND.dtype == np.float16
    np.testing.assert_array_equal(loaded.vecs_ND, everything)
    assert loaded.uids.tolist() == store.uids.tolist()
    assert isinstance(store._parts[0].vecs_ND, np.memmap)  # mapped, not read


def test_get_by_uid_in_asked_order_and_unknown_uid(store_dir):
    folder, parts = store_dir
    store = open_vectors(folder)
    got = store.get(["d-long-uid", "a3", "c0", "a3"])
    want = np.stack([parts[3][1][0], parts[0][1][3], parts[2][1][0], parts[0][1][3]])
    np.testing.assert_array_equal(got, want)
    with pytest.raises(KeyError, match="a9"):
        store.get(["a1", "a9"])
    with pytest.raises(KeyError, match="d-long-uid-longer"):  # longer than any stored uid
        store.get(["d-long-uid-longer"])


def test_blocks_cover_every_row_once_without_spanning_parts(store_dir):
    folder, parts = store_dir
    store = open_vectors(folder)
    blocks = list(store.blocks(block_rows=2))
    assert [b.start for b in blocks] == [0, 2, 4, 5, 7]
    assert [len(b.uids) for b in blocks] == [2, 2, 1, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b.vecs_ND for b in blocks]), store.load().vecs_ND)
    assert sum((b.uids.tolist() for b in blocks), []) == store.uids.tolist()


def test_incomplete_part_is_invisible_and_temp_files_cleaned(tmp_path):
    write_vectors(tmp_path, 0, ["x"], unit16(1, 4, 0))
    npy, _ = part_paths(tmp_path, 1)
    np.save(npy, unit16(3, 4, 1))  # a crash after the vectors, before the uids file
    assert open_vectors(tmp_path).uids.tolist() == ["x"]
    with pytest.raises(ValueError, match="one uid per row"):
        write_vectors(tmp_path, 2, ["y"], unit16(2, 4, 2))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_rejects_wrong_dtype_and_repeated_uids(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        write_vectors(tmp_path, 0, ["a"], np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="repeated"):
        write_vectors(tmp_path, 0, ["a", "a"], unit16(2, 4, 0))
    with pytest.raises(FileNotFoundError):
        open_vectors(tmp_path / "none")
